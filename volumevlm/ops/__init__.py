"""Attention ops: block-sparse 3D layouts and the public ``sparse_attention`` entry point."""

from volumevlm.ops import torch_path
from volumevlm.ops.attention import BACKENDS, choose_backend, sparse_attention, torch_block_sparse
from volumevlm.ops.layout import AttentionLayout, BlockLists, attention_layout
from volumevlm.ops.reference import dense_reference

__all__ = [
    "AttentionLayout",
    "BACKENDS",
    "BlockLists",
    "attention_layout",
    "choose_backend",
    "dense_reference",
    "sparse_attention",
    "torch_block_sparse",
]
