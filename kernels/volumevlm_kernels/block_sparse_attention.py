"""Block-sparse attention in Triton, forward and backward (FlashAttention-2 style).

The sequence is ``num_blocks`` blocks of ``block_size`` (= T) tokens. Which key blocks
each query block attends is given as CSR lists (``volumevlm.ops.layout.BlockLists``), split into
*full* key blocks (every key valid: no per-element masking at all) and *partial*
key blocks (some keys are padding: masked with ``key_valid``). The backward pass uses
the transposed (key block -> query blocks) lists, so no kernel needs atomics.

Kernels, each launched on the grid ``(num_blocks, B * H)`` with one program per
block of T rows:

* ``_fwd_kernel``: online softmax in base 2 (``scale * log2(e)`` folded into q),
  fp32 accumulation, writes ``o`` and the natural-log logsumexp ``lse``.
* ``_bwd_delta_kernel``: ``delta = rowsum(do * o)`` in fp32.
* ``_bwd_dq_kernel``: per query block, loops over its key blocks (q2k lists).
* ``_bwd_dkdv_kernel``: per key block, keeps k and v in registers and loops over
  the query blocks attending it (k2q lists).

Padding query rows produce ``o = 0`` and ``lse = +inf``; with ``lse = +inf`` their
probabilities in the backward are ``exp(s - inf) = 0``, so they add nothing to dk/dv
and get ``dq = 0``. Every output element is stored by some program (blocks with
empty lists write zeros).

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the same kernels
run on CPU tensors through Triton's interpreter; autotuning is then reduced to a
single configuration because the interpreter ignores warps and stages.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from volumevlm.errors import InputError

if TYPE_CHECKING:  # the one definition of the lists lives with the layouts
    from volumevlm.ops.layout import BlockLists

__all__ = [
    "KernelArgumentError",
    "block_sparse_attention_forward",
    "block_sparse_attention_backward",
]

_LOG2E = 1.4426950408889634


class KernelArgumentError(InputError, ValueError):
    """An argument of a block-sparse attention kernel call is out of contract."""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _autotune_configs(options: list[tuple[int, int]]) -> list[triton.Config]:
    """Autotune candidates ``(num_warps, num_stages)``; a single one under the interpreter.

    The interpreter ignores warps and stages, so tuning there would only multiply the
    (slow) run time by the number of candidates.
    """
    if _interpreting():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in options]


_FWD_CONFIGS = _autotune_configs([(4, 2), (4, 3), (8, 2), (8, 3), (4, 4)])
_BWD_CONFIGS = _autotune_configs([(4, 1), (4, 2), (8, 1), (8, 2)])
_TUNE_KEY = ["BLOCK", "HEAD_DIM"]


# ---------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(
    acc, m_i, l_i, q, k_base, v_base, kvalid_ptr, idx_ptr, start, end,
    offs_n, offs_d,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
):
    """Online-softmax update of (acc, m_i, l_i) over key blocks ``idx[start:end]``.

    q is pre-scaled by ``scale * log2(e)``, so scores are in base-2 logits. With
    ``MASKED`` the block's ``key_valid`` entries mask padding keys with -inf.
    """
    for i in range(start, end):
        kb = tl.load(idx_ptr + i).to(tl.int64)
        rows = kb * BLOCK + offs_n
        if MASKED:
            # Padding keys may hold anything (even NaN): load them as 0 so 0-probabilities
            # times their values stay 0, then mask their scores with -inf.
            kvalid = tl.load(kvalid_ptr + rows) != 0
            kt = tl.load(k_base + rows[None, :] * HEAD_DIM + offs_d[:, None], mask=kvalid[None, :], other=0.0)
            v = tl.load(v_base + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=kvalid[:, None], other=0.0)
            s = tl.dot(q, kt, input_precision=PRECISION)  # [BLOCK_M, BLOCK_N] fp32
            s = tl.where(kvalid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen only masked keys so far keeps m = -inf; use 0 as its
            # reference so exp2(-inf - 0) = 0 instead of exp2(-inf + inf) = nan.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            kt = tl.load(k_base + rows[None, :] * HEAD_DIM + offs_d[:, None])  # [D, BLOCK]
            v = tl.load(v_base + rows[:, None] * HEAD_DIM + offs_d[None, :])  # [BLOCK, D]
            s = tl.dot(q, kt, input_precision=PRECISION)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = m_new
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, KVALID, QVALID,
    FULL_PTR, FULL_IDX, PART_PTR, PART_IDX,
    N, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    base = bh * N * HEAD_DIM

    q = tl.load(Q + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    q = (q.to(tl.float32) * qk_scale).to(q.dtype)

    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)

    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, K + base, V + base, KVALID, FULL_IDX,
        tl.load(FULL_PTR + qb), tl.load(FULL_PTR + qb + 1), offs_n, offs_d,
        HEAD_DIM, BLOCK, False, PRECISION,
    )
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, K + base, V + base, KVALID, PART_IDX,
        tl.load(PART_PTR + qb), tl.load(PART_PTR + qb + 1), offs_n, offs_d,
        HEAD_DIM, BLOCK, True, PRECISION,
    )

    qvalid = tl.load(QVALID + offs_m) != 0
    # Padding rows (and whole padding blocks, whose lists are empty and l_i = 0) are
    # written as o = 0, lse = +inf; the division there is discarded by the where.
    l_safe = tl.where(qvalid, l_i, 1.0)
    o = tl.where(qvalid[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(qvalid, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("inf"))
    tl.store(O + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], o.to(O.dtype.element_ty))
    tl.store(LSE + bh * N + offs_m, lse)


# ---------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------


@triton.jit
def _bwd_delta_kernel(O, DO, LSE, DELTA, N, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    ptrs = bh * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(O + ptrs).to(tl.float32)
    do = tl.load(DO + ptrs).to(tl.float32)
    # Padding rows (lse = +inf) get delta = 0 even if do holds NaN there.
    qvalid = tl.load(LSE + bh * N + offs_m) != float("inf")
    tl.store(DELTA + bh * N + offs_m, tl.where(qvalid, tl.sum(o * do, 1), 0.0))


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse2, delta, k_base, v_base, kvalid_ptr, idx_ptr, start, end,
    offs_n, offs_d,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
):
    for i in range(start, end):
        kb = tl.load(idx_ptr + i).to(tl.int64)
        rows = kb * BLOCK + offs_n
        if MASKED:
            kvalid = tl.load(kvalid_ptr + rows) != 0
            kt = tl.load(k_base + rows[None, :] * HEAD_DIM + offs_d[:, None], mask=kvalid[None, :], other=0.0)
            vt = tl.load(v_base + rows[None, :] * HEAD_DIM + offs_d[:, None], mask=kvalid[None, :], other=0.0)
            s = tl.dot(q, kt, input_precision=PRECISION)
            p = tl.where(kvalid[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        else:
            kt = tl.load(k_base + rows[None, :] * HEAD_DIM + offs_d[:, None])  # [D, BLOCK]
            vt = tl.load(v_base + rows[None, :] * HEAD_DIM + offs_d[:, None])  # [D, BLOCK]
            s = tl.dot(q, kt, input_precision=PRECISION)
            p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
    return dq


@triton.autotune(configs=_BWD_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, KVALID,
    FULL_PTR, FULL_IDX, PART_PTR, PART_IDX,
    N, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    base = bh * N * HEAD_DIM
    tile = base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]

    q = tl.load(Q + tile)
    q = (q.to(tl.float32) * qk_scale).to(q.dtype)
    do = tl.load(DO + tile)
    # lse is natural-log; scores are base-2 logits. Padding rows: lse = +inf -> p = 0.
    lse2 = tl.load(LSE + bh * N + offs_m) * 1.4426950408889634
    delta = tl.load(DELTA + bh * N + offs_m)
    dq = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)

    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, K + base, V + base, KVALID, FULL_IDX,
        tl.load(FULL_PTR + qb), tl.load(FULL_PTR + qb + 1), offs_n, offs_d,
        HEAD_DIM, BLOCK, False, PRECISION,
    )
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, K + base, V + base, KVALID, PART_IDX,
        tl.load(PART_PTR + qb), tl.load(PART_PTR + qb + 1), offs_n, offs_d,
        HEAD_DIM, BLOCK, True, PRECISION,
    )
    # Padding rows (lse = +inf) are row-local garbage if q/do hold NaN there: write 0.
    dq = tl.where((lse2 != float("inf"))[:, None], dq * scale, 0.0)
    tl.store(DQ + tile, dq.to(DQ.dtype.element_ty))


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, kvalid, q_base, do_base, lse_base, delta_base, idx_ptr, start, end,
    offs_m, offs_d,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
):
    """Accumulate dk, dv of one key block over query blocks ``idx[start:end]``.

    Works on the transposed problem (rows = keys, columns = queries) so that k and v
    stay in registers; k is pre-scaled by ``scale * log2(e)``.
    """
    for i in range(start, end):
        qb = tl.load(idx_ptr + i).to(tl.int64)
        cols = qb * BLOCK + offs_m
        lse2 = tl.load(lse_base + cols) * 1.4426950408889634
        delta = tl.load(delta_base + cols)
        # Padding queries (lse = +inf) may hold anything in q/do: load them as 0 so their
        # scores are finite and exp2(s - inf) = 0 keeps them out of dk and dv.
        qvalid = lse2 != float("inf")
        qt = tl.load(q_base + cols[None, :] * HEAD_DIM + offs_d[:, None], mask=qvalid[None, :], other=0.0)
        dot_ = tl.load(do_base + cols[None, :] * HEAD_DIM + offs_d[:, None], mask=qvalid[None, :], other=0.0)
        st = tl.dot(k, qt, input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        pt = tl.exp2(st - lse2[None, :])
        if MASKED:
            pt = tl.where(kvalid[:, None], pt, 0.0)
        dv += tl.dot(pt.to(dot_.dtype), tl.trans(dot_), input_precision=PRECISION)
        dpt = tl.dot(v, dot_, input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=_BWD_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KVALID,
    FULL_PTR, FULL_IDX, PART_PTR, PART_IDX,
    N, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    kb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_n = kb * BLOCK + tl.arange(0, BLOCK)
    offs_m = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    base = bh * N * HEAD_DIM
    tile = base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]

    kvalid = tl.load(KVALID + offs_n) != 0
    k = tl.load(K + tile, mask=kvalid[:, None], other=0.0)
    k = (k.to(tl.float32) * qk_scale).to(k.dtype)
    v = tl.load(V + tile, mask=kvalid[:, None], other=0.0)
    dk = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)

    dk, dv = _bwd_dkdv_inner(
        dk, dv, k, v, kvalid, Q + base, DO + base, LSE + bh * N, DELTA + bh * N, FULL_IDX,
        tl.load(FULL_PTR + kb), tl.load(FULL_PTR + kb + 1), offs_m, offs_d,
        HEAD_DIM, BLOCK, False, PRECISION,
    )
    dk, dv = _bwd_dkdv_inner(
        dk, dv, k, v, kvalid, Q + base, DO + base, LSE + bh * N, DELTA + bh * N, PART_IDX,
        tl.load(PART_PTR + kb), tl.load(PART_PTR + kb + 1), offs_m, offs_d,
        HEAD_DIM, BLOCK, True, PRECISION,
    )
    tl.store(DK + tile, (dk * scale).to(DK.dtype.element_ty))
    tl.store(DV + tile, dv.to(DV.dtype.element_ty))


# ---------------------------------------------------------------------------------
# launch code
# ---------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise KernelArgumentError(
            "block_size",
            f"the Triton kernels need a block size that is a power of two >= 16, got {block_size!r}",
        )


def _check_tensors(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], block_size: int):
    """Validate [B, H, N, D] tensors of one shape/dtype/device; returns (B, H, N, D)."""
    _check_block_size(block_size)
    ref = tensors[0]
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise KernelArgumentError(name, "expected a 4-D tensor [B, H, N, D]")
        if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
            raise KernelArgumentError(
                name,
                f"shape/dtype/device {tuple(t.shape)}/{t.dtype}/{t.device} differ from "
                f"{names[0]}'s {tuple(ref.shape)}/{ref.dtype}/{ref.device}",
            )
    if ref.dtype not in _DTYPES:
        raise KernelArgumentError(names[0], f"dtype {ref.dtype} not supported (fp16, bf16, fp32)")
    b, h, n, d = ref.shape
    if d < 16 or d > 128 or d & (d - 1):
        raise KernelArgumentError(names[0], f"head dim must be a power of two in 16..128, got {d}")
    if n == 0 or n % block_size:
        raise KernelArgumentError(
            names[0], f"sequence length {n} is not a positive multiple of block_size {block_size}"
        )
    return b, h, n, d


def _check_device(q: torch.Tensor) -> None:
    if not (q.is_cuda or _interpreting()):
        raise KernelArgumentError("q", "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")


def _check_lists(lists: BlockLists, num_blocks: int, device: torch.device) -> None:
    for field in ("q2k_full", "q2k_part", "k2q_full", "k2q_part"):
        indptr = getattr(lists, f"{field}_indptr", None)
        idx = getattr(lists, f"{field}_idx", None)
        for name, t in ((f"{field}_indptr", indptr), (f"{field}_idx", idx)):
            if not isinstance(t, torch.Tensor):
                raise KernelArgumentError(f"lists.{name}", f"missing (got {type(t).__name__})")
            if t.dtype != torch.int32 or t.device != device or not t.is_contiguous():
                raise KernelArgumentError(
                    f"lists.{name}", f"expected a contiguous int32 tensor on {device}, got {t.dtype} on {t.device}"
                )
        if indptr.shape != (num_blocks + 1,):
            raise KernelArgumentError(
                f"lists.{field}_indptr", f"expected shape ({num_blocks + 1},), got {tuple(indptr.shape)}"
            )


def _check_mask(name: str, mask: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    if mask.shape != (n,) or mask.device != device:
        raise KernelArgumentError(name, f"expected a bool tensor [{n}] on {device}, got {tuple(mask.shape)} on {mask.device}")
    return mask.to(torch.int8).contiguous()


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: true fp32 products (no TF32) so results match an fp64 reference closely.
    return "ieee" if dtype == torch.float32 else "tf32"


def block_sparse_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lists: BlockLists,
    key_valid: torch.Tensor,
    query_valid: torch.Tensor,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse softmax attention, forward.

    q, k, v: [B, H, N, D] fp16/bf16/fp32 on CUDA (CPU under TRITON_INTERPRET=1), tokens in
    layout order, N = num_blocks * block_size, D a power of two in 16..128.
    lists: ``volumevlm.ops.layout.BlockLists`` (or any object with its eight int32 CSR
    tensors ``q2k_full_indptr`` ... ``k2q_part_idx``, on q's device).
    key_valid, query_valid: bool [N].
    scale: the softmax scale (usually D ** -0.5).
    Returns o [B, H, N, D] (q's dtype; 0 on padding queries) and lse fp32 [B, H, N]
    (natural-log logsumexp of the scaled scores; +inf on padding queries).
    """
    b, h, n, d = _check_tensors(("q", "k", "v"), (q, k, v), block_size)
    num_blocks = n // block_size
    _check_lists(lists, num_blocks, q.device)
    kvalid = _check_mask("key_valid", key_valid, n, q.device)
    qvalid = _check_mask("query_valid", query_valid, n, q.device)
    _check_device(q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(q)
    lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    grid = (num_blocks, b * h)
    _fwd_kernel[grid](
        q, k, v, o, lse, kvalid, qvalid,
        lists.q2k_full_indptr, lists.q2k_full_idx, lists.q2k_part_indptr, lists.q2k_part_idx,
        n, float(scale) * _LOG2E,
        HEAD_DIM=d, BLOCK=block_size, PRECISION=_precision(q.dtype),
    )
    return o, lse


def block_sparse_attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    lists: BlockLists,
    key_valid: torch.Tensor,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block-sparse softmax attention, backward.

    do, q, k, v, o: [B, H, N, D] of one dtype (as in the forward); lse: fp32 [B, H, N]
    from the forward (+inf on padding queries). Returns dq, dk, dv [B, H, N, D] in q's
    dtype; dq is 0 on padding queries, dk and dv are 0 on padding keys and on keys
    no query attends.
    """
    b, h, n, d = _check_tensors(("q", "k", "v", "o", "do"), (q, k, v, o, do), block_size)
    num_blocks = n // block_size
    _check_lists(lists, num_blocks, q.device)
    kvalid = _check_mask("key_valid", key_valid, n, q.device)
    if lse.shape != (b, h, n) or lse.dtype != torch.float32 or lse.device != q.device:
        raise KernelArgumentError("lse", f"expected float32 [{b}, {h}, {n}] on {q.device}, got {lse.dtype} {tuple(lse.shape)}")
    _check_device(q)
    q, k, v, o, do, lse = (t.contiguous() for t in (q, k, v, o, do, lse))
    grid = (num_blocks, b * h)
    precision = _precision(q.dtype)

    delta = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[grid](o, do, lse, delta, n, HEAD_DIM=d, BLOCK=block_size)

    dq = torch.empty_like(q)
    _bwd_dq_kernel[grid](
        q, k, v, do, dq, lse, delta, kvalid,
        lists.q2k_full_indptr, lists.q2k_full_idx, lists.q2k_part_indptr, lists.q2k_part_idx,
        n, float(scale) * _LOG2E, float(scale),
        HEAD_DIM=d, BLOCK=block_size, PRECISION=precision,
    )
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    _bwd_dkdv_kernel[grid](
        q, k, v, do, dk, dv, lse, delta, kvalid,
        lists.k2q_full_indptr, lists.k2q_full_idx, lists.k2q_part_indptr, lists.k2q_part_idx,
        n, float(scale) * _LOG2E, float(scale),
        HEAD_DIM=d, BLOCK=block_size, PRECISION=precision,
    )
    return dq, dk, dv
