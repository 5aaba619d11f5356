"""The public block-sparse attention op and its dispatch (Triton kernels, dense SDPA or the torch path).

Call path. Everything a call needs on a device (block lists, int8 masks, program
orders, index vectors, the dense bias) is built on the first call per layout and
device and cached on the layout; every decision is taken on host numbers fixed when
the layout was built. So after the first call a forward or backward builds no mask,
copies nothing from the host and never waits on the device (no ``.item()``, no
``bool()`` of a tensor): ``tests/test_sparse_attention.py`` counts both.

Backends:

* ``"triton"``: the block-sparse kernels of ``volumevlm_kernels``. They mask padding
  themselves, so inputs are passed as they are (no cleaning copies).
* ``"dense"``: one ``scaled_dot_product_attention`` call on the *valid* tokens only
  (padding gathered out, results scattered back). A dense layout needs no mask at all,
  so flash / cuDNN run; a sparse layout passes its cached additive bias over the valid
  tokens (a float bias: the memory-efficient kernel takes it, flash takes no mask at all).
* ``"torch"``: the block-gathered pure-torch path (any device); layouts of density 1
  take the dense branch.

``backend=None`` follows :func:`choose_backend`.

Under ``torch.compile`` the Triton and torch paths run as registered torch ops
(``volumevlm::block_sparse_attention`` and its backward, with fake implementations and
an autograd formula), so a compiled model traces through them without graph breaks.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from volumevlm.errors import InputError, VolumeVLMError
from volumevlm.ops import torch_path
from volumevlm.ops.layout import AttentionLayout, layout_by_key

__all__ = ["sparse_attention", "torch_block_sparse", "choose_backend", "BACKENDS"]

BACKENDS = ("triton", "torch", "dense")

_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# ----------------------------------------------------------------------- dispatch
# backend=None on CUDA. The kernels run whole T x T tiles (padding included), so their
# work relative to dense attention over the valid tokens is layout.executed_fraction.
# Dense SDPA with the layout's bias (same function, all num_valid^2 pairs computed)
# should win when that fraction is not clearly below 1 (tuned dense kernels run closer
# to peak than a block-sparse one) or when the whole problem is so small that launches
# cost more than the arithmetic.
#
# These three numbers are first guesses, NOT measurements: they await calibration by
# `benchmarks/attention.py` on a GPU (its "model layouts" rows time the kernels, dense
# SDPA and the dispatch side by side at the models' shapes and record the outcome).
SPARSE_MAX_EXECUTED_FRACTION = 0.5
# Dense forward FLOPs (4 * B * H * num_valid^2 * D) below which dense SDPA is taken.
SMALL_PROBLEM_DENSE_FLOPS = 1e10
# A sparse layout sent to dense SDPA needs a num_valid^2 bias (cached per device and
# dtype): above this many elements the kernels are used whatever the ratio.
DENSE_BIAS_MAX_ELEMENTS = 4096 * 4096

# CPU: the torch path. On 2 CPU cores (fp32, d=64, 4k tokens) its blocked branch beats
# SDPA with the dense boolean mask in the forward at every density < 1 (34 vs 74 ms at
# density 0.48, 58 vs 73 ms at 0.875) and is within ~10 % of it in forward+backward
# above density 0.8, while needing no N x N mask; at 88-92 % sparsity it is 5-8x
# faster than dense SDPA without a mask (benchmarks/attention.py --cpu).

_KERNELS_IMPORTABLE: bool | None = None


def _kernels():
    try:
        import volumevlm_kernels as kernels

        return kernels
    except (ImportError, AttributeError) as exc:
        raise VolumeVLMError(f"sparse_attention: the Triton kernels (volumevlm_kernels) are unavailable: {exc}") from None


def _kernels_importable() -> bool:
    global _KERNELS_IMPORTABLE
    if _KERNELS_IMPORTABLE is None:
        try:
            _kernels()
            _KERNELS_IMPORTABLE = True
        except VolumeVLMError:
            _KERNELS_IMPORTABLE = False
    return _KERNELS_IMPORTABLE


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _kernels_support(layout: AttentionLayout, head_dim: int) -> bool:
    """True when the Triton kernels take this layout and head dim (block size a power of
    two >= 16, head dim a power of two in 16..128) and the kernels import."""
    if not (_power_of_two(layout.block_size) and layout.block_size >= 16):
        return False
    if not (_power_of_two(head_dim) and 16 <= head_dim <= 128):
        return False
    return _kernels_importable()


def choose_backend(layout: AttentionLayout, batch_heads: int, head_dim: int, on_cuda: bool) -> str:
    """The backend ``sparse_attention(backend=None)`` uses, from host numbers only.

    * a dense layout (density 1: every valid pair attended) -> ``"dense"`` (no mask);
    * not on CUDA, or a shape the kernels do not take -> ``"torch"``;
    * ``"dense"`` (with the layout's bias over the valid tokens) when the kernels'
      executed work is not clearly below dense (``SPARSE_MAX_EXECUTED_FRACTION``) or the
      problem is small (``SMALL_PROBLEM_DENSE_FLOPS``), and the bias is affordable
      (``DENSE_BIAS_MAX_ELEMENTS``);
    * ``"triton"`` otherwise.
    """
    if layout.density >= 1.0:
        return "dense"
    if not on_cuda or not _kernels_support(layout, head_dim):
        return "torch"
    dense_flops = 4.0 * batch_heads * float(layout.num_valid) ** 2 * head_dim
    dense_is_cheaper = layout.executed_fraction > SPARSE_MAX_EXECUTED_FRACTION or dense_flops < SMALL_PROBLEM_DENSE_FLOPS
    if dense_is_cheaper and layout.num_valid**2 <= DENSE_BIAS_MAX_ELEMENTS:
        return "dense"
    return "triton"


# ------------------------------------------------------------------ dense branch
def _dense_sdpa(q, k, v, layout: AttentionLayout, scale: float) -> torch.Tensor:
    """One SDPA call on the valid tokens; autograd through torch.

    Padding is gathered out (so no key-padding mask is needed and padding inputs,
    whatever they hold, are never read), and the output is scattered back with zeros
    at padding rows. A sparse layout adds its cached additive bias over the valid tokens.
    """
    device = q.device
    if layout.has_padding:
        idx = layout.cached("valid_index", device)
        qv, kv, vv = (x.index_select(2, idx) for x in (q, k, v))
    else:
        qv, kv, vv = q, k, v
    bias = None if layout.density >= 1.0 else layout.dense_bias(device, q.dtype)
    o = F.scaled_dot_product_attention(qv, kv, vv, attn_mask=bias, scale=scale)
    if not layout.has_padding:
        return o
    return q.new_zeros(q.shape).index_copy(2, idx, o)


# -------------------------------------------------------- block-sparse branches
def _plan(layout: AttentionLayout, device: torch.device):
    """The kernels' launch plan for ``layout`` on ``device`` (built once, cached)."""
    key = f"triton_plan@{device}"
    plan = layout._derived.get(key)
    if plan is None:
        plan = _kernels().plan_from_block_lists(layout.block_lists(device))
        layout._derived[key] = plan
    return plan


def _triton_forward(q, k, v, layout: AttentionLayout, scale: float):
    return _kernels().forward_prepared(q.contiguous(), k.contiguous(), v.contiguous(), _plan(layout, q.device), scale)


def _triton_backward(do, q, k, v, o, lse, layout: AttentionLayout, scale: float):
    return _kernels().backward_prepared(do.contiguous(), q, k, v, o, lse, _plan(layout, q.device), scale)


def _torch_forward(q, k, v, layout: AttentionLayout, scale: float):
    q, k, v = (x.contiguous() for x in torch_path.clean_inputs(layout, q, k, v))
    return torch_path.forward(q, k, v, layout, scale)


def _torch_backward(do, q, k, v, o, lse, layout: AttentionLayout, scale: float):
    # The torch path's matmuls would carry NaN from padding rows into valid sums: clean.
    q, k, v, do = (x.contiguous() for x in torch_path.clean_inputs(layout, q, k, v, do))
    return torch_path.backward(do, q, k, v, o, lse, layout, scale)


_IMPLS = {"triton": (_triton_forward, _triton_backward), "torch": (_torch_forward, _torch_backward)}


class _BlockSparse(torch.autograd.Function):
    """Eager autograd wrapper (the lowest per-call cost); the registered op below wraps
    the same functions for torch.compile."""

    @staticmethod
    def forward(ctx, q, k, v, layout: AttentionLayout, scale: float, impl: str):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = _IMPLS[impl][0](q, k, v, layout, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout, ctx.scale, ctx.impl = layout, scale, impl
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _IMPLS[ctx.impl][1](do, q, k, v, o, lse, ctx.layout, ctx.scale)
        return dq, dk, dv, None, None, None


# ------------------------------------------------- registered ops (torch.compile)
@torch.library.custom_op("volumevlm::block_sparse_attention", mutates_args=())
def block_sparse_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout_key: int, scale: float, impl: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) of the block-sparse op; ``layout_key`` is ``layout.op_key``."""
    return _IMPLS[impl][0](q, k, v, layout_by_key(layout_key), scale)


@block_sparse_attention_op.register_fake
def _(q, k, v, layout_key, scale, impl):
    lse_dtype = torch.float64 if (impl == "torch" and q.dtype == torch.float64) else torch.float32
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=lse_dtype)


@torch.library.custom_op("volumevlm::block_sparse_attention_backward", mutates_args=())
def block_sparse_attention_backward_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    layout_key: int, scale: float, impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the block-sparse op."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _IMPLS[impl][1](do, q, k, v, o, lse, layout_by_key(layout_key), scale)


@block_sparse_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, layout_key, scale, impl):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, layout_key, scale, impl = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.layout_key, ctx.scale, ctx.impl = layout_key, scale, impl


def _op_backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = block_sparse_attention_backward_op(do, q, k, v, o, lse, ctx.layout_key, ctx.scale, ctx.impl)
    return dq, dk, dv, None, None, None


block_sparse_attention_op.register_autograd(_op_backward, setup_context=_setup_context)


def _block_sparse(q, k, v, layout: AttentionLayout, scale: float, impl: str) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return block_sparse_attention_op(q, k, v, layout.op_key, scale, impl)[0]
    return _BlockSparse.apply(q, k, v, layout, scale, impl)


def torch_block_sparse(q, k, v, layout: AttentionLayout, scale: float | None = None) -> torch.Tensor:
    """The block-gathered torch path alone (no dense-SDPA routing): same contract as
    :func:`sparse_attention`; used by tests and benchmarks to measure this path."""
    _check(q, k, v, layout)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _block_sparse(q, k, v, layout, scale, "torch")


def _check(q, k, v, layout) -> None:
    if not isinstance(layout, AttentionLayout):
        raise InputError("sparse_attention", f"layout must be an AttentionLayout, got {type(layout).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise InputError("sparse_attention", f"{name} must be a 4-D tensor [B, H, N, D], got {getattr(t, 'shape', type(t))}")
    if not (q.shape == k.shape == v.shape):
        raise InputError("sparse_attention", f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] != layout.seq_len:
        raise InputError("sparse_attention", f"N = {q.shape[2]} but the layout has seq_len {layout.seq_len} ({layout!r})")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise InputError("sparse_attention", f"q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype}")
    allowed = _GPU_DTYPES if q.is_cuda else _CPU_DTYPES
    if q.dtype not in allowed:
        raise InputError("sparse_attention", f"dtype {q.dtype} is not supported on {q.device.type}")


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: AttentionLayout,
    backend: str | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Block-sparse softmax attention over a 3D layout.

    Args:
        q, k, v: [B, H, N, D] in layout order (``N == layout.seq_len``; build the
            sequence with ``layout.to_layout``). dtypes: float16 / bfloat16 /
            float32 on CUDA; float32 / float64 (bfloat16 / float16 accepted) on CPU.
            Accumulation is float32 (float64 for float64 inputs).
        layout: an :class:`~volumevlm.ops.layout.AttentionLayout` from
            ``attention_layout(grid, tile, window, dilation, num_global)``.
            Query ``i`` attends key ``j`` iff ``layout.dense_mask()[i, j]``:
            key tiles within the (dilated) window of the query's tile, every global
            token both ways, never padding.
        backend: None -> :func:`choose_backend`: dense layouts and, on CUDA, layouts
            whose block-sparse work is not clearly below dense (or tiny problems) run
            dense SDPA on the valid tokens; other CUDA layouts the Triton kernels (block
            size a power of two >= 16, head dim a power of two in 16..128); the rest
            the torch path. "triton" forces the kernels (on CPU only with
            ``TRITON_INTERPRET=1``); "torch" forces the pure-torch path (any device),
            which gathers each query block's key blocks, or, for layouts of density 1,
            calls dense SDPA; "dense" forces one SDPA call on the valid tokens (with
            the layout's additive bias when the layout is sparse: O(num_valid^2) memory).
        scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        [B, H, N, D] in q's dtype: ``softmax(q k^T * scale) v`` restricted to the
        layout; exactly 0 at padding positions (whatever the inputs hold there).
        Differentiable in q, k, v (custom backward recomputing the probabilities
        from the saved log-sum-exp; no N x N matrix is materialised by the
        block-sparse paths).
    """
    _check(q, k, v, layout)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend is None:
        backend = choose_backend(layout, q.shape[0] * q.shape[1], q.shape[-1], q.is_cuda)
    if backend == "dense":
        return _dense_sdpa(q, k, v, layout, scale)
    if backend == "triton":
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise VolumeVLMError(
                f"sparse_attention: backend 'triton' needs a CUDA tensor (got {q.device}); "
                "set TRITON_INTERPRET=1 to run the kernels in the interpreter, or use backend='torch'"
            )
        _kernels()  # a clear error if the kernels do not import
        return _block_sparse(q, k, v, layout, scale, "triton")
    if backend == "torch":
        if layout.density >= 1.0:
            return _dense_sdpa(q, k, v, layout, scale)
        if not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        ):
            # Inference: the same computation without the autograd.Function, which
            # TorchScript tracing cannot record (MONAI bundle export traces this path).
            return _torch_forward(q, k, v, layout, scale)[0]
        return _block_sparse(q, k, v, layout, scale, "torch")
    raise InputError("sparse_attention", f"backend must be None or one of {BACKENDS}, got {backend!r}")
