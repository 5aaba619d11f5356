"""Dense masked attention in float64: the ground truth the sparse paths are tested against."""

from __future__ import annotations

import math

import torch

from volumevlm.ops.layout import AttentionLayout


def dense_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, scale: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale, masked by ``layout.dense_mask()``) v, computed in float64.

    q, k, v: [B, H, N, D] in layout order (N == layout.seq_len), any float dtype.
    Returns float64 [B, H, N, D]; rows of padding queries are exactly 0. Builds an
    N x N matrix: for tests and small layouts only. Differentiable.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    mask = layout.dense_mask().to(q.device)
    qv = layout.query_valid.to(q.device)
    # Padding rows/columns may hold NaN on purpose (poisoning tests): zero them before the matmul.
    zero = torch.zeros((), dtype=torch.float64, device=q.device)
    q64, k64, v64 = (torch.where(qv[:, None], x.double(), zero) for x in (q, k, v))
    s = torch.matmul(q64, k64.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    # Padding query rows are all -inf: give them a finite row, then zero their output.
    s = s.masked_fill(~qv[:, None], 0.0)
    o = torch.matmul(torch.softmax(s, dim=-1), v64)
    return torch.where(qv[:, None], o, zero)
