"""The yardsticks of ``volumevlm evaluate`` (volumevlm.eval.probes) against hand computations:
the voxel features of a tiny volume, and the probes' AUROC figures on a tiny case set whose
ranking is known in advance (one feature: a fitted logistic probe can only rank the cases by
that feature, upwards or downwards, so its AUROC is a pair count done here by hand)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from volumevlm.errors import VolumeVLMError
from volumevlm.eval.probes import probe_scores, probe_section, voxel_features
from volumevlm.metrics import macro_auroc_interval


def test_voxel_features_are_cell_means_and_an_hu_histogram_by_hand():
    # One 4x4x2 volume, window [-1000, 1000]: value v in [0, 1] is HU -1000 + 2000 v.
    volume = torch.zeros(4, 4, 2)
    volume[:2, :2] = 0.0      # cell (0, 0): -1000 HU
    volume[2:, :2] = 0.25     # cell (1, 0): -500 HU
    volume[:2, 2:] = 0.6      # cell (0, 1): +200 HU
    volume[2:, 2:] = 1.0      # cell (1, 1): +1000 HU (top edge: last bin)
    volume[3, 3, 1] = 0.9     # one voxel of cell (1, 1) at +800 HU
    features = voxel_features(volume[None, None], (-1000.0, 1000.0), grid=(2, 2, 1), bins=4)
    assert features.shape == (1, 2 * 2 * 1 + 4)
    cells = [0.0, 0.6, 0.25, (7 * 1.0 + 0.9) / 8]  # flatten order: x slowest, then y, then z
    assert features[0, :4].tolist() == pytest.approx(cells)
    # bins of 500 HU: [-1000, -500) 8 voxels, [-500, 0) 8, [0, 500) 8, [500, 1000] 8
    assert features[0, 4:].tolist() == pytest.approx([8 / 32, 8 / 32, 8 / 32, 8 / 32])
    # The grid and window are the caller's: a [0, 400] window puts everything at <=0 HU in bin 0.
    narrow = voxel_features(volume[None, None], (0.0, 400.0), grid=(1, 1, 1), bins=2)
    assert narrow[0, 1:].tolist() == pytest.approx([16 / 32, 16 / 32])
    with pytest.raises(VolumeVLMError, match="voxel_features"):
        voxel_features(torch.zeros(2, 3, 4, 4, 4), (0.0, 1.0))


def _pair_count(values, labels):
    """AUROC as the share of (positive, negative) pairs ranked right, ties one half."""
    pos = [v for v, y in zip(values, labels) if y == 1]
    neg = [v for v, y in zip(values, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_probe_figures_match_a_hand_computation_on_a_tiny_case_set():
    rng = np.random.default_rng(0)
    train_x = np.linspace(-2, 2, 24)[:, None]
    noise = rng.normal(0, 0.8, 24)
    up = (train_x[:, 0] + noise > 0).astype(float)          # rises with x (noisy: finite weights)
    down = (train_x[:, 0] + noise < 0).astype(float)        # falls with x
    one_class = np.ones(24)                                  # cannot be fitted
    varied = up.copy()                                       # fitted, one class where scored
    unlabelled = up.copy()
    unlabelled[::3] = -1                                     # a third of the labels unknown
    train_y = np.stack([up, down, one_class, varied, unlabelled], axis=1)
    eval_x = np.array([[0.1], [0.4], [0.35], [0.8], [-0.5], [1.2]])
    eval_up = [0, 0, 1, 1, 0, 1]
    eval_down = [1, 0, 1, 0, 1, 0]
    eval_y = np.array([[a, b, 1, 1, a] for a, b in zip(eval_up, eval_down)], dtype=float)
    eval_y[1, 4] = -1  # unlabelled in the evaluated split too: left out of that finding's AUROC
    names = ["up", "down", "one_class", "varied", "unlabelled"]

    section = probe_section(train_x, train_y, eval_x, eval_y, names, features="x")
    x = eval_x[:, 0].tolist()
    # By hand: positives {0.35, 0.8, 1.2} vs negatives {0.1, 0.4, -0.5}: 8 of 9 pairs.
    assert _pair_count(x, eval_up) == pytest.approx(8 / 9)
    expected = {
        "up": 8 / 9,
        "down": _pair_count([-v for v in x], eval_down),
        "one_class": None,   # the training split has no negative
        "varied": None,      # the evaluated split has no negative
        "unlabelled": _pair_count([v for i, v in enumerate(x) if i != 1], [y for i, y in enumerate(eval_up) if i != 1]),
    }
    assert section["per_finding"] == pytest.approx(expected)
    scored = [expected["up"], expected["down"], expected["unlabelled"]]
    assert section["findings_scored"] == 3 and section["findings"] == 5
    assert section["macro_auroc"] == pytest.approx(sum(scored) / 3)
    # The interval is zero-shot's bootstrap over the same ranking (AUROC only sees ranks).
    ranking = np.stack([eval_x[:, 0], -eval_x[:, 0], eval_x[:, 0]], axis=1)
    assert section["macro_auroc_ci95"] == pytest.approx(macro_auroc_interval(ranking, eval_y[:, [0, 1, 4]]))
    assert section["feature_dim"] == 1 and section["train_cases"] == 24 and section["chance"] == 0.5

    scores, fitted = probe_scores(train_x, train_y, eval_x)
    assert fitted == [True, True, False, True, True]
    assert np.isnan(scores[:, 2]).all() and np.isfinite(scores[:, [0, 1, 3, 4]]).all()


def test_a_probe_on_features_without_signal_reads_chance_and_bad_shapes_fail_in_one_line():
    rng = np.random.default_rng(1)
    train_x, eval_x = rng.normal(size=(200, 5)), rng.normal(size=(400, 5))
    train_y, eval_y = rng.integers(0, 2, (200, 2)), rng.integers(0, 2, (400, 2))
    section = probe_section(train_x, train_y, eval_x, eval_y, ["a", "b"], features="noise")
    low, high = section["macro_auroc_ci95"]
    assert low < 0.5 < high and abs(section["macro_auroc"] - 0.5) < 0.08
    with pytest.raises(VolumeVLMError, match="probe") as err:
        probe_scores(train_x, train_y, eval_x[:, :3])
    assert "\n" not in str(err.value)
