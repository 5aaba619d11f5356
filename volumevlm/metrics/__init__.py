"""The one metrics module of training's validation and of ``volumevlm evaluate``:
classification (AUROC), cross-modal retrieval (recall@k), segmentation (Dice, HD95); the
report metrics (BLEU-4, ROUGE-L, clinical F1) are in :mod:`volumevlm.metrics.report`.

It sits below ``ops`` and ``models`` in the import layers (it needs only numpy, torch,
scipy, the label table and the findings labeler), so ``train`` and ``eval``, which do not
import each other, both use it.

Every function takes numpy arrays, torch tensors or nested lists, and raises a
one-line :class:`~volumevlm.errors.VolumeVLMError` on shape mismatches and bad values
(the tensor helpers of training's validation, :func:`retrieval_recall`, :func:`dice_counts`
and :func:`hd95_per_class`, raise ``ValueError`` as they always have).

Classification
    :func:`auroc` is the Mann-Whitney probability that a random positive scores above
    a random negative, ties counting one half (what torchmetrics and scikit-learn
    compute). Targets are 0/1; entries that are NaN or negative (e.g. -1) are
    "unlabelled" and left out. With a single class present AUROC is undefined: NaN
    from :func:`auroc`, None from :func:`per_finding_auroc`, and such findings are not
    counted by :func:`macro_auroc`.

Retrieval
    :func:`recall_at_k` and :func:`pool_recall` rank candidates pessimistically: the
    rank of the correct candidate is 1 + the number of OTHER candidates whose score is
    greater than or EQUAL to it, so a tie never helps (a model that gives every
    candidate the same score has rank = number of candidates, not 1).

Text retrieval
    :func:`text_retrieval_precision` scores queries that name a finding against a corpus
    of texts the findings labeler has read: precision@k of the positive queries (k
    shrinks to the number of positives when there are fewer) and, for negated queries,
    the share of positives among the top k. Ties count against the model here too.

Segmentation
    :func:`dice_per_label` and :func:`hd95_per_label` compare two integer label maps
    [X, Y, Z] one label at a time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from volumevlm.data.labels import LARGE_ORGANS
from volumevlm.errors import VolumeVLMError

__all__ = [
    "auroc", "per_finding_auroc", "macro_auroc", "macro_auroc_interval", "roc_curve_points",
    "recall_at_k", "retrieval_recall", "pool_recall", "text_retrieval_precision",
    "dice_per_label", "surface_voxels", "hd95_per_label",
    "dice_counts", "dice_from_counts", "hd95_per_class", "summarize_dice", "summarize_hd95",
]

# --------------------------------------------------------------------------- helpers

def _array(x: Any, what: str, dtype=np.float64) -> np.ndarray:
    """A numpy copy of x (numpy, torch, list), as ``dtype``."""
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu")
            if x.dtype == torch.bfloat16:
                x = x.float()
            x = x.numpy()
    except ImportError:  # torch is a hard dependency; this only keeps numpy-only use working
        pass
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as err:
        raise VolumeVLMError(f"{what}: not a numeric array ({' '.join(str(err).split())})") from None


def _scores_targets(scores: Any, targets: Any, ndim: int, what: str = "scores/targets") -> tuple[np.ndarray, np.ndarray]:
    s = _array(scores, "scores")
    t = _array(targets, "targets")
    if s.shape != t.shape or s.ndim != ndim:
        want = "[N]" if ndim == 1 else "[N, F]"
        raise VolumeVLMError(f"{what}: scores and targets must both be {want}, got {s.shape} and {t.shape}")
    labelled = ~(np.isnan(t) | (t < 0))
    bad = labelled & ~((t == 0) | (t == 1))
    if bad.any():
        raise VolumeVLMError(f"{what}: targets must be 0 or 1 (NaN or -1 for unlabelled), found {t[bad].flat[0]!r}")
    if not np.isfinite(s[labelled]).all():
        raise VolumeVLMError(f"{what}: scores of labelled entries must be finite (found NaN or inf)")
    return s, np.where(labelled, t, np.nan)


def _auroc_clean(s: np.ndarray, t: np.ndarray) -> float:
    """AUROC of 1-D finite scores s and 0/1/NaN targets t (NaN rows dropped)."""
    keep = ~np.isnan(t)
    s, t = s[keep], t[keep].astype(bool)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    # Mann-Whitney U from mid-ranks: tied scores share the mean of their ranks, which
    # is exactly "ties count one half" in the pair-counting definition.
    from scipy.stats import rankdata

    ranks = rankdata(s, method="average")
    u = ranks[t].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


# --------------------------------------------------------------------------- classification

def auroc(scores: Any, targets: Any) -> float:
    """Area under the ROC curve.

    scores: [N] float (any monotone score: probability, logit, similarity).
    targets: [N] 0/1 (bool or numbers); NaN or negative entries are unlabelled and dropped.
    Returns a float in [0, 1]; NaN when the labelled rows hold only one class (or none).
    Ties between a positive and a negative count one half.
    """
    s, t = _scores_targets(scores, targets, 1, "auroc")
    return _auroc_clean(s, t)


def per_finding_auroc(scores: Any, targets: Any, names: Sequence[str]) -> dict[str, float | None]:
    """AUROC of each column.

    scores: [N, F] float; targets: [N, F] 0/1 (NaN / -1 = unlabelled); names: F strings.
    Returns {name: AUROC, or None when that column's labelled rows hold one class}.
    """
    s, t = _scores_targets(scores, targets, 2, "per_finding_auroc")
    names = list(names)
    if len(names) != s.shape[1]:
        raise VolumeVLMError(f"per_finding_auroc: {len(names)} names for {s.shape[1]} score columns")
    if len(set(names)) != len(names):
        raise VolumeVLMError("per_finding_auroc: names must be distinct")
    out: dict[str, float | None] = {}
    for j, name in enumerate(names):
        value = _auroc_clean(s[:, j], t[:, j])
        out[name] = None if math.isnan(value) else value
    return out


def macro_auroc(scores: Any, targets: Any) -> tuple[float, int]:
    """Mean AUROC over the columns with both classes.

    scores: [N, F] float; targets: [N, F] 0/1 (NaN / -1 = unlabelled).
    Returns (mean AUROC, number of columns used); (NaN, 0) when no column has both classes.
    """
    s, t = _scores_targets(scores, targets, 2, "macro_auroc")
    values = [v for v in (_auroc_clean(s[:, j], t[:, j]) for j in range(s.shape[1])) if not math.isnan(v)]
    if not values:
        return math.nan, 0
    return float(np.mean(values)), len(values)


def macro_auroc_interval(scores: Any, targets: Any, *, level: float = 0.95, resamples: int = 1000,
                         seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of :func:`macro_auroc` over cases.

    The rows (cases) are resampled with replacement ``resamples`` times (seeded, so the
    interval is reproducible); each resample's macro AUROC is taken over its columns with
    both classes, as :func:`macro_auroc` does. Returns (low, high) at ``level``, or None
    when the macro AUROC itself is undefined. On a few dozen held-out cases it is the
    honest answer to "is this above chance?".
    """
    s, t = _scores_targets(scores, targets, 2, "macro_auroc_interval")
    if not 0.0 < float(level) < 1.0:
        raise VolumeVLMError(f"macro_auroc_interval: level must be in (0, 1), got {level!r}")
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 10:
        raise VolumeVLMError(f"macro_auroc_interval: resamples must be an integer >= 10, got {resamples!r}")
    columns = [j for j in range(s.shape[1]) if not math.isnan(_auroc_clean(s[:, j], t[:, j]))]
    if not columns:
        return None
    rng = np.random.default_rng(seed)
    n = s.shape[0]
    values = []
    for _ in range(int(resamples)):
        rows = rng.integers(0, n, size=n)
        aurocs = [_auroc_clean(s[rows, j], t[rows, j]) for j in columns]
        aurocs = [a for a in aurocs if not math.isnan(a)]
        if aurocs:
            values.append(float(np.mean(aurocs)))
    tail = (1.0 - float(level)) / 2.0
    low, high = np.quantile(np.asarray(values), [tail, 1.0 - tail])
    return float(low), float(high)


def roc_curve_points(scores: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve as (fpr, tpr), float64 arrays of equal length.

    scores: [N] float; targets: [N] 0/1 (NaN / -1 = unlabelled, dropped).
    One point per distinct score threshold (highest first), starting at (0, 0) and
    ending at (1, 1); tied scores move both rates in one step, so the trapezoid area
    under these points equals :func:`auroc`. Raises when only one class is labelled.
    """
    s, t = _scores_targets(scores, targets, 1, "roc_curve_points")
    keep = ~np.isnan(t)
    s, t = s[keep], t[keep].astype(bool)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        raise VolumeVLMError(f"roc_curve_points: need both classes, got {n_pos} positive and {n_neg} negative")
    order = np.argsort(-s, kind="stable")
    s, t = s[order], t[order]
    # Index of the last row of each run of equal scores: thresholds sit between runs.
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp = np.cumsum(t)[last]
    fp = np.cumsum(~t)[last]
    fpr = np.r_[0.0, fp / n_neg]
    tpr = np.r_[0.0, tp / n_pos]
    return fpr, tpr


# --------------------------------------------------------------------------- retrieval

def _pessimistic_ranks(sim: np.ndarray) -> np.ndarray:
    """Rank of candidate i for query i in sim [Nq, Nc] (Nq <= Nc): 1 + #{j != i: sim[i, j] >= sim[i, i]}."""
    nq = sim.shape[0]
    correct = sim[np.arange(nq), np.arange(nq)][:, None]
    at_least = (sim >= correct).sum(axis=1)  # counts the correct candidate itself once
    return at_least  # = 1 + others with >= score


def _check_k(k_values: Sequence[int]) -> list[int]:
    ks = list(k_values)
    if not ks or any(isinstance(k, bool) or int(k) != k or k < 1 for k in ks):
        raise VolumeVLMError(f"k_values: need positive integers, got {k_values!r}")
    return [int(k) for k in ks]


def recall_at_k(sim: Any, k_values: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Full-set recall@k: the correct candidate of query i is candidate i.

    sim: [Nq, Nc] float similarities (Nq <= Nc; extra candidates are distractors).
    Rank of the correct candidate = 1 + number of other candidates scoring greater
    than or equal to it (ties count against the model). recall@k is the fraction of
    queries with rank <= k (1.0 whenever k >= Nc).
    Returns {"r1": ..., "r5": ..., "r10": ...} (keys "r{k}") with values in [0, 1].
    """
    ks = _check_k(k_values)
    s = _array(sim, "sim")
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[0] > s.shape[1]:
        raise VolumeVLMError(f"recall_at_k: sim must be [Nq, Nc] with 1 <= Nq <= Nc, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise VolumeVLMError("recall_at_k: sim holds NaN or inf")
    ranks = _pessimistic_ranks(s)
    return {f"r{k}": float((ranks <= k).mean()) for k in ks}


def retrieval_recall(queries: torch.Tensor, keys: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Recall@k of retrieving key i for query i (training's validation): :func:`recall_at_k`
    of the similarity matrix ``queries @ keys.T`` (float32).

    queries, keys: [N, E] embeddings (unit length for cosine similarity), row i of each
    belonging to the same case. Ties count against the correct key, so a collapsed model
    scores no better than chance. Returns {k: fraction in [0, 1]}; NaN for N = 0.
    """
    if queries.shape != keys.shape or queries.ndim != 2:
        raise ValueError(f"queries and keys must both be [N, E], got {tuple(queries.shape)} and {tuple(keys.shape)}")
    if queries.shape[0] == 0:
        return {int(k): math.nan for k in ks}
    recall = recall_at_k(queries.float() @ keys.float().T, [int(k) for k in ks])
    return {int(k): recall[f"r{int(k)}"] for k in ks}


def pool_recall(
    image_emb: Any,
    text_emb: Any,
    pool_sizes: Sequence[int] = (32, 64, 128),
    k_values: Sequence[int] = (1, 5, 10),
    n_pools: int = 100,
    seed: int = 0,
    direction: str = "i2t",
) -> dict[str, float | None]:
    """Recall@k within random pools of cases (Merlin's retrieval protocol).

    image_emb, text_emb: [N, E] float embeddings, row i of each from the same case;
    the similarity is their dot product (pass unit-length rows for cosine).
    direction: "i2t" ranks the P reports of a pool for each of its P images;
        "t2i" ranks the P images for each report.

    For each pool size P: draw ``n_pools`` pools, each P distinct cases chosen
    uniformly at random without replacement (pools are independent of each other, so a
    case may appear in several pools). Within a pool every case is a query once and its
    own counterpart is the correct candidate among the P; ranks are pessimistic (ties
    count against the model, see :func:`recall_at_k`). recall@k is averaged over the P
    queries of a pool and then over pools (equal weight per query). Pools of size
    P > N are impossible and reported as None. The draw for pool size P uses a generator
    seeded from (seed, P), so a pool size's result does not depend on which other sizes
    are requested.

    Returns {"r{k}_pool{P}": float in [0, 1] or None} for every k and P.
    """
    ks = _check_k(k_values)
    if direction not in ("i2t", "t2i"):
        raise VolumeVLMError(f"pool_recall: direction must be 'i2t' or 't2i', got {direction!r}")
    img = _array(image_emb, "image_emb")
    txt = _array(text_emb, "text_emb")
    if img.ndim != 2 or img.shape != txt.shape:
        raise VolumeVLMError(f"pool_recall: image_emb and text_emb must both be [N, E], got {img.shape} and {txt.shape}")
    if not (np.isfinite(img).all() and np.isfinite(txt).all()):
        raise VolumeVLMError("pool_recall: embeddings hold NaN or inf")
    if isinstance(n_pools, bool) or int(n_pools) != n_pools or n_pools < 1:
        raise VolumeVLMError(f"pool_recall: n_pools must be a positive integer, got {n_pools!r}")
    sizes = list(pool_sizes)
    if not sizes or any(isinstance(p, bool) or int(p) != p or p < 2 for p in sizes):
        raise VolumeVLMError(f"pool_recall: pool_sizes must be integers >= 2, got {pool_sizes!r}")
    queries, candidates = (img, txt) if direction == "i2t" else (txt, img)
    n = img.shape[0]
    out: dict[str, float | None] = {}
    for p in (int(x) for x in sizes):
        if p > n:
            for k in ks:
                out[f"r{k}_pool{p}"] = None
            continue
        rng = np.random.default_rng([int(seed), p])
        hits = np.zeros(len(ks))
        for _ in range(int(n_pools)):
            idx = rng.choice(n, size=p, replace=False)
            ranks = _pessimistic_ranks(queries[idx] @ candidates[idx].T)
            hits += [(ranks <= k).mean() for k in ks]
        for k, h in zip(ks, hits):
            out[f"r{k}_pool{p}"] = float(h / n_pools)
    return out


def text_retrieval_precision(
    query_emb: Any,
    corpus_emb: Any,
    query_findings: Sequence[str],
    query_negated: Sequence[bool],
    corpus_positive: Any,
    findings: Sequence[str],
    k: int = 10,
) -> dict[str, Any]:
    """How well text queries naming a finding retrieve texts that state it.

    query_emb [Q, E], corpus_emb [M, E]: embeddings, scored by their dot product (pass
    unit rows for cosine). query_findings: the finding (a name of ``findings``) each query
    names; query_negated: True for a query that denies it ("The spleen is not enlarged.").
    corpus_positive [M, F] bool: column j is True where the judge (the findings labeler)
    reads corpus text i as stating finding ``findings[j]`` present; hedged or denied
    mentions are False.

    For a query of a finding with P positive texts in the corpus, the corpus is ranked by
    score, equal scores putting the outcome that counts against the model first:

    * positive query: precision@k' with k' = min(k, P), the share of positives among the
      top k' (so a finding with fewer than k positives can still reach 1.0: every one of
      them ranked first);
    * negated query: the share of positives among the top min(k, M) (lower is better; the
      target is at most 1 in 10).

    A finding with no positive text in the corpus is not scored (None): neither figure
    means anything there. Per finding, each figure is the mean over its queries; the
    headline figures are the unweighted means over scored findings. Chance is what a
    random ranking gives on average: P / M for both figures.

    Returns {"precision_at_{k}", "negated_positive_rate_at_{k}" (macro, None when nothing
    is scored), "findings_scored", "chance": {both figures}, "per_finding": {name:
    {both figures, "positives", "queries", "negated_queries", "chance"}}, "per_query":
    [{"finding", "negated", "value", "k", "top": corpus rows of the top k, best first}]}.
    """
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise VolumeVLMError(f"text_retrieval_precision: k must be a positive integer, got {k!r}")
    k = int(k)
    q = _array(query_emb, "query_emb")
    c = _array(corpus_emb, "corpus_emb")
    positive = _array(corpus_positive, "corpus_positive") != 0
    names = [str(n) for n in findings]
    if q.ndim != 2 or c.ndim != 2 or q.shape[1] != c.shape[1] or c.shape[0] == 0:
        raise VolumeVLMError(f"text_retrieval_precision: need query_emb [Q, E] and corpus_emb [M, E] with M >= 1, "
                             f"got {q.shape} and {c.shape}")
    if positive.shape != (c.shape[0], len(names)):
        raise VolumeVLMError(f"text_retrieval_precision: corpus_positive must be [M, F] = {(c.shape[0], len(names))}, "
                             f"got {positive.shape}")
    if len(query_findings) != q.shape[0] or len(query_negated) != q.shape[0]:
        raise VolumeVLMError(f"text_retrieval_precision: {q.shape[0]} queries but {len(query_findings)} findings and "
                             f"{len(query_negated)} negation flags")
    if not (np.isfinite(q).all() and np.isfinite(c).all()):
        raise VolumeVLMError("text_retrieval_precision: embeddings hold NaN or inf")
    column = {name: j for j, name in enumerate(names)}
    unknown = [f for f in query_findings if f not in column]
    if unknown:
        raise VolumeVLMError(f"text_retrieval_precision: query finding {unknown[0]!r} is not a column of corpus_positive")
    n_corpus = c.shape[0]
    scores = q @ c.T
    per_query: list[dict[str, Any]] = []
    values: dict[str, dict[bool, list[float]]] = {name: {False: [], True: []} for name in names}
    for i, (name, negated) in enumerate(zip(query_findings, query_negated)):
        pos = positive[:, column[name]]
        n_pos = int(pos.sum())
        negated = bool(negated)
        # Best score first; at equal scores the outcome that counts against the model comes
        # first (a non-positive for a positive query, a positive for a negated one).
        tie_break = ~pos if negated else pos
        order = np.lexsort((tie_break, -scores[i]))
        depth = min(k, n_corpus) if negated else min(k, n_pos)
        value = None
        if n_pos > 0:
            value = float(pos[order[:depth]].mean())
            values[name][negated].append(value)
        per_query.append({"finding": name, "negated": negated, "value": value, "k": depth,
                          "top": [int(j) for j in order[:min(k, n_corpus)]]})
    p_key, n_key = f"precision_at_{k}", f"negated_positive_rate_at_{k}"
    asked = set(query_findings)
    per_finding: dict[str, dict[str, Any]] = {}
    for name in (n for n in names if n in asked):
        n_pos = int(positive[:, column[name]].sum())
        pos_values, neg_values = values[name][False], values[name][True]
        per_finding[name] = {
            p_key: float(np.mean(pos_values)) if pos_values else None,
            n_key: float(np.mean(neg_values)) if neg_values else None,
            "positives": n_pos,
            "queries": sum(1 for f, neg in zip(query_findings, query_negated) if f == name and not neg),
            "negated_queries": sum(1 for f, neg in zip(query_findings, query_negated) if f == name and neg),
            "chance": n_pos / n_corpus,
        }

    def macro(key: str) -> float | None:
        kept = [v[key] for v in per_finding.values() if v[key] is not None]
        return float(np.mean(kept)) if kept else None

    def macro_chance(key: str) -> float | None:
        kept = [v["chance"] for v in per_finding.values() if v[key] is not None]
        return float(np.mean(kept)) if kept else None

    return {
        p_key: macro(p_key),
        n_key: macro(n_key),
        "findings_scored": sum(1 for v in per_finding.values() if v[p_key] is not None),
        "chance": {p_key: macro_chance(p_key), n_key: macro_chance(n_key)},
        "per_finding": per_finding,
        "per_query": per_query,
    }


# --------------------------------------------------------------------------- segmentation

def _label_maps(pred: Any, target: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    maps = []
    for name, x in (("pred", pred), ("target", target)):
        a = _array(x, f"{what}: {name}", dtype=None)
        if a.dtype == bool:
            a = a.astype(np.int64)
        elif a.dtype.kind == "f":
            if not np.isfinite(a).all() or (a != np.round(a)).any():
                raise VolumeVLMError(f"{what}: {name} must be an integer label map, found non-integer values")
            a = a.astype(np.int64)
        elif a.dtype.kind not in "iu":
            raise VolumeVLMError(f"{what}: {name} must be an integer label map, got dtype {a.dtype}")
        maps.append(a)
    if maps[0].shape != maps[1].shape or maps[0].ndim != 3:
        raise VolumeVLMError(f"{what}: pred and target must both be [X, Y, Z] label maps, got {maps[0].shape} and {maps[1].shape}")
    return maps[0], maps[1]


def _check_labels(labels: Mapping[int, str], what: str) -> dict[int, str]:
    if not isinstance(labels, Mapping) or not labels:
        raise VolumeVLMError(f"{what}: labels must be a non-empty mapping {{label value: name}}")
    out = {}
    for value, name in labels.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise VolumeVLMError(f"{what}: label values must be integers, got {value!r}")
        out[int(value)] = str(name)
    if len(set(out.values())) != len(out):
        raise VolumeVLMError(f"{what}: label names must be distinct")
    return out


def dice_per_label(pred: Any, target: Any, labels: Mapping[int, str]) -> dict[str, float | None]:
    """Dice coefficient per label.

    pred, target: [X, Y, Z] integer label maps (bool, ints, or floats holding whole numbers).
    labels: {label value: name}, e.g. {1: "liver", 2: "spleen"}.
    Dice = 2 |P & T| / (|P| + |T|) for the voxels equal to the label value.
    Returns {name: float in [0, 1], or None when the label is absent from both maps}
    (0.0 when it is in only one).
    """
    p, t = _label_maps(pred, target, "dice_per_label")
    labels = _check_labels(labels, "dice_per_label")
    out: dict[str, float | None] = {}
    for value, name in labels.items():
        a, b = p == value, t == value
        total = int(a.sum()) + int(b.sum())
        out[name] = None if total == 0 else 2.0 * int((a & b).sum()) / total
    return out


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Boolean [X, Y, Z]: the mask's voxels with at least one of their 6 face neighbours
    outside the mask; the volume's outside counts as background, so mask voxels on the
    volume border are surface voxels (the rule of MONAI's ``get_mask_edges``)."""
    from scipy.ndimage import binary_erosion

    mask = np.asarray(mask, dtype=bool)
    return mask & ~binary_erosion(mask, border_value=0)


def _directed_distances(src: np.ndarray, dst: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance in mm from every True voxel of src to the nearest True voxel of dst."""
    from scipy.spatial import cKDTree

    a = np.argwhere(src) * spacing
    b = np.argwhere(dst) * spacing
    return cKDTree(b).query(a, k=1)[0]


def hd95_per_label(
    pred: Any, target: Any, labels: Mapping[int, str], spacing_mm: Sequence[float]
) -> dict[str, float | None]:
    """95th-percentile symmetric Hausdorff distance per label, in millimetres.

    pred, target: [X, Y, Z] integer label maps; labels: {label value: name};
    spacing_mm: 3 positive voxel sizes (mm) along X, Y, Z.

    For one label: the surfaces of the two masks are their voxels with a 6-neighbour
    outside the mask (the volume's outside is background; see :func:`surface_voxels`).
    d(P->T) are the Euclidean distances (mm, voxel centres) from each surface voxel of
    pred to the nearest surface voxel of target, d(T->P) the reverse, and
    HD95 = max(percentile95(d(P->T)), percentile95(d(T->P))), percentiles with linear
    interpolation (numpy's default). This is MONAI's
    ``compute_hausdorff_distance(percentile=95)`` definition.

    Empty masks: None when the label is absent from both maps; inf when it is present
    in only one (no surface to measure to: the worst possible value; exclude or cap it
    before averaging).
    Returns {name: float (mm) | inf | None}.
    """
    p, t = _label_maps(pred, target, "hd95_per_label")
    labels = _check_labels(labels, "hd95_per_label")
    sp = _array(spacing_mm, "spacing_mm").reshape(-1)
    if sp.shape != (3,) or not (np.isfinite(sp).all() and (sp > 0).all()):
        raise VolumeVLMError(f"hd95_per_label: spacing_mm must be 3 positive finite numbers, got {list(np.atleast_1d(spacing_mm))}")
    out: dict[str, float | None] = {}
    for value, name in labels.items():
        a, b = p == value, t == value
        has_a, has_b = bool(a.any()), bool(b.any())
        if not has_a and not has_b:
            out[name] = None
            continue
        if not (has_a and has_b):
            out[name] = math.inf
            continue
        out[name] = _hd95_of_masks(a, b, sp)
    return out


def _hd95_of_masks(a: np.ndarray, b: np.ndarray, spacing: np.ndarray) -> float:
    """HD95 (mm) of two non-empty boolean masks [X, Y, Z] (the rule of :func:`hd95_per_label`)."""
    # Crop to the union's bounding box plus one background voxel so the surface rule
    # (outside = background) is unchanged while the work shrinks to the structure.
    both = a | b
    lo = np.maximum(np.argwhere(both).min(axis=0) - 1, 0)
    hi = np.argwhere(both).max(axis=0) + 2
    box = tuple(slice(int(start), int(stop)) for start, stop in zip(lo, hi))
    sa, sb = surface_voxels(a[box]), surface_voxels(b[box])
    d_ab = _directed_distances(sa, sb, spacing)
    d_ba = _directed_distances(sb, sa, spacing)
    return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


# --------------------------------------------------------------------------- segmentation, batched
# Training's validation accumulates Dice as overlap counts over batches and HD95 per case
# and class, on torch tensors; the definitions are the ones above.


def dice_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-case overlap counts: float64 [B, K, 3] = (|pred & target|, |pred|, |target|)
    for each class k of integer label maps pred, target [B, ...] (same shape)."""
    if pred.shape != target.shape:
        raise ValueError(f"dice_counts: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    b = pred.shape[0]
    pred, target = pred.reshape(b, -1).long(), target.reshape(b, -1).long()
    classes = torch.arange(num_classes, device=pred.device)[None, :, None]
    p = pred[:, None, :] == classes  # [B, K, N] bool
    t = target[:, None, :] == classes
    return torch.stack(((p & t).sum(-1), p.sum(-1), t.sum(-1)), dim=-1).double()


def dice_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Dice float64 [B, K] from :func:`dice_counts`; NaN where a class is absent from
    both prediction and target (no evidence either way)."""
    inter, p, t = counts.unbind(-1)
    denom = p + t
    dice = torch.where(denom > 0, 2.0 * inter / denom.clamp_min(1), torch.full_like(denom, float("nan")))
    return dice


def hd95_per_class(pred: torch.Tensor, target: torch.Tensor, num_classes: int, spacing: Sequence[float]) -> torch.Tensor:
    """95th-percentile symmetric Hausdorff distance in mm, float64 [B, K], of integer
    label maps pred, target [B, X, Y, Z] (or [B, 1, X, Y, Z]) on a grid of ``spacing``
    mm per array axis (the definition of :func:`hd95_per_label`, which is MONAI's
    ``compute_hausdorff_distance`` with percentile 95). NaN for the background (k = 0)
    and wherever the class is missing from the prediction or the target: a missed
    structure has no distance (its Dice, 0, says it was missed)."""
    if pred.shape != target.shape:
        raise ValueError(f"hd95_per_class: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if pred.dim() == 5:
        pred, target = pred[:, 0], target[:, 0]
    if pred.dim() != 4:
        raise ValueError(f"hd95_per_class: expected [B, X, Y, Z] label maps, got {tuple(pred.shape)}")
    sp = np.asarray([float(v) for v in spacing], dtype=np.float64)
    out = torch.full((pred.shape[0], num_classes), float("nan"), dtype=torch.float64)
    pred_np, target_np = pred.long().cpu().numpy(), target.long().cpu().numpy()
    for b in range(pred_np.shape[0]):
        for k in range(1, num_classes):
            p, t = pred_np[b] == k, target_np[b] == k
            if p.any() and t.any():
                out[b, k] = _hd95_of_masks(p, t, sp)
    return out


def _per_label_means(values: torch.Tensor, label_names: Mapping[int, str], key: str) -> dict[str, float]:
    """{"<key>_<name>": mean over the cases with a finite value, "mean_<key>": mean over
    foreground labels, "mean_<key>_large": mean over LARGE_ORGANS} from values [N, K]
    (label 0, the background, is left out; so is a label with no finite value)."""
    out: dict[str, float] = {}
    per_label: dict[str, float] = {}
    for k in range(1, values.shape[1]):
        column = values[:, k]
        column = column[torch.isfinite(column)]
        if column.numel():
            name = label_names.get(k, f"label_{k}")
            per_label[name] = float(column.mean())
            out[f"{key}_{name}"] = per_label[name]
    if per_label:
        out[f"mean_{key}"] = sum(per_label.values()) / len(per_label)
    large = [per_label[name] for name in LARGE_ORGANS if name in per_label]
    if large:
        out[f"mean_{key}_large"] = sum(large) / len(large)
    return out


def summarize_hd95(hd95: torch.Tensor, label_names: Mapping[int, str]) -> dict[str, float]:
    """{"hd95_<name>": mean over the cases with a distance, "mean_hd95": mean over
    labels, "mean_hd95_large": mean over :data:`~volumevlm.data.labels.LARGE_ORGANS`}
    from hd95 [N, K] (mm)."""
    return _per_label_means(hd95, label_names, "hd95")


def summarize_dice(counts: torch.Tensor, label_names: Mapping[int, str]) -> dict[str, float]:
    """{"dice_<name>": mean over cases, "mean_dice": mean over foreground labels,
    "mean_dice_large": mean over :data:`~volumevlm.data.labels.LARGE_ORGANS`} from
    counts [N, K, 3]; labels absent from every case (prediction and target) are left out."""
    out = _per_label_means(dice_from_counts(counts), label_names, "dice")  # NaN: absent from both
    out["cases"] = float(counts.shape[0])
    return out
