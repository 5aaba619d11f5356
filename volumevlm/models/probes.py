"""Logistic probes on frozen features: one standardised logistic regression per target column.

The one recipe behind the yardsticks of ``volumevlm evaluate``
(:mod:`volumevlm.eval.probes`) and the anatomy head's phenotype classifiers
(:mod:`volumevlm.train.anatomy`): scikit-learn's ``StandardScaler`` then
``LogisticRegressionCV`` (L2, its strength chosen by stratified cross-validation on the
fitting cases only, by ROC AUC).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

# L2 strengths tried by cross-validation (scikit-learn's C = 1 / strength).
PROBE_CS = (1e-3, 1e-2, 1e-1, 1.0)
PROBE_FOLDS = 3
PROBE_MAX_ITER = 2000


def logistic_probe(minority: int, seed: int):
    """An unfitted scikit-learn pipeline for a column whose rarer class has ``minority``
    cases: cross-validated over :data:`PROBE_CS` when two folds can hold it, else the
    middle strength (one positive or negative: no fold could score it)."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = min(PROBE_FOLDS, minority)
    if folds >= 2:
        regression = LogisticRegressionCV(
            Cs=list(PROBE_CS), cv=StratifiedKFold(folds, shuffle=True, random_state=seed), scoring="roc_auc",
            max_iter=PROBE_MAX_ITER)
    else:
        regression = LogisticRegression(C=PROBE_CS[len(PROBE_CS) // 2], max_iter=PROBE_MAX_ITER)
    return make_pipeline(StandardScaler(), regression)


def fit_logistic_probes(x: np.ndarray, y: np.ndarray, seed: int = 0, min_cases: int = 1) -> list[Any]:
    """One fitted pipeline per column of y [N, F] on the features x [N, D]: 0/1 targets,
    negative or NaN = unlabelled (left out of that column's fit). None for a column whose
    labelled rows have fewer than ``min_cases`` positives or negatives."""
    fitted: list[Any] = []
    for j in range(y.shape[1]):
        known = np.isfinite(y[:, j]) & (y[:, j] >= 0)
        labels = y[known, j] > 0.5
        minority = min(int(labels.sum()), int((~labels).sum()))
        if minority < max(1, int(min_cases)):
            fitted.append(None)
            continue
        model = logistic_probe(minority, seed)
        with warnings.catch_warnings():
            # Small folds of an easy target converge to huge weights: still a ranking.
            warnings.simplefilter("ignore")
            model.fit(x[known], labels)
        fitted.append(model)
    return fitted
