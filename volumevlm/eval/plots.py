"""Evaluation figures: ROC curves, retrieval recall, Dice box plots, segmentation
overlays and label-efficiency curves.

Every function draws on its own :class:`matplotlib.figure.Figure` (never pyplot's
global figure list, so nothing leaks between calls or threads), writes a PNG
atomically (a temporary file in the destination folder, then ``os.replace``) and
returns the path. ``synthetic=True`` adds the footer "synthetic data, not clinical".
Bad input raises a one-line :class:`~volumevlm.errors.VolumeVLMError`.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

# Headless servers have no display: pick the file-only backend before pyplot can be
# imported anywhere. If the caller already imported pyplot, their backend choice
# stands; these functions never use pyplot, so they work under any backend.
if "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from volumevlm.errors import VolumeVLMError  # noqa: E402
from volumevlm.metrics import _array, auroc, roc_curve_points  # noqa: E402

SYNTHETIC_NOTE = "synthetic data, not clinical"
DPI = 120


def _png_path(path: str | os.PathLike, what: str) -> Path:
    out = Path(path).expanduser()
    if out.suffix.lower() != ".png":
        raise VolumeVLMError(f"{what}: output path {out} must end in .png")
    if out.is_dir():
        raise VolumeVLMError(f"{what}: output path {out} is a folder")
    return out


def _lowest_drawn_y(fig: Figure) -> float:
    """The lowest point of any axes' artists (tick labels included), in figure coordinates."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    renderer = canvas.get_renderer()
    lowest = 0.0
    for ax in fig.axes:
        box = ax.get_tightbbox(renderer)
        if box is not None:
            lowest = min(lowest, fig.transFigure.inverted().transform((0.0, box.y0))[1])
    return float(lowest)


def _save(fig: Figure, path: Path, synthetic: bool) -> Path:
    """Write fig to path atomically and return the path."""
    if synthetic:
        # Below everything drawn (rotated tick labels reach under the figure's bottom
        # edge); bbox_inches="tight" then grows the canvas to include the note.
        fig.text(0.5, _lowest_drawn_y(fig) - 0.01, SYNTHETIC_NOTE, ha="center", va="top", fontsize=8,
                 color="0.35", style="italic")
    from volumevlm.io.writers import write_atomic

    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight"))
    except OSError as err:
        raise VolumeVLMError(f"{path}: cannot write the figure ({err.strerror or err})") from None


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


# --------------------------------------------------------------------------- ROC

def plot_roc_curves(
    scores: Any,
    targets: Any,
    names: Sequence[str],
    path: str | os.PathLike,
    title: str = "Zero-shot ROC curves",
    synthetic: bool = False,
) -> Path:
    """Per-finding ROC curves on one axes, AUROC in the legend.

    scores: [N, F] float; targets: [N, F] 0/1 (NaN / -1 = unlabelled); names: F strings.
    Findings whose labelled rows hold one class get no curve; the legend says so.
    The title adds the macro AUROC over findings with both classes.
    """
    s = _array(scores, "plot_roc_curves: scores")
    t = _array(targets, "plot_roc_curves: targets")
    if s.ndim != 2 or s.shape != t.shape:
        raise VolumeVLMError(f"plot_roc_curves: scores and targets must both be [N, F], got {s.shape} and {t.shape}")
    names = [str(n) for n in names]
    if len(names) != s.shape[1] or s.shape[1] == 0:
        raise VolumeVLMError(f"plot_roc_curves: {len(names)} names for {s.shape[1]} score columns")
    out = _png_path(path, "plot_roc_curves")
    fig = Figure(figsize=(7.5 if len(names) > 10 else 6.5, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--", label="chance")
    values = []
    for j, (name, colour) in enumerate(zip(names, _colours(len(names)))):
        value = auroc(s[:, j], t[:, j])  # validates the column
        if math.isnan(value):
            ax.plot([], [], color=colour, label=f"{name} (n/a: one class)")
            continue
        fpr, tpr = roc_curve_points(s[:, j], t[:, j])
        ax.plot(fpr, tpr, color=colour, lw=1.3, ls="-" if j < 10 else ":", label=f"{name} ({value:.3f})")
        values.append(value)
    if not values:
        raise VolumeVLMError("plot_roc_curves: no finding has both classes; nothing to plot")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{title}\nmacro AUROC {np.mean(values):.3f} over {len(values)} finding(s)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7 if len(names) <= 20 else 5.5,
              title="finding (AUROC)", title_fontsize=7, frameon=False)
    return _save(fig, out, synthetic)


# --------------------------------------------------------------------------- retrieval

_RESULT_KEY = re.compile(r"^r(\d+)_pool(\d+)$")


def plot_retrieval_recall(
    results: Mapping[str, float | None],
    path: str | os.PathLike,
    title: str = "Retrieval recall@k",
    synthetic: bool = False,
) -> Path:
    """Recall@k against pool size, one line per k.

    results: {"r{k}_pool{P}": float in [0, 1] or None} as :func:`volumevlm.metrics.pool_recall`
    returns; None entries (pool larger than the test set) are left out.
    """
    if not isinstance(results, Mapping) or not results:
        raise VolumeVLMError("plot_retrieval_recall: results must be a non-empty mapping {'r{k}_pool{P}': value}")
    series: dict[int, list[tuple[int, float]]] = {}
    for key, value in results.items():
        m = _RESULT_KEY.match(str(key))
        if not m:
            raise VolumeVLMError(f"plot_retrieval_recall: key {key!r} is not of the form 'r{{k}}_pool{{P}}'")
        if value is None:
            continue
        v = float(value)
        if not (0.0 <= v <= 1.0):
            raise VolumeVLMError(f"plot_retrieval_recall: {key} = {value!r} is not a recall in [0, 1]")
        series.setdefault(int(m.group(1)), []).append((int(m.group(2)), v))
    if not series:
        raise VolumeVLMError("plot_retrieval_recall: every value is None; nothing to plot")
    out = _png_path(path, "plot_retrieval_recall")
    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    pools = sorted({p for pts in series.values() for p, _ in pts})
    for (k, pts), colour in zip(sorted(series.items()), _colours(len(series))):
        pts.sort()
        ax.plot([p for p, _ in pts], [v for _, v in pts], marker="o", color=colour, label=f"recall@{k}")
        # Chance level of recall@k in a pool of P is min(k, P) / P.
        ax.plot(pools, [min(k, p) / p for p in pools], color=colour, lw=0.8, ls=":", alpha=0.7)
    ax.set_xscale("log", base=2)
    ax.set_xticks(pools)
    ax.set_xticklabels([str(p) for p in pools])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("pool size (cases)")
    ax.set_ylabel("recall")
    ax.set_title(f"{title}\n(dotted: chance)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out, synthetic)


# --------------------------------------------------------------------------- Dice

def plot_dice_boxplot(
    per_case: Mapping[str, Sequence[float | None]],
    path: str | os.PathLike,
    title: str = "Dice per label",
    synthetic: bool = False,
) -> Path:
    """Box plot of per-case Dice for each label, with the cases as dots.

    per_case: {label name: [Dice of each case, in [0, 1]; None or NaN = label absent
    from that case, left out]}. Labels with no values are shown as an empty slot (n=0).
    """
    if not isinstance(per_case, Mapping) or not per_case:
        raise VolumeVLMError("plot_dice_boxplot: per_case must be a non-empty mapping {label: [dice, ...]}")
    names, data = [], []
    for name, values in per_case.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
            raise VolumeVLMError(f"plot_dice_boxplot: {name}: expected a list of Dice values, got {type(values).__name__}")
        clean = []
        for v in values:
            if v is None:
                continue
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise VolumeVLMError(f"plot_dice_boxplot: {name}: {v!r} is not a number") from None
            if math.isnan(f):
                continue
            if not (0.0 <= f <= 1.0):
                raise VolumeVLMError(f"plot_dice_boxplot: {name}: Dice {v!r} is outside [0, 1]")
            clean.append(f)
        names.append(str(name))
        data.append(clean)
    if not any(data):
        raise VolumeVLMError("plot_dice_boxplot: no Dice values to plot")
    out = _png_path(path, "plot_dice_boxplot")
    fig = Figure(figsize=(max(4.0, 0.6 * len(names) + 2.0), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    positions = [i + 1 for i, d in enumerate(data) if d]
    ax.boxplot([d for d in data if d], positions=positions, widths=0.55, showfliers=False)
    rng = np.random.default_rng(0)  # jitter only; fixed so figures are reproducible
    for pos, d in zip(positions, [d for d in data if d]):
        ax.scatter(pos + rng.uniform(-0.12, 0.12, len(d)), d, s=8, alpha=0.6, color="tab:blue", zorder=3)
    ax.set_xticks(range(1, len(names) + 1))
    ax.set_xticklabels([f"{n}\n(n={len(d)})" for n, d in zip(names, data)], rotation=45 if len(names) > 6 else 0,
                       ha="right" if len(names) > 6 else "center", fontsize=8)
    ax.set_xlim(0.4, len(names) + 0.6)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out, synthetic)


# --------------------------------------------------------------------------- overlay

_VIEWS = (("axial", 2), ("coronal", 1), ("sagittal", 0))


def _slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The plane ``index`` across ``axis`` of a [X, Y, Z] volume, transposed so that
    imshow(origin="lower") puts the later stored axis upwards (y or z)."""
    return np.take(volume, index, axis=axis).T


def _slice_indices(centre: float, lo: float, hi: float, n: int, size: int) -> list[int]:
    """n plane indices: evenly inside [lo, hi], the middle one (n odd) at the centre."""
    points = np.linspace(lo, hi, n + 2)[1:-1]
    if n % 2:
        points[n // 2] = centre
    return [int(np.clip(round(float(x)), 0, size - 1)) for x in points]


def plot_segmentation_overlay(
    image: Any,
    mask: Any,
    path: str | os.PathLike,
    label_names: Mapping[int, str],
    slices: int = 3,
    title: str = "Segmentation overlay",
    synthetic: bool = False,
    window: tuple[float, float] | None = None,
    spacing_mm: Sequence[float] | None = None,
) -> Path:
    """Axial, coronal and sagittal slices with a coloured label overlay and legend.

    image: [X, Y, Z] float (e.g. HU); mask: [X, Y, Z] integer labels (0 = background).
    label_names: {label value: name} for the legend (labels in the mask but not here
    are drawn and listed as "label <value>").
    slices: planes per view (rows: axial, coronal, sagittal); the middle plane passes
    through the centroid of the mask's foreground and the others are spread evenly
    over its bounding box (the volume's centre and extent when the mask is empty).
    Axes are taken as RAS+ (volumevlm's preprocessing orients to RAS): axial and
    coronal planes are drawn in radiological convention (patient's right on the
    viewer's left, anterior / superior up); sagittal planes show anterior to the right.
    window: (low, high) display range. Default: a soft-tissue CT window (-160, 240) HU
    when the image looks like HU (its 1st percentile is below -500), otherwise the
    image's 1st-99th percentiles (e.g. for intensities already scaled to [0, 1]).
    spacing_mm: voxel sizes along X, Y, Z so that pixels get their true aspect
    (default: square pixels).
    """
    img = _array(image, "plot_segmentation_overlay: image")
    lab = _array(mask, "plot_segmentation_overlay: mask")
    if img.ndim != 3 or img.shape != lab.shape:
        raise VolumeVLMError(f"plot_segmentation_overlay: image and mask must both be [X, Y, Z], got {img.shape} and {lab.shape}")
    if not np.isfinite(img).all():
        raise VolumeVLMError("plot_segmentation_overlay: image holds NaN or inf")
    if not np.isfinite(lab).all() or (lab != np.round(lab)).any() or (lab < 0).any():
        raise VolumeVLMError("plot_segmentation_overlay: mask must hold non-negative integer labels")
    if isinstance(slices, bool) or int(slices) != slices or not 1 <= slices <= 9:
        raise VolumeVLMError(f"plot_segmentation_overlay: slices must be an integer from 1 to 9, got {slices!r}")
    if not isinstance(label_names, Mapping):
        raise VolumeVLMError("plot_segmentation_overlay: label_names must be a mapping {label value: name}")
    sp = np.ones(3) if spacing_mm is None else _array(spacing_mm, "plot_segmentation_overlay: spacing_mm").reshape(-1)
    if sp.shape != (3,) or not (np.isfinite(sp).all() and (sp > 0).all()):
        raise VolumeVLMError("plot_segmentation_overlay: spacing_mm must be 3 positive numbers")
    lab = lab.astype(np.int64)
    present = [int(v) for v in np.unique(lab) if v != 0]
    names = {int(k): str(v) for k, v in label_names.items()}
    out = _png_path(path, "plot_segmentation_overlay")

    fg = np.argwhere(lab > 0)
    if len(fg):
        centre, lo, hi = fg.mean(axis=0), fg.min(axis=0), fg.max(axis=0)
    else:
        shape = np.array(img.shape)
        centre, lo, hi = (shape - 1) / 2.0, np.zeros(3), shape - 1
    if window is not None:
        low, high = (float(w) for w in window)
    elif np.percentile(img, 1) < -500:
        low, high = -160.0, 240.0
    else:
        low, high = float(np.percentile(img, 1)), float(np.percentile(img, 99))
    if not high > low:
        high = low + 1.0

    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    values = sorted(set(present) | set(names))
    colours = dict(zip(values, _colours(len(values))))
    lut = np.zeros((max(values + [0]) + 1, 4))
    for v, c in colours.items():
        lut[v] = (c[0], c[1], c[2], 0.45)
    cmap = ListedColormap(lut)

    fig = Figure(figsize=(2.4 * slices + 1.6, 2.4 * 3), layout="constrained")
    grid = fig.subplots(3, slices, squeeze=False)
    for row, (view, axis) in enumerate(_VIEWS):
        idx = _slice_indices(centre[axis], lo[axis], hi[axis], int(slices), img.shape[axis])
        across, up = [a for a in range(3) if a != axis]
        aspect = float(sp[up] / sp[across])
        for col, index in enumerate(idx):
            ax = grid[row][col]
            ax.imshow(_slice(img, axis, index), cmap="gray", vmin=low, vmax=high, origin="lower", interpolation="nearest",
                      aspect=aspect)
            plane = _slice(lab, axis, index)
            ax.imshow(np.ma.masked_equal(plane, 0), cmap=cmap, vmin=0, vmax=len(lut) - 1, origin="lower",
                      interpolation="nearest", aspect=aspect)
            if axis != 0:
                ax.invert_xaxis()  # radiological convention: the patient's right on the viewer's left
            ax.set_title(f"{view} {'xyz'[axis]}={index}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [Patch(color=colours[v][:3], label=names.get(v, f"label {v}")) for v in values if v in present]
    if handles:
        fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    fig.suptitle(title if handles else f"{title} (mask is empty)", fontsize=10)
    return _save(fig, out, synthetic)


# --------------------------------------------------------------------------- label efficiency

def plot_label_efficiency(
    fractions: Sequence[float],
    dice: Sequence[float],
    path: str | os.PathLike,
    title: str = "Label efficiency",
    synthetic: bool = False,
    baseline: Sequence[float] | None = None,
) -> Path:
    """Dice against the fraction of labelled training cases.

    fractions: values in (0, 1] (e.g. 0.1, 0.25, 1.0), plotted on a log axis;
    dice: the same number of values in [0, 1]; baseline: optional second curve of the
    same length (e.g. training from scratch), drawn dashed.
    """
    fr = _array(fractions, "plot_label_efficiency: fractions").reshape(-1)
    dc = _array(dice, "plot_label_efficiency: dice").reshape(-1)
    if fr.size == 0 or fr.shape != dc.shape:
        raise VolumeVLMError(f"plot_label_efficiency: fractions and dice must be equally long and non-empty, got {fr.size} and {dc.size}")
    if not (np.isfinite(fr).all() and (fr > 0).all() and (fr <= 1).all()):
        raise VolumeVLMError("plot_label_efficiency: fractions must lie in (0, 1]")
    if not (np.isfinite(dc).all() and (dc >= 0).all() and (dc <= 1).all()):
        raise VolumeVLMError("plot_label_efficiency: dice values must lie in [0, 1]")
    base = None
    if baseline is not None:
        base = _array(baseline, "plot_label_efficiency: baseline").reshape(-1)
        if base.shape != fr.shape or not (np.isfinite(base).all() and (base >= 0).all() and (base <= 1).all()):
            raise VolumeVLMError("plot_label_efficiency: baseline must match fractions in length and lie in [0, 1]")
    out = _png_path(path, "plot_label_efficiency")
    order = np.argsort(fr)
    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(fr[order], dc[order], marker="o", color="tab:blue", label="pretrained encoder")
    if base is not None:
        ax.plot(fr[order], base[order], marker="s", ls="--", color="tab:orange", label="baseline")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xticks(fr[order])
    ax.set_xticklabels([f"{100 * f:g}%" for f in fr[order]], fontsize=8)
    ax.minorticks_off()
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("fraction of labelled training cases")
    ax.set_ylabel("mean Dice")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, out, synthetic)
