"""Evaluation figures: every function writes a valid, non-blank PNG atomically and
refuses bad input with a one-line error. Inputs are small random arrays and a
geometric phantom (synthetic, not clinical data)."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread

from volumevlm.errors import VolumeVLMError
from volumevlm.eval.plots import (
    _slice_indices,
    plot_dice_boxplot,
    plot_label_efficiency,
    plot_retrieval_recall,
    plot_roc_curves,
    plot_segmentation_overlay,
)
from volumevlm.metrics import pool_recall

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(path):
    """The file is a PNG with visible content; returns its pixels [H, W, C] in [0, 1]."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert float(pixels[..., :3].std()) > 0.01
    # nothing but the figure is left behind in the folder (no temp files)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    return pixels


def _roc_data(rng, n=60, f=4):
    targets = rng.integers(0, 2, size=(n, f))
    scores = targets * 0.8 + rng.normal(size=(n, f))
    return scores, targets


def test_roc_curves(tmp_path):
    rng = np.random.default_rng(0)
    scores, targets = _roc_data(rng)
    targets[:, 3] = 1  # one class only: listed as n/a, no curve
    out = plot_roc_curves(scores, targets, ["a", "b", "c", "d"], tmp_path / "roc.png", title="test")
    assert out == tmp_path / "roc.png"
    check_png(out)


def test_synthetic_flag_changes_the_figure(tmp_path):
    rng = np.random.default_rng(1)
    scores, targets = _roc_data(rng)
    plain = check_png(plot_roc_curves(scores, targets, list("abcd"), tmp_path / "a" / "plain.png"))
    marked = check_png(plot_roc_curves(scores, targets, list("abcd"), tmp_path / "b" / "marked.png", synthetic=True))
    assert plain.shape != marked.shape or not np.array_equal(plain, marked)


def test_retrieval_recall(tmp_path):
    rng = np.random.default_rng(2)
    img = rng.normal(size=(40, 8))
    txt = img + rng.normal(size=(40, 8))
    results = pool_recall(img, txt, pool_sizes=(8, 16, 32, 64), k_values=(1, 5), n_pools=3)
    assert results["r1_pool64"] is None  # skipped, not plotted
    check_png(plot_retrieval_recall(results, tmp_path / "recall.png", synthetic=True))


def test_dice_boxplot(tmp_path):
    rng = np.random.default_rng(3)
    per_case = {"liver": list(rng.uniform(0.8, 0.95, 12)), "spleen": list(rng.uniform(0.6, 0.9, 12)) + [None],
                "kidney": [float("nan"), 0.7, 0.75], "absent": []}
    check_png(plot_dice_boxplot(per_case, tmp_path / "dice.png"))


def test_label_efficiency(tmp_path):
    check_png(plot_label_efficiency([0.1, 0.25, 0.5, 1.0], [0.55, 0.7, 0.78, 0.83], tmp_path / "eff.png",
                                    synthetic=True, baseline=[0.3, 0.5, 0.7, 0.8]))


def _phantom():
    shape = (40, 36, 30)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    body = ((grid - (20, 18, 15)) ** 2 / np.array([18, 16, 13]) ** 2).sum(-1) <= 1
    organ = ((grid - (14, 20, 12)) ** 2).sum(-1) <= 36
    bone = ((grid - (26, 10, 18)) ** 2).sum(-1) <= 9
    image = np.where(body, 40.0, -1000.0) + np.where(organ, 60.0, 0) + np.where(bone, 600.0, 0)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[organ] = 1
    mask[bone] = 2
    return image.astype(np.float32), mask


def test_segmentation_overlay_draws_coloured_labels(tmp_path):
    image, mask = _phantom()
    pixels = check_png(plot_segmentation_overlay(image, mask, tmp_path / "overlay.png", {1: "liver", 2: "bone"},
                                                 slices=3, synthetic=True))
    rgb = pixels[..., :3]
    # a grey-scale CT alone has R == G == B everywhere; the overlay adds coloured pixels
    coloured = (np.abs(rgb[..., 0] - rgb[..., 1]) > 0.1) | (np.abs(rgb[..., 1] - rgb[..., 2]) > 0.1)
    assert coloured.sum() > 200
    # an empty mask still plots (centre of the volume, "mask is empty")
    empty = tmp_path / "empty"
    check_png(plot_segmentation_overlay(image, np.zeros_like(mask), empty / "overlay.png", {}, slices=1))


def test_overlay_slices_pass_through_the_mask_centre():
    assert _slice_indices(12.3, 5, 20, 3, 40) == [9, 12, 16]
    assert _slice_indices(12.3, 5, 20, 1, 40) == [12]
    assert _slice_indices(0.0, 0, 3, 4, 4) == [1, 1, 2, 2]
    assert all(0 <= i < 4 for i in _slice_indices(3.0, 0, 3, 5, 4))


def test_failed_plot_keeps_the_old_file(tmp_path):
    path = tmp_path / "eff.png"
    plot_label_efficiency([0.5, 1.0], [0.6, 0.8], path)
    before = path.read_bytes()
    with pytest.raises(VolumeVLMError):
        plot_label_efficiency([0.5, 1.0], [0.6, 1.8], path)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "call",
    [
        lambda p: plot_roc_curves(np.zeros((5, 2)), np.zeros((5, 3)), ["a", "b"], p),
        lambda p: plot_roc_curves(np.zeros((5, 2)), np.zeros((5, 2)), ["a"], p),
        lambda p: plot_roc_curves(np.zeros((5, 1)), np.ones((5, 1)), ["a"], p),  # no finding with both classes
        lambda p: plot_roc_curves(np.zeros((4, 1)), np.array([[0], [1], [0], [1]]), ["a"], p.with_suffix(".jpg")),
        lambda p: plot_retrieval_recall({"recall1": 0.5}, p),
        lambda p: plot_retrieval_recall({"r1_pool32": None}, p),
        lambda p: plot_retrieval_recall({"r1_pool32": 1.5}, p),
        lambda p: plot_dice_boxplot({"liver": [1.2]}, p),
        lambda p: plot_dice_boxplot({"liver": []}, p),
        lambda p: plot_dice_boxplot({"liver": "0.9"}, p),
        lambda p: plot_dice_boxplot({"liver": [0.5, "high"]}, p),
        lambda p: plot_segmentation_overlay(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), p, {}),
        lambda p: plot_segmentation_overlay(np.zeros((4, 4)), np.zeros((4, 4)), p, {}),
        lambda p: plot_segmentation_overlay(np.zeros((4, 4, 4)), np.full((4, 4, 4), 0.5), p, {}),
        lambda p: plot_segmentation_overlay(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), p, {}, slices=0),
        lambda p: plot_label_efficiency([0.5, 1.0], [0.6], p),
        lambda p: plot_label_efficiency([0.0, 1.0], [0.6, 0.7], p),
        lambda p: plot_label_efficiency([0.5, 1.0], [0.6, 0.7], p, baseline=[0.1]),
    ],
)
def test_bad_input_is_refused_with_one_line(tmp_path, call):
    path = tmp_path / "out.png"
    with pytest.raises(VolumeVLMError) as info:
        call(path)
    assert "\n" not in str(info.value)
    assert not path.exists() and list(tmp_path.iterdir()) == []
