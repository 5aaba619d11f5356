"""Evaluation metrics against hand-computed cases and brute-force references (pair
counting for AUROC, explicit loops for ranks, pairwise surface distances for HD95).
All inputs are small random or hand-made arrays (synthetic, not clinical data)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from volumevlm.errors import VolumeVLMError
from volumevlm.metrics import (
    auroc,
    dice_per_label,
    hd95_per_label,
    macro_auroc,
    macro_auroc_interval,
    per_finding_auroc,
    pool_recall,
    recall_at_k,
    roc_curve_points,
    surface_voxels,
)


def pair_count_auroc(scores, targets):
    pos = [s for s, t in zip(scores, targets) if t == 1]
    neg = [s for s, t in zip(scores, targets) if t == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


# --------------------------------------------------------------------------- AUROC

def test_auroc_hand_cases():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: 3 of 4 pairs ordered correctly.
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # a positive-negative tie at 0.5 counts one half: (0.5 + 1 + 1 + 1) / 4.
    assert auroc(np.array([0.5, 0.5, 0.2, 0.9]), np.array([1, 0, 0, 1])) == pytest.approx(0.875)
    assert auroc(torch.tensor([3.0, 1.0]), torch.tensor([True, False])) == 1.0
    assert auroc([1.0, 3.0], [1, 0]) == 0.0
    assert math.isnan(auroc([0.1, 0.2, 0.3], [1, 1, 1]))
    assert math.isnan(auroc([], []))


def test_auroc_matches_pair_counting_and_torchmetrics():
    from torchmetrics.functional.classification import binary_auroc

    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(5, 60))
        scores = np.round(rng.normal(size=n), 1)  # rounding makes ties
        targets = rng.integers(0, 2, size=n)
        if targets.min() == targets.max():
            continue
        ours = auroc(scores, targets)
        assert ours == pytest.approx(pair_count_auroc(scores, targets), abs=1e-12)
        # torchmetrics applies a sigmoid to scores outside [0, 1], and torch's float64 CPU
        # sigmoid can differ in the last bit for equal inputs (vectorised lanes vs the
        # tail), which splits ties; so compare on scores rescaled into [0, 1] (IEEE
        # division keeps equal values equal).
        unit = (scores - scores.min()) / (scores.max() - scores.min())
        tm = binary_auroc(torch.tensor(unit), torch.tensor(targets)).item()
        assert ours == pytest.approx(tm, abs=1e-6)


def test_unlabelled_entries_are_dropped():
    scores = [0.9, 0.2, 0.7, 0.4, 0.5]
    assert auroc(scores, [1, 0, -1, 0, float("nan")]) == pytest.approx(pair_count_auroc([0.9, 0.2, 0.4], [1, 0, 0]))
    # an unlabelled row may even carry a NaN score
    assert auroc([0.9, float("nan"), 0.1], [1, -1, 0]) == 1.0


def test_per_finding_and_macro_auroc():
    scores = np.array([[0.1, 0.5, 0.3], [0.4, 0.6, 0.2], [0.35, 0.7, 0.9], [0.8, 0.1, 0.8]])
    targets = np.array([[0, 1, 0], [0, 1, 0], [1, 1, 1], [1, 1, -1]])
    out = per_finding_auroc(scores, targets, ["a", "b", "c"])
    assert out["a"] == pytest.approx(0.75)
    assert out["b"] is None  # one class only
    assert out["c"] == pytest.approx(1.0)  # labelled rows: 0.3, 0.2 negatives, 0.9 positive
    value, used = macro_auroc(scores, targets)
    assert used == 2 and value == pytest.approx((0.75 + 1.0) / 2)
    value, used = macro_auroc(scores[:, 1:2], targets[:, 1:2])
    assert used == 0 and math.isnan(value)


def test_macro_auroc_interval_is_a_reproducible_bootstrap_that_separates_signal_from_chance():
    rng = np.random.default_rng(3)

    def cohort(n, signal):
        targets = (rng.random((n, 6)) < 0.3).astype(float)
        return targets * signal + rng.normal(size=(n, 6)), targets

    noise_scores, noise_targets = cohort(60, 0.0)
    low, high = macro_auroc_interval(noise_scores, noise_targets)
    point, _ = macro_auroc(noise_scores, noise_targets)
    assert low <= point <= high and low < 0.5 < high  # no signal: chance is inside
    assert macro_auroc_interval(noise_scores, noise_targets) == (low, high)  # seeded
    assert macro_auroc_interval(noise_scores, noise_targets, seed=1) != (low, high)

    scores, targets = cohort(60, 1.0)
    small = macro_auroc_interval(scores, targets)
    assert small[0] > 0.5  # a real signal on 60 cases is told apart from chance
    big_scores, big_targets = cohort(600, 1.0)
    big = macro_auroc_interval(big_scores, big_targets)
    assert big[1] - big[0] < 0.6 * (small[1] - small[0])  # ten times the cases: about a third the width
    half = macro_auroc_interval(scores, targets, level=0.5)
    assert small[0] < half[0] <= half[1] < small[1]  # a 50% interval sits inside the 95% one

    separable = np.array([[0.1], [0.2], [0.8], [0.9]]), np.array([[0], [0], [1], [1]])
    assert macro_auroc_interval(*separable) == (1.0, 1.0)
    assert macro_auroc_interval(np.zeros((3, 1)), np.ones((3, 1))) is None  # one class: undefined
    for bad in ({"level": 1.0}, {"resamples": 5}, {"resamples": True}, {"resamples": "many"}, {"resamples": 100.5}):
        with pytest.raises(VolumeVLMError):
            macro_auroc_interval(scores, targets, **bad)


def test_classification_input_errors_are_one_line():
    cases = [
        (auroc, ([0.1, 0.2], [0, 1, 1])),
        (auroc, ([[0.1, 0.2]], [[0, 1]])),
        (auroc, ([0.1, 0.2], [0, 2])),
        (auroc, ([0.1, float("nan")], [0, 1])),
        (per_finding_auroc, (np.zeros((3, 2)), np.zeros((3, 2)), ["only one"])),
        (per_finding_auroc, (np.zeros((3, 2)), np.zeros((2, 2)), ["a", "b"])),
        (macro_auroc, (np.zeros((3, 2)), np.zeros((3, 3)))),
        (roc_curve_points, ([0.1, 0.2], [1, 1])),
        (auroc, (["a", "b"], [0, 1])),
    ]
    for fn, args in cases:
        with pytest.raises(VolumeVLMError) as info:
            fn(*args)
        assert "\n" not in str(info.value)


def test_roc_curve_points_hand_case_and_area():
    fpr, tpr = roc_curve_points([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    # thresholds 0.8, 0.4, 0.35, 0.1
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    # tied scores move both rates at once: one diagonal step
    fpr, tpr = roc_curve_points([0.5, 0.5], [1, 0])
    assert fpr.tolist() == [0.0, 1.0] and tpr.tolist() == [0.0, 1.0]
    rng = np.random.default_rng(1)
    for _ in range(10):
        scores = np.round(rng.normal(size=40), 1)
        targets = rng.integers(0, 2, size=40)
        fpr, tpr = roc_curve_points(scores, targets)
        area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
        assert area == pytest.approx(auroc(scores, targets), abs=1e-12)
        assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


# --------------------------------------------------------------------------- retrieval

def test_recall_at_k_hand_matrix():
    sim = [[0.9, 0.1, 0.2],   # correct first: rank 1
           [0.8, 0.5, 0.1],   # one candidate above: rank 2
           [0.3, 0.3, 0.3]]   # two ties, counted pessimistically: rank 3
    assert recall_at_k(sim, (1, 2, 3)) == {"r1": pytest.approx(1 / 3), "r2": pytest.approx(2 / 3), "r3": 1.0}
    # constant similarities: every query ranks last
    assert recall_at_k(np.ones((4, 4)), (1, 3, 4)) == {"r1": 0.0, "r3": 0.0, "r4": 1.0}
    # extra distractor candidates beyond the queries
    assert recall_at_k([[1.0, 0.0, 2.0], [0.0, 1.0, 0.5]], (1, 2)) == {"r1": 0.5, "r2": 1.0}


def brute_ranks(sim):
    ranks = []
    for i, row in enumerate(sim):
        ranks.append(1 + sum(1 for j, v in enumerate(row) if j != i and v >= row[i]))
    return ranks


def brute_pool_recall(img, txt, pool_sizes, ks, n_pools, seed, direction):
    """The documented protocol written out with loops."""
    q, c = (img, txt) if direction == "i2t" else (txt, img)
    out = {}
    for p in pool_sizes:
        if p > len(img):
            out.update({f"r{k}_pool{p}": None for k in ks})
            continue
        rng = np.random.default_rng([seed, p])
        hits = {k: [] for k in ks}
        for _ in range(n_pools):
            idx = rng.choice(len(img), size=p, replace=False)
            assert len(set(idx.tolist())) == p
            sim = [[float(np.dot(q[a], c[b])) for b in idx] for a in idx]
            for r in brute_ranks(sim):
                for k in ks:
                    hits[k].append(r <= k)
        out.update({f"r{k}_pool{p}": float(np.mean(hits[k])) for k in ks})
    return out


def _embeddings(n, e, noise, seed):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, e))
    txt = img + noise * rng.normal(size=(n, e))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img, txt


def test_pool_recall_matches_brute_force_protocol():
    img, txt = _embeddings(40, 8, 0.9, 0)
    for direction in ("i2t", "t2i"):
        ours = pool_recall(img, txt, pool_sizes=(8, 16, 64), k_values=(1, 5), n_pools=7, seed=3, direction=direction)
        ref = brute_pool_recall(img, txt, (8, 16, 64), (1, 5), 7, 3, direction)
        assert ours.keys() == ref.keys()
        for key in ref:
            assert (ours[key] is None and ref[key] is None) or ours[key] == pytest.approx(ref[key]), key
    assert ours["r1_pool64"] is None and ours["r5_pool64"] is None


def test_pool_recall_properties():
    img, txt = _embeddings(30, 6, 0.7, 1)
    # a pool of all N cases is the full set in some order: equals full-set recall
    full = recall_at_k(img @ txt.T, (1, 5))
    whole = pool_recall(img, txt, pool_sizes=(30,), k_values=(1, 5), n_pools=3)
    assert whole == {"r1_pool30": pytest.approx(full["r1"]), "r5_pool30": pytest.approx(full["r5"])}
    t2i = pool_recall(img, txt, pool_sizes=(30,), k_values=(1,), n_pools=2, direction="t2i")
    assert t2i["r1_pool30"] == pytest.approx(recall_at_k(txt @ img.T, (1,))["r1"])
    # a pool size's result does not depend on the other sizes requested
    alone = pool_recall(img, txt, pool_sizes=(8,), k_values=(1,), n_pools=5, seed=9)
    mixed = pool_recall(img, txt, pool_sizes=(16, 8), k_values=(1,), n_pools=5, seed=9)
    assert alone["r1_pool8"] == mixed["r1_pool8"]
    # perfect and collapsed embeddings
    eye = np.eye(10)
    assert pool_recall(eye, eye, pool_sizes=(4,), k_values=(1,), n_pools=5) == {"r1_pool4": 1.0}
    flat = np.ones((10, 3)) / math.sqrt(3)
    assert pool_recall(flat, flat, pool_sizes=(4,), k_values=(1, 3, 4), n_pools=5) == {
        "r1_pool4": 0.0, "r3_pool4": 0.0, "r4_pool4": 1.0}
    # torch input works the same
    assert pool_recall(torch.tensor(img), torch.tensor(txt), pool_sizes=(30,), k_values=(1,), n_pools=1)["r1_pool30"] == \
        pytest.approx(full["r1"])


def test_retrieval_input_errors_are_one_line():
    img = np.eye(4)
    cases = [
        (recall_at_k, (np.ones((3, 2)),)),
        (recall_at_k, (np.ones(3),)),
        (recall_at_k, (np.eye(3), (0,))),
        (recall_at_k, ([[1.0, float("nan")], [0.0, 1.0]],)),
        (pool_recall, (img, np.eye(5))),
        (pool_recall, (img, img[:, :3])),
        (pool_recall, (img, img), {"direction": "both"}),
        (pool_recall, (img, img), {"n_pools": 0}),
        (pool_recall, (img, img), {"pool_sizes": (1,)}),
    ]
    for case in cases:
        fn, args = case[0], case[1]
        kwargs = case[2] if len(case) > 2 else {}
        with pytest.raises(VolumeVLMError) as info:
            fn(*args, **kwargs)
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- segmentation

def test_dice_two_cubes_and_absent_labels():
    pred = np.zeros((8, 8, 8), dtype=np.int16)
    target = np.zeros((8, 8, 8), dtype=np.uint8)
    pred[0:4, 0:4, 0:4] = 1
    target[2:6, 0:4, 0:4] = 1  # overlap 2x4x4 = 32 voxels of 64 each -> Dice 0.5
    pred[6:8, 6:8, 6:8] = 2  # label 2 only in pred -> 0
    out = dice_per_label(pred, target, {1: "liver", 2: "spleen", 3: "kidney"})
    assert out == {"liver": 0.5, "spleen": 0.0, "kidney": None}
    assert dice_per_label(torch.tensor(target), target.astype(np.float32), {1: "liver"}) == {"liver": 1.0}


def brute_surface(mask):
    """Voxels of mask with a 6-neighbour outside mask or outside the volume, by loops."""
    out = np.zeros_like(mask, dtype=bool)
    shape = mask.shape
    for idx in zip(*np.nonzero(mask)):
        for axis, step in itertools.product(range(3), (-1, 1)):
            n = list(idx)
            n[axis] += step
            if not (0 <= n[axis] < shape[axis]) or not mask[tuple(n)]:
                out[idx] = True
                break
    return out


def brute_hd95(a, b, spacing):
    pa = np.argwhere(brute_surface(a)) * np.asarray(spacing)
    pb = np.argwhere(brute_surface(b)) * np.asarray(spacing)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))  # all pairs
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


def _sphere(shape, centre, radius):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return ((grid - np.asarray(centre)) ** 2).sum(-1) <= radius ** 2


def test_surface_voxels_match_brute_force():
    rng = np.random.default_rng(0)
    mask = rng.random((6, 7, 5)) < 0.5
    assert np.array_equal(surface_voxels(mask), brute_surface(mask))


def test_hd95_single_voxels_and_shifted_spheres_against_brute_force():
    a = np.zeros((5, 5, 5), dtype=int)
    b = np.zeros((5, 5, 5), dtype=int)
    a[1, 1, 1] = 1
    b[1, 3, 2] = 1
    # offset (0, 2, 1) voxels at spacing (0.5, 1.5, 2.0) mm -> sqrt(3^2 + 2^2)
    assert hd95_per_label(a, b, {1: "x"}, (0.5, 1.5, 2.0))["x"] == pytest.approx(math.sqrt(13))

    shape = (18, 16, 14)
    pred = _sphere(shape, (8, 7, 6), 4.5).astype(np.int32)
    target = _sphere(shape, (10, 7, 7), 4.0).astype(np.int32) * 2
    pred[0:3, 0:3, 0:3] = 3  # a label touching the volume border
    target[0:2, 0:4, 0:3] = 3
    spacing = (0.8, 1.0, 2.5)
    labels = {1: "p_only", 2: "t_only", 3: "corner", 4: "absent"}
    ours = hd95_per_label(pred, target, labels, spacing)
    assert ours["p_only"] == math.inf and ours["t_only"] == math.inf and ours["absent"] is None
    assert ours["corner"] == pytest.approx(brute_hd95(pred == 3, target == 3, spacing))
    # the two spheres as one label each side
    shifted = np.where(target == 2, 1, 0)
    ours = hd95_per_label(np.where(pred == 1, 1, 0), shifted, {1: "sphere"}, spacing)["sphere"]
    ref = brute_hd95(pred == 1, shifted == 1, spacing)
    assert ref > 0 and ours == pytest.approx(ref)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # raised inside MONAI, not by our call
def test_hd95_agrees_with_monai():
    from monai.metrics import compute_hausdorff_distance

    shape = (18, 16, 14)
    pred = _sphere(shape, (8, 7, 6), 4.5)
    target = _sphere(shape, (10, 8, 7), 4.0)
    spacing = (0.8, 1.0, 2.5)
    ours = hd95_per_label(pred.astype(int), target.astype(int), {1: "s"}, spacing)["s"]
    theirs = compute_hausdorff_distance(
        torch.tensor(pred)[None, None].float(), torch.tensor(target)[None, None].float(),
        include_background=True, percentile=95, spacing=spacing).item()
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_segmentation_input_errors_are_one_line():
    a = np.zeros((4, 4, 4), dtype=int)
    cases = [
        (dice_per_label, (a, np.zeros((4, 4, 5), dtype=int), {1: "x"})),
        (dice_per_label, (a[0], a[0], {1: "x"})),
        (dice_per_label, (a + 0.5, a, {1: "x"})),
        (dice_per_label, (a, a, {})),
        (dice_per_label, (a, a, {"1": "x"})),
        (hd95_per_label, (a, np.zeros((5, 4, 4), dtype=int), {1: "x"}, (1, 1, 1))),
        (hd95_per_label, (a, a, {1: "x"}, (1, 1))),
        (hd95_per_label, (a, a, {1: "x"}, (1, 0, 1))),
    ]
    for fn, args in cases:
        with pytest.raises(VolumeVLMError) as info:
            fn(*args)
        assert "\n" not in str(info.value)
