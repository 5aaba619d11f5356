"""Validation figures of pretraining: retrieval recall@k and macro AUROC.

Both take plain tensors so that the training loop, tests and (later) evaluation
protocols compute them one way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics.functional.classification import binary_auroc


def retrieval_recall(queries: torch.Tensor, keys: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Recall@k of retrieving key i for query i.

    queries, keys: [N, E] embeddings (unit length for cosine similarity), row i of
    each belonging to the same case. A tie with the correct key counts against it
    (rank = 1 + number of keys scoring at least as high, other than the correct one),
    so a collapsed model scores no better than chance. Returns {k: fraction in [0, 1]}.
    """
    if queries.shape != keys.shape or queries.ndim != 2:
        raise ValueError(f"queries and keys must both be [N, E], got {tuple(queries.shape)} and {tuple(keys.shape)}")
    n = queries.shape[0]
    if n == 0:
        return {int(k): math.nan for k in ks}
    sims = queries.float() @ keys.float().T  # [N, N]
    correct = sims.diagonal().unsqueeze(1)
    others = ~torch.eye(n, dtype=torch.bool, device=sims.device)
    rank = 1 + ((sims >= correct) & others).sum(dim=1)  # [N]
    return {int(k): float((rank <= k).float().mean()) for k in ks}


def macro_auroc(scores: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """Mean AUROC over the columns that hold both classes.

    scores: [N, K] float (any monotone score, e.g. probability or logit);
    targets: [N, K] 0/1. Returns (macro AUROC, number of columns used); NaN and 0 when
    no column has both a positive and a negative case.
    """
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores and targets must both be [N, K], got {tuple(scores.shape)} and {tuple(targets.shape)}")
    targets = targets.long()
    values = []
    for column in range(scores.shape[1]):
        t = targets[:, column]
        positives = int(t.sum())
        if 0 < positives < t.numel():
            values.append(float(binary_auroc(scores[:, column].float(), t)))
    if not values:
        return math.nan, 0
    return sum(values) / len(values), len(values)
