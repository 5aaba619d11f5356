"""Yardsticks for a representation: logistic probes fitted on one split, scored on another.

``linear_probe``
    a logistic regression per finding on the frozen image embeddings.
``baseline.voxel_probe``
    the same regression on features that need no model: the preprocessed volume averaged
    over a coarse grid of cells (:data:`VOXEL_GRID`) plus its HU histogram
    (:data:`HU_BINS` bins over the preprocessing window). What a foundation model's
    embedding must beat: if a probe on pooled voxels reads the findings better than a
    probe on the embedding, the encoder has thrown information away.

Both use scikit-learn (standardization, then ``LogisticRegressionCV``: the L2 strength is
chosen by stratified cross-validation on the TRAINING split only, by ROC AUC), and both
are scored with :mod:`volumevlm.metrics` (AUROC, macro AUROC, its bootstrap
interval), the same functions as zero-shot, so the figures compare directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from volumevlm.errors import VolumeVLMError
from volumevlm.models.probes import PROBE_CS, PROBE_FOLDS, fit_logistic_probes

# 96x96x48 demo volumes -> cells of 8x8x6 voxels; the findings are local (a 4x4x2 grid
# loses most of them), so the grid is the tiny encoder's own token grid order of size.
VOXEL_GRID = (12, 12, 8)
HU_BINS = 32


def voxel_features(images: torch.Tensor, hu_window: Sequence[float], grid: Sequence[int] = VOXEL_GRID,
                   bins: int = HU_BINS) -> torch.Tensor:
    """Model-free features of preprocessed volumes.

    images: [B, 1, X, Y, Z] (or [B, X, Y, Z]) in [0, 1], the preprocessing window
    ``hu_window`` = (low, high) HU mapped linearly onto [0, 1]. Returns float32
    [B, prod(grid) + bins]: the mean of each of the ``grid`` cells (adaptive average
    pooling, x fastest last as in ``flatten``), then the fraction of voxels in each of
    ``bins`` equal HU bins over the window (a voxel at the window's top edge counts in
    the last bin).
    """
    x = images.float()
    if x.ndim == 4:
        x = x[:, None]
    if x.ndim != 5 or x.shape[1] != 1:
        raise VolumeVLMError(f"voxel_features: images must be [B, 1, X, Y, Z], got {list(images.shape)}")
    low, high = float(hu_window[0]), float(hu_window[1])
    pooled = F.adaptive_avg_pool3d(x, tuple(int(g) for g in grid)).flatten(1)
    hu = low + x.flatten(1).clamp(0.0, 1.0) * (high - low)
    index = ((hu - low) / (high - low) * bins).floor().clamp(0, bins - 1).long()
    histogram = torch.zeros(x.shape[0], bins).scatter_add_(1, index, torch.ones_like(hu)) / hu.shape[1]
    return torch.cat([pooled, histogram], dim=1)


def probe_scores(train_x: Any, train_y: Any, eval_x: Any, seed: int = 0) -> tuple[np.ndarray, list[bool]]:
    """Fit one logistic probe per column of ``train_y`` and score ``eval_x``.

    train_x [N, D], train_y [N, F] (0/1; negative or NaN = unlabelled, left out of that
    column's fit), eval_x [M, D]. Returns (scores float64 [M, F]: the probe's decision
    value, NaN in a column that could not be fitted; fitted: per column, whether the
    training split had both classes).
    """
    tx = np.asarray(train_x, dtype=np.float64)
    ty = np.asarray(train_y, dtype=np.float64)
    ex = np.asarray(eval_x, dtype=np.float64)
    if tx.ndim != 2 or ex.ndim != 2 or ty.ndim != 2 or tx.shape[0] != ty.shape[0] or tx.shape[1] != ex.shape[1]:
        raise VolumeVLMError(f"probe: features/targets do not match (train {list(tx.shape)} / {list(ty.shape)}, "
                             f"evaluated {list(ex.shape)})")
    scores = np.full((ex.shape[0], ty.shape[1]), np.nan)
    models = fit_logistic_probes(tx, ty, seed)
    for j, model in enumerate(models):
        if model is not None:
            scores[:, j] = model.decision_function(ex)
    fitted = [model is not None for model in models]
    return scores, fitted


def probe_section(train_x: Any, train_y: Any, eval_x: Any, eval_y: Any, names: Sequence[str],
                  features: str) -> dict[str, Any]:
    """A probe's figures on the evaluated split: ``macro_auroc`` over the findings the probe
    could be fitted on and that have both classes in the evaluated split, its 95%
    bootstrap interval ``macro_auroc_ci95`` (as zero-shot's), ``per_finding`` AUROC
    (None: not fitted, or one class only where it is scored)."""
    from volumevlm.metrics import macro_auroc, macro_auroc_interval, per_finding_auroc

    names = list(names)
    scores, fitted = probe_scores(train_x, train_y, eval_x)
    targets = np.asarray(eval_y, dtype=np.float64)
    columns = [j for j, ok in enumerate(fitted) if ok]
    per_finding: dict[str, float | None] = dict.fromkeys(names)
    macro, used, interval = math.nan, 0, None
    if columns:
        kept = per_finding_auroc(scores[:, columns], targets[:, columns], [names[j] for j in columns])
        per_finding.update(kept)
        macro, used = macro_auroc(scores[:, columns], targets[:, columns])
        if used:
            interval = macro_auroc_interval(scores[:, columns], targets[:, columns])
    return {
        "macro_auroc": macro if used else None,
        "macro_auroc_ci95": interval,
        "per_finding": per_finding,
        "findings_scored": used,
        "findings": len(names),
        "features": features,
        "feature_dim": int(np.asarray(train_x).shape[1]),
        "train_cases": int(np.asarray(train_x).shape[0]),
        "regression": (f"scikit-learn StandardScaler + LogisticRegressionCV (L2, C in {list(PROBE_CS)}, "
                       f"{PROBE_FOLDS}-fold stratified CV on the training split, ROC AUC)"),
        "chance": 0.5,
    }
