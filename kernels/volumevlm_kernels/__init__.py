"""Triton block-sparse attention kernels (forward and backward), imported as ``volumevlm_kernels``.

The public op is ``volumevlm.ops.sparse_attention``; these are its CUDA launch functions
(also runnable on CPU tensors under ``TRITON_INTERPRET=1``, set before import).
"""

from volumevlm_kernels.block_sparse_attention import (
    KernelArgumentError,
    block_sparse_attention_backward,
    block_sparse_attention_forward,
)

__all__ = ["KernelArgumentError", "block_sparse_attention_backward", "block_sparse_attention_forward"]
