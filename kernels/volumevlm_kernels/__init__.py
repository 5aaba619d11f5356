"""Triton block-sparse attention kernels (forward and backward), imported as ``volumevlm_kernels``.

The public op is ``volumevlm.ops.sparse_attention``; these are its CUDA launch functions
(also runnable on CPU tensors under ``TRITON_INTERPRET=1``, set before import).
``block_sparse_attention_forward`` / ``_backward`` check every argument; the op uses
``forward_prepared`` / ``backward_prepared`` with a plan its layout built once.
"""

from volumevlm_kernels.block_sparse_attention import (
    KernelArgumentError,
    LaunchPlan,
    backward_prepared,
    block_sparse_attention_backward,
    block_sparse_attention_forward,
    forward_prepared,
    plan_from_block_lists,
    plan_from_lists,
    tuned_configs,
)

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
