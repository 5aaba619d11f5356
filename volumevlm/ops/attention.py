"""The public block-sparse attention op and its dispatch (Triton kernels or the torch path)."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from volumevlm.errors import InputError, VolumeVLMError
from volumevlm.ops import torch_path
from volumevlm.ops.layout import AttentionLayout

__all__ = ["sparse_attention", "torch_block_sparse", "BACKENDS"]

BACKENDS = ("triton", "torch")

_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Routing of the torch backend. A layout whose pattern is effectively dense (density 1:
# every valid query attends every valid key, e.g. window=None or a window covering the
# grid) goes to one fused dense SDPA call with at most a [1, N] key mask. Every other
# layout takes the blocked path: on 2 CPU cores (fp32, d=64, 4k tokens) it beats SDPA
# with the dense boolean mask in the forward at every density < 1 (34 vs 74 ms at
# density 0.48, 58 vs 73 ms at 0.875) and is within ~10 % of it in forward+backward
# above density 0.8, while needing no N x N mask; at 88-92 % sparsity it is 5-8x
# faster than dense SDPA without a mask (benchmarks/attention.py --cpu).


class _TorchBlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout: AttentionLayout, scale: float):
        q, k, v = (x.contiguous() for x in torch_path.clean_inputs(layout, q, k, v))
        o, lse = torch_path.forward(q, k, v, layout, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout, ctx.scale = layout, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        (do,) = torch_path.clean_inputs(ctx.layout, do.contiguous())
        dq, dk, dv = torch_path.backward(do, q, k, v, o, lse, ctx.layout, ctx.scale)
        return dq, dk, dv, None, None


def torch_block_sparse(q, k, v, layout: AttentionLayout, scale: float | None = None) -> torch.Tensor:
    """The block-gathered torch path alone (no dense-SDPA routing): same contract as
    :func:`sparse_attention`; used by tests and benchmarks to measure this path."""
    _check(q, k, v, layout)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _TorchBlockSparse.apply(q, k, v, layout, scale)


def _kernels():
    try:
        import volumevlm_kernels as kernels

        return kernels.block_sparse_attention_forward, kernels.block_sparse_attention_backward
    except (ImportError, AttributeError) as exc:
        raise VolumeVLMError(f"sparse_attention: the Triton kernels (volumevlm_kernels) are unavailable: {exc}") from None


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _kernels_support(layout: AttentionLayout, head_dim: int) -> bool:
    """True when the Triton kernels take this layout and head dim (block size a power of
    two >= 16, head dim a power of two in 16..128) and the kernels import."""
    if not (_power_of_two(layout.block_size) and layout.block_size >= 16):
        return False
    if not (_power_of_two(head_dim) and 16 <= head_dim <= 128):
        return False
    try:
        _kernels()
    except VolumeVLMError:
        return False
    return True


class _TritonBlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout: AttentionLayout, scale: float):
        fwd, _ = _kernels()
        lists = layout.block_lists(q.device)
        q, k, v = (x.contiguous() for x in torch_path.clean_inputs(layout, q, k, v))
        o, lse = fwd(q, k, v, lists, lists.key_valid, lists.query_valid, layout.block_size, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout, ctx.scale = layout, scale
        return o

    @staticmethod
    def backward(ctx, do):
        _, bwd = _kernels()
        q, k, v, o, lse = ctx.saved_tensors
        layout = ctx.layout
        lists = layout.block_lists(q.device)
        (do,) = torch_path.clean_inputs(layout, do.contiguous())
        dq, dk, dv = bwd(do.contiguous(), q, k, v, o, lse, lists, lists.key_valid, layout.block_size, ctx.scale)
        return dq, dk, dv, None, None


def _use_dense_sdpa(layout: AttentionLayout) -> bool:
    """True when every valid query attends every valid key (no N x N mask needed)."""
    return layout.density >= 1.0


def _dense_sdpa(q, k, v, layout: AttentionLayout, scale: float) -> torch.Tensor:
    """Effectively dense layouts: one fused SDPA call (autograd through torch)."""
    q, k, v = torch_path.clean_inputs(layout, q, k, v)
    valid = layout._index("key_valid", q.device)
    # Only padding keys are masked: a broadcast [1, N] mask, never N x N. Padding
    # queries then see the valid keys (no NaN); their output is zeroed below.
    mask = None if bool(valid.all()) else valid[None, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return torch.where(valid[:, None], o, torch.zeros((), dtype=o.dtype, device=o.device))


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
        backend: None -> "triton" on CUDA when the kernels take the shapes (block
            size a power of two >= 16, head dim a power of two in 16..128), else
            "torch"; "triton" forces the kernels (on CPU only with
            ``TRITON_INTERPRET=1``); "torch" forces the pure-torch path (any device),
            which gathers each query block's key blocks, or, for layouts of
            density 1 (every valid pair attended), calls dense
            ``scaled_dot_product_attention`` with a key-padding mask.
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
        backend = "triton" if q.is_cuda and _kernels_support(layout, q.shape[-1]) else "torch"
    if backend == "triton":
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise VolumeVLMError(
                f"sparse_attention: backend 'triton' needs a CUDA tensor (got {q.device}); "
                "set TRITON_INTERPRET=1 to run the kernels in the interpreter, or use backend='torch'"
            )
        return _TritonBlockSparse.apply(q, k, v, layout, scale)
    if backend == "torch":
        if _use_dense_sdpa(layout):
            return _dense_sdpa(q, k, v, layout, scale)
        if not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))):
            # Inference: the same computation without the autograd.Function, which
            # TorchScript tracing cannot record (MONAI bundle export traces this path).
            q, k, v = (x.contiguous() for x in torch_path.clean_inputs(layout, q, k, v))
            return torch_path.forward(q, k, v, layout, scale)[0]
        return _TorchBlockSparse.apply(q, k, v, layout, scale)
    raise InputError("sparse_attention", f"backend must be None or one of {BACKENDS}, got {backend!r}")
