"""Block-sparse attention in Triton, forward and backward (FlashAttention-2 style).

The sequence is ``num_blocks`` blocks of ``block_size`` (= T) tokens. Which key blocks
each query block attends is given as CSR lists (``volumevlm.ops.layout.BlockLists``), split into
*full* key blocks (every key valid: no per-element masking at all) and *partial*
key blocks (some keys are padding: masked with ``key_valid``). The backward pass uses
the transposed (key block -> query blocks) lists for dk/dv, so no kernel needs atomics.

Kernels (two launches per backward, one per forward), each on a 1-D grid of
``num_blocks * B * H`` programs, one per (block of T rows, batch-head):

* ``_fwd_kernel``: online softmax in base 2 (``scale * log2(e)`` folded into q),
  fp32 accumulation, writes ``o`` and the natural-log logsumexp ``lse``.
* ``_bwd_delta_kernel``: ``delta = rowsum(do * o)`` in fp32.
* ``_bwd_kernel``: one program per block: first dk, dv of the block as a *key* block
  (k and v stay in registers; loops over the query blocks attending it, k2q lists),
  then dq of the same block as a *query* block (loops over its key blocks, q2k
  lists). The fused-attention tutorial's structure, on block lists.

Program order: a program id maps to a block through ``ORDER`` (``BlockLists.fwd_order``
/ ``bwd_order``). The few blocks with by far the longest lists (global blocks attend
and are attended by every block) come first, one per batch-head, so they start at
once instead of forming a tail; the other blocks follow head by head in sequence
order, so programs running together share key blocks in L2.

Padding query rows produce ``o = 0`` and ``lse = +inf``; with ``lse = +inf`` their
probabilities in the backward are ``exp(s - inf) = 0``, so they add nothing to dk/dv
and get ``dq = 0``. Padding keys are loaded as 0 and masked, padding queries are
loaded as 0 where they could reach another row, so whatever the inputs hold at
padding positions (even NaN) never reaches a valid output: callers need not clean
them. Every output element is stored by some program (blocks with empty lists write
zeros).

Autotuning is keyed by the block size, head dim and power-of-two buckets of the
sequence length and of B * H, so a config tuned on a small layout is not reused at
15k or 125k tokens; :func:`tuned_configs` reports what was chosen.

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
    "LaunchPlan",
    "backward_prepared",
    "block_sparse_attention_backward",
    "block_sparse_attention_forward",
    "forward_prepared",
    "plan_from_block_lists",
    "plan_from_lists",
    "tuned_configs",
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


# (num_warps, num_stages) candidates. The backward (five dots per iteration) is offered
# deeper pipelines too (it used to try only 1-2 stages); the benchmark records the pick.
_FWD_CONFIGS = _autotune_configs([(4, 2), (4, 3), (8, 2), (8, 3), (4, 4)])
_BWD_CONFIGS = _autotune_configs([(4, 1), (4, 2), (4, 3), (4, 4), (8, 1), (8, 2), (8, 3)])
# TUNE_N / TUNE_BH: power-of-two buckets of the sequence length and of B * H (plain
# int arguments the kernels ignore), so each size class is tuned at its own shape.
_TUNE_KEY = ["BLOCK", "HEAD_DIM", "TUNE_N", "TUNE_BH"]


def _bucket(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


@triton.jit
def _program_block(pid, ORDER, NB, BH, N_LONG):
    """(block, batch-head) of program ``pid``: the N_LONG long blocks first (all heads of
    one block together), then per batch-head the other blocks in ``ORDER``."""
    n_first = N_LONG * BH
    n_rest = tl.maximum(NB - N_LONG, 1)
    rest = tl.maximum(pid - n_first, 0)
    first = pid < n_first
    rank = tl.where(first, pid // BH, N_LONG + rest % n_rest)
    bh = tl.where(first, pid % BH, rest // n_rest)
    return tl.load(ORDER + rank), bh.to(tl.int64)


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
    FULL_PTR, FULL_IDX, PART_PTR, PART_IDX, ORDER,
    N, NB, BH, N_LONG, qk_scale, TUNE_N, TUNE_BH,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    qb, bh = _program_block(tl.program_id(0), ORDER, NB, BH, N_LONG)
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    base = bh * N * HEAD_DIM

    # Query rows are row-local here: a padding row's garbage stays in its own row,
    # which is overwritten below.
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
    # Padding rows (lse = +inf) get delta = 0 even if do holds NaN there.
    qvalid = tl.load(LSE + bh * N + offs_m) != float("inf")
    o = tl.load(O + ptrs, mask=qvalid[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=qvalid[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bh * N + offs_m, tl.sum(o * do, 1))


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
def _bwd_kernel(
    Q, K, V, DO, DQ, DK, DV, LSE, DELTA, KVALID,
    Q2K_FULL_PTR, Q2K_FULL_IDX, Q2K_PART_PTR, Q2K_PART_IDX,
    K2Q_FULL_PTR, K2Q_FULL_IDX, K2Q_PART_PTR, K2Q_PART_IDX, ORDER,
    N, NB, BH, N_LONG, qk_scale, scale, TUNE_N, TUNE_BH,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    blk, bh = _program_block(tl.program_id(0), ORDER, NB, BH, N_LONG)
    offs_blk = blk * BLOCK + tl.arange(0, BLOCK)
    offs_t = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    base = bh * N * HEAD_DIM
    tile = base + offs_blk[:, None] * HEAD_DIM + offs_d[None, :]

    # Phase 1: dk, dv of this block as a key block (k2q lists).
    kvalid = tl.load(KVALID + offs_blk) != 0
    k = tl.load(K + tile, mask=kvalid[:, None], other=0.0)
    k = (k.to(tl.float32) * qk_scale).to(k.dtype)
    v = tl.load(V + tile, mask=kvalid[:, None], other=0.0)
    dk = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    dk, dv = _bwd_dkdv_inner(
        dk, dv, k, v, kvalid, Q + base, DO + base, LSE + bh * N, DELTA + bh * N, K2Q_FULL_IDX,
        tl.load(K2Q_FULL_PTR + blk), tl.load(K2Q_FULL_PTR + blk + 1), offs_t, offs_d,
        HEAD_DIM, BLOCK, False, PRECISION,
    )
    dk, dv = _bwd_dkdv_inner(
        dk, dv, k, v, kvalid, Q + base, DO + base, LSE + bh * N, DELTA + bh * N, K2Q_PART_IDX,
        tl.load(K2Q_PART_PTR + blk), tl.load(K2Q_PART_PTR + blk + 1), offs_t, offs_d,
        HEAD_DIM, BLOCK, True, PRECISION,
    )
    tl.store(DK + tile, (dk * scale).to(DK.dtype.element_ty))
    tl.store(DV + tile, dv.to(DV.dtype.element_ty))

    # Phase 2: dq of this block as a query block (q2k lists).
    q = tl.load(Q + tile)
    q = (q.to(tl.float32) * qk_scale).to(q.dtype)
    do = tl.load(DO + tile)
    # lse is natural-log; scores are base-2 logits. Padding rows: lse = +inf -> p = 0.
    lse2 = tl.load(LSE + bh * N + offs_blk) * 1.4426950408889634
    delta = tl.load(DELTA + bh * N + offs_blk)
    dq = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, K + base, V + base, KVALID, Q2K_FULL_IDX,
        tl.load(Q2K_FULL_PTR + blk), tl.load(Q2K_FULL_PTR + blk + 1), offs_t, offs_d,
        HEAD_DIM, BLOCK, False, PRECISION,
    )
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, K + base, V + base, KVALID, Q2K_PART_IDX,
        tl.load(Q2K_PART_PTR + blk), tl.load(Q2K_PART_PTR + blk + 1), offs_t, offs_d,
        HEAD_DIM, BLOCK, True, PRECISION,
    )
    # Padding rows (lse = +inf) are row-local garbage if q/do hold NaN there: write 0.
    dq = tl.where((lse2 != float("inf"))[:, None], dq * scale, 0.0)
    tl.store(DQ + tile, dq.to(DQ.dtype.element_ty))


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


def _check_lists(lists, num_blocks: int, device: torch.device) -> None:
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


class LaunchPlan:
    """What a launch needs besides q, k, v: int32 CSR lists, int8 validity masks, the
    program orders (see the module docstring) and the block size, all on one device.

    ``volumevlm.ops.layout.BlockLists`` carries all of this, prepared once per layout
    and device; :func:`plan_from_lists` builds one from bare lists (checked, and with
    a device sync to order the programs: not for a hot path).
    """

    __slots__ = ("lists", "key_valid_i8", "query_valid_i8", "fwd_order", "fwd_long", "bwd_order", "bwd_long",
                 "num_blocks", "block_size")

    def __init__(self, lists, key_valid_i8, query_valid_i8, fwd_order, fwd_long, bwd_order, bwd_long, num_blocks, block_size):
        self.lists = lists
        self.key_valid_i8, self.query_valid_i8 = key_valid_i8, query_valid_i8
        self.fwd_order, self.fwd_long = fwd_order, int(fwd_long)
        self.bwd_order, self.bwd_long = bwd_order, int(bwd_long)
        self.num_blocks, self.block_size = int(num_blocks), int(block_size)


def plan_from_block_lists(lists) -> LaunchPlan:
    """The plan carried by a prepared ``BlockLists`` (no checks, no copies)."""
    return LaunchPlan(lists, lists.key_valid_i8, lists.query_valid_i8, lists.fwd_order, lists.fwd_long,
                      lists.bwd_order, lists.bwd_long, lists.num_blocks, lists.block_size)


def _order(lengths: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Host-side program order of bare lists: blocks with lists over 3x the median
    first, longest first (the rule ``volumevlm.ops.layout.program_order`` applies)."""
    lengths = lengths.cpu().long()
    nb = lengths.numel()
    nonzero = lengths[lengths > 0].double()
    median = float(nonzero.quantile(0.5)) if nonzero.numel() else 0.0
    long_blocks = torch.nonzero(lengths > 3.0 * max(median, 1.0)).flatten()
    long_blocks = long_blocks[torch.argsort(-lengths[long_blocks], stable=True)][: max(nb - 1, 0)]
    is_long = torch.zeros(nb, dtype=torch.bool)
    is_long[long_blocks] = True
    order = torch.cat([long_blocks, torch.nonzero(~is_long).flatten()])
    return order.to(torch.int32), int(long_blocks.numel())


def plan_from_lists(lists, key_valid, query_valid, block_size: int, n: int, device) -> LaunchPlan:
    """A checked plan from bare CSR lists (any object with the eight tensors) and bool masks."""
    _check_block_size(block_size)
    num_blocks = n // block_size
    _check_lists(lists, num_blocks, device)
    kvalid = _check_mask("key_valid", key_valid, n, device)
    qvalid = _check_mask("query_valid", query_valid, n, device)
    q2k = lists.q2k_full_indptr.diff() + lists.q2k_part_indptr.diff()
    k2q = lists.k2q_full_indptr.diff() + lists.k2q_part_indptr.diff()
    fwd_order, fwd_long = _order(q2k)
    bwd_order, bwd_long = _order(q2k + k2q)
    return LaunchPlan(lists, kvalid, qvalid, fwd_order.to(device), fwd_long, bwd_order.to(device), bwd_long,
                      num_blocks, block_size)


def forward_prepared(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: LaunchPlan, scale: float):
    """The forward launch alone: q, k, v contiguous [B, H, N, D] of one dtype on the
    plan's device (the caller has checked them). Returns (o, lse fp32 [B, H, N])."""
    b, h, n, d = q.shape
    lists = plan.lists
    o = torch.empty_like(q)
    lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    bh = b * h
    _fwd_kernel[(plan.num_blocks * bh,)](
        q, k, v, o, lse, plan.key_valid_i8, plan.query_valid_i8,
        lists.q2k_full_indptr, lists.q2k_full_idx, lists.q2k_part_indptr, lists.q2k_part_idx, plan.fwd_order,
        n, plan.num_blocks, bh, plan.fwd_long, float(scale) * _LOG2E, _bucket(n), _bucket(bh),
        HEAD_DIM=d, BLOCK=plan.block_size, PRECISION=_precision(q.dtype),
    )
    return o, lse


def backward_prepared(do, q, k, v, o, lse, plan: LaunchPlan, scale: float):
    """The backward launches alone (delta, then the fused dk/dv + dq kernel): all
    tensors contiguous, as :func:`forward_prepared` left them. Returns dq, dk, dv."""
    b, h, n, d = q.shape
    lists = plan.lists
    bh = b * h
    delta = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(plan.num_blocks, bh)](o, do, lse, delta, n, HEAD_DIM=d, BLOCK=plan.block_size)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _bwd_kernel[(plan.num_blocks * bh,)](
        q, k, v, do, dq, dk, dv, lse, delta, plan.key_valid_i8,
        lists.q2k_full_indptr, lists.q2k_full_idx, lists.q2k_part_indptr, lists.q2k_part_idx,
        lists.k2q_full_indptr, lists.k2q_full_idx, lists.k2q_part_indptr, lists.k2q_part_idx, plan.bwd_order,
        n, plan.num_blocks, bh, plan.bwd_long, float(scale) * _LOG2E, float(scale), _bucket(n), _bucket(bh),
        HEAD_DIM=d, BLOCK=plan.block_size, PRECISION=_precision(q.dtype),
    )
    return dq, dk, dv


def tuned_configs() -> dict[str, dict[str, str]]:
    """The autotuner's choice per kernel and key (block, head dim, N bucket, B*H bucket,
    then dtypes), as strings: what a benchmark records next to its timings."""
    out = {}
    for name, kernel in (("forward", _fwd_kernel), ("backward", _bwd_kernel)):
        out[name] = {str(key): str(config) for key, config in getattr(kernel, "cache", {}).items()}
    return out


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
    """Block-sparse softmax attention, forward (every argument checked).

    q, k, v: [B, H, N, D] fp16/bf16/fp32 on CUDA (CPU under TRITON_INTERPRET=1), tokens in
    layout order, N = num_blocks * block_size, D a power of two in 16..128.
    lists: ``volumevlm.ops.layout.BlockLists`` (or any object with its eight int32 CSR
    tensors ``q2k_full_indptr`` ... ``k2q_part_idx``, on q's device).
    key_valid, query_valid: bool [N].
    scale: the softmax scale (usually D ** -0.5).
    Returns o [B, H, N, D] (q's dtype; 0 on padding queries) and lse fp32 [B, H, N]
    (natural-log logsumexp of the scaled scores; +inf on padding queries).
    The op ``volumevlm.ops.sparse_attention`` calls :func:`forward_prepared` instead,
    with a plan its layout prepared once.
    """
    b, h, n, d = _check_tensors(("q", "k", "v"), (q, k, v), block_size)
    plan = plan_from_lists(lists, key_valid, query_valid, block_size, n, q.device)
    _check_device(q)
    return forward_prepared(q.contiguous(), k.contiguous(), v.contiguous(), plan, scale)


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
    """Block-sparse softmax attention, backward (every argument checked).

    do, q, k, v, o: [B, H, N, D] of one dtype (as in the forward); lse: fp32 [B, H, N]
    from the forward (+inf on padding queries). Returns dq, dk, dv [B, H, N, D] in q's
    dtype; dq is 0 on padding queries, dk and dv are 0 on padding keys and on keys
    no query attends.
    """
    b, h, n, d = _check_tensors(("q", "k", "v", "o", "do"), (q, k, v, o, do), block_size)
    # The backward never reads query_valid (padding queries are known by lse = +inf).
    plan = plan_from_lists(lists, key_valid, key_valid, block_size, n, q.device)
    if lse.shape != (b, h, n) or lse.dtype != torch.float32 or lse.device != q.device:
        raise KernelArgumentError("lse", f"expected float32 [{b}, {h}, {n}] on {q.device}, got {lse.dtype} {tuple(lse.shape)}")
    _check_device(q)
    q, k, v, o, do, lse = (t.contiguous() for t in (q, k, v, o, do, lse))
    return backward_prepared(do, q, k, v, o, lse, plan, scale)
