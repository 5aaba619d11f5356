"""What bounds the small findings: an oracle that knows where to look, at two grids.

Some findings of the synthetic cohort (a stone in a kidney, a lesion in the liver, a
plaque on the aorta) are small against the demo's 4x4x6 mm voxels. When every method
(zero-shot, probes, a supervised CNN) reads them near chance, is it because they are
not in the preprocessed volumes at all, or because the methods miss them?

This benchmark gives each finding an ORACLE yardstick: it is told the true label map
(the cohort's organ masks, resampled nearest-neighbour with the image through THE
preprocessing, :class:`volumevlm.data.datasets.SegmentationDataset`), and reads HU
statistics inside the organ the finding lives in (:data:`FINDING_STRUCTURES`; the
statistics are :data:`STATISTICS`: organ volume, largest axial cross-section, HU
percentiles, min, max, mean, std, the share of voxels far above and far below the
organ's median, the same of the organ's interior, away from its boundary, on the organ's
image smoothed at two scales, and bright voxels on its wall away from bone). A logistic
probe (:func:`volumevlm.eval.probes.probe_scores`, the one ``volumevlm evaluate`` uses)
is fitted per finding on the ``train`` split and scored on the held-out cases
(``val,test``, as the demo evaluates), with AUROC and its 95% bootstrap interval over
cases from :mod:`volumevlm.metrics`.

It runs at several grids (``--grid``, repeatable): ``checkpoint`` (the preprocessing a
model directory's config.json records: the demo's 4x4x6 mm, 96x96x48) and any spacing
``SXxSYxSZ`` in mm (the same pipeline with that ``target_spacing``, the checkpoint's HU
window, no crop). ``2x2x3`` is finer than the ``volumevlm synth`` default stored grid
(128x128x64: 2.5-3.75 mm in-plane, 4.4-5.6 mm between slices) along every axis, so it
keeps what the stored files hold. With ``--train-fractions`` the oracle is refitted on
random shares of the training cases: how much would more cases help?

From the cohort's own ``finding_facts`` the table also gives each finding's size range
(mm) and attenuation, to compare with the voxel size.

Per-case organ statistics are cached under ``--cache-dir`` (default /tmp/bounds; a few
kB per case and grid), never in the repository. Prints a table and writes
``benchmarks/results/visibility-<device>-<date>[-TAG].json`` naming the device,
versions, date and command.

The synthetic cohort (``volumevlm synth``) is NOT clinical data::

    nice -n 10 python benchmarks/visibility.py --data demo-output/cohort \\
        --checkpoint demo-output/model --grid checkpoint --grid 2x2x3
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning import SYNTHETIC_NOTE, device_slug, finding_targets, input_from_checkpoint  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_CACHE = Path("/tmp/bounds")
TRAIN_SPLIT = "train"
EVAL_SPLITS = "val,test"
CHECKPOINT_GRID = "checkpoint"

# Where each finding lives (label names of volumevlm.data.labels). Splenomegaly is a
# control: a large finding every method reads, which the oracle must read too.
FINDING_STRUCTURES: dict[str, tuple[str, ...]] = {
    "liver_lesion": ("liver",),
    "gallstones": ("gallbladder",),
    "renal_cyst": ("kidney_left", "kidney_right"),
    "kidney_stone": ("kidney_left", "kidney_right"),
    "hydronephrosis": ("kidney_left", "kidney_right"),
    "atherosclerosis": ("aorta",),
    "abdominal_aortic_aneurysm": ("aorta",),
    "splenomegaly": ("spleen",),
}
# The facts (cohort manifest ``finding_facts``) that state each finding's size and contrast.
SIZE_FACTS: dict[str, tuple[str, str | None]] = {
    "liver_lesion": ("largest_mm", "hu_below_liver"),
    "gallstones": ("largest_mm", "hu"),
    "renal_cyst": ("largest_mm", "hu"),
    "kidney_stone": ("size_mm", "hu"),
    "hydronephrosis": ("pelvis_diameter_mm", None),
    "atherosclerosis": ("calcified_plaques", "hu"),
    "abdominal_aortic_aneurysm": ("max_diameter_mm", None),
    "splenomegaly": ("length_mm", None),
}
# Bright / dark thresholds relative to the organ's median HU: a stone or a plaque is
# hundreds of HU above its host, a cyst or a lesion tens of HU below.
BRIGHT_HU = 150.0
DARK_HU = 20.0
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
# The organ's interior: voxels more than INTERIOR_MM from its outside (the boundary
# voxels mix the organ with its neighbours: fat, gas, sinus, bile, which outnumber a
# lesion's voxels), read on the organ's image smoothed inside the organ (normalized
# convolution: no neighbour leaks in) at each scale of SMOOTH_MM (Gaussian sigma, mm).
# Noise is 5-25 HU per voxel: over the 10^4 voxels of a liver, single-voxel extremes of
# noise reach the contrast of a lesion; averaging at a lesion's size does not.
INTERIOR_MM = 6.0
SMOOTH_MM = (2.0, 5.0)
WHOLE_STATISTICS = ("volume_ml", "max_axial_area_mm2", "mean", "std", "min", *(f"p{q}" for q in PERCENTILES), "max",
                    "bright_fraction", "dark_fraction")
INTERIOR_STATISTICS = ("interior_volume_ml", *(f"interior_s{scale:g}_{name}" for scale in SMOOTH_MM
                                               for name in ("min", "p1", "p50", "p99", "max", "dark_fraction")))
# The organ's wall: the voxels one voxel outside the mask or on its boundary layer, less
# other structures and anything within BONE_MM of bone (the spine's partial volume). A
# plaque sits on the aorta's wall, where the interior does not reach; its HU is read
# against the interior's median, which follows the contrast phase.
BONE_MM = 8.0
SHELL_HU = 100.0
SHELL_STATISTICS = ("wall_max_over_median", "wall_voxels_above", "wall_excess_hu")
STATISTICS: tuple[str, ...] = WHOLE_STATISTICS + INTERIOR_STATISTICS + SHELL_STATISTICS


# ---------------------------------------------------------------------- the oracle's features


def organ_statistics(hu: np.ndarray, mask: np.ndarray, spacing: Sequence[float],
                     elsewhere: np.ndarray | None = None) -> np.ndarray:
    """float64 [len(STATISTICS)]: HU statistics of ``hu`` inside ``mask``.

    hu: [X, Y, Z] HU; mask: [X, Y, Z] bool; spacing: voxel size (mm) along X, Y, Z (Z
    the axial axis, RAS). Whole mask (:data:`WHOLE_STATISTICS`): volume_ml = voxels x
    voxel volume / 1000; max_axial_area_mm2 = the most voxels of one Z slice x the
    in-plane voxel area; mean, std, min, percentiles (numpy's linear ones), max;
    bright_fraction / dark_fraction = the share of voxels above median + BRIGHT_HU /
    below median - DARK_HU. Interior (:data:`INTERIOR_STATISTICS`: voxels whose
    Euclidean distance in mm to the nearest voxel outside the mask exceeds INTERIOR_MM):
    its volume, then per scale of SMOOTH_MM the min, p1, p50, p99, max of
    :func:`smoothed_inside` there and the share of it below the whole mask's median -
    DARK_HU. Wall (:data:`SHELL_STATISTICS`: the mask's boundary layer and the voxels
    one voxel outside it, less ``elsewhere``, a bool map of voxels that belong to
    something else, e.g. other structures and the surroundings of bone): its max minus
    the reference median (the interior's at the first scale, else the whole mask's), the
    number of its voxels above that median + SHELL_HU, and the sum of their HU above it.
    An empty mask (or interior, or wall) gives zeros for its part.
    """
    from scipy import ndimage

    spacing = [float(s) for s in spacing]
    out = np.zeros(len(STATISTICS))
    values = hu[mask].astype(np.float64)
    if values.size == 0:
        return out
    median = float(np.median(values))
    out[:len(WHOLE_STATISTICS)] = [
        values.size * spacing[0] * spacing[1] * spacing[2] / 1000.0,
        float(mask.sum(axis=(0, 1)).max()) * spacing[0] * spacing[1],
        values.mean(), values.std(), values.min(),
        *np.percentile(values, PERCENTILES),
        values.max(),
        float((values > median + BRIGHT_HU).mean()), float((values < median - DARK_HU).mean()),
    ]
    # Work on the mask's bounding box padded by one voxel of outside.
    box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in np.nonzero(mask))
    organ = mask[box]
    inside = ndimage.distance_transform_edt(np.pad(organ, 1), sampling=spacing)[1:-1, 1:-1, 1:-1] > INTERIOR_MM
    reference = median
    if inside.any():
        interior = [inside.sum() * spacing[0] * spacing[1] * spacing[2] / 1000.0]
        for scale in SMOOTH_MM:
            smooth = smoothed_inside(hu[box], organ, spacing, scale)[inside].astype(np.float64)
            interior += [smooth.min(), *np.percentile(smooth, (1, 50, 99)), smooth.max(),
                         float((smooth < median - DARK_HU).mean())]
        reference = interior[3]  # the interior's median at the first scale
        out[len(WHOLE_STATISTICS):len(WHOLE_STATISTICS) + len(INTERIOR_STATISTICS)] = interior
    wall = ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask, border_value=1)
    if elsewhere is not None:
        wall &= ~elsewhere
    if wall.any():
        values = hu[wall].astype(np.float64) - reference
        out[-len(SHELL_STATISTICS):] = [values.max(), float((values > SHELL_HU).sum()),
                                        float(np.clip(values - SHELL_HU, 0, None).sum())]
    return out


def smoothed_inside(hu: np.ndarray, mask: np.ndarray, spacing: Sequence[float], sigma_mm: float) -> np.ndarray:
    """``hu`` averaged with a Gaussian of ``sigma_mm`` (mm, each axis) over the voxels of
    ``mask`` only (normalized convolution): G(hu * mask) / G(mask), 0 where no mask
    voxel is near. A uniform organ stays uniform up to its boundary."""
    from scipy import ndimage

    sigma = [float(sigma_mm) / float(s) for s in spacing]
    weight = mask.astype(np.float32)
    total = ndimage.gaussian_filter(hu.astype(np.float32) * weight, sigma=sigma, mode="constant")
    norm = ndimage.gaussian_filter(weight, sigma=sigma, mode="constant")
    return np.divide(total, norm, out=np.zeros_like(total), where=norm > 1e-6)


def finding_features(statistics: Mapping[str, np.ndarray], finding: str) -> np.ndarray:
    """The oracle's feature vector of one case for ``finding``: its structure's statistics;
    for a paired organ (the kidneys) the elementwise max and min over the pair, so a
    finding on either side reads the same."""
    rows = np.stack([statistics[name] for name in FINDING_STRUCTURES[finding]])
    return rows[0] if len(rows) == 1 else np.concatenate([rows.max(axis=0), rows.min(axis=0)])


# ---------------------------------------------------------------------- grids


def parse_grid(text: str) -> tuple[float, float, float] | None:
    """None for ``checkpoint``; else the spacing of ``SXxSYxSZ`` (mm, e.g. 2x2x3)."""
    if text == CHECKPOINT_GRID:
        return None
    try:
        values = tuple(float(v) for v in text.lower().split("x"))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"--grid: expected {CHECKPOINT_GRID!r} or SXxSYxSZ in mm (e.g. 2x2x3), got {text!r}")
    return values


def grid_preprocess(checkpoint_preprocess: Mapping[str, Any], spacing: tuple[float, float, float] | None) -> dict[str, Any]:
    """The checkpoint's preprocessing, or the same with another spacing and no crop."""
    config = dict(checkpoint_preprocess)
    if spacing is not None:
        config.update(target_spacing=list(spacing), spatial_size=None)
    return config


def grid_name(preprocess: Mapping[str, Any]) -> str:
    spacing = "x".join(f"{v:g}" for v in preprocess["target_spacing"])
    size = preprocess.get("spatial_size")
    return f"{spacing} mm" + (f", {'x'.join(str(v) for v in size)}" if size else "")


def structures_needed(findings: Sequence[str]) -> list[str]:
    return sorted({name for finding in findings for name in FINDING_STRUCTURES[finding]})


def case_statistics(rows: Sequence[Mapping[str, Any]], preprocess: Mapping[str, Any], structures: Sequence[str],
                    cache_dir: Path | None, progress=None) -> np.ndarray:
    """float64 [N, len(structures), len(STATISTICS)] of the cases ``rows`` through THE
    preprocessing ``preprocess`` (image and label map together). Cached per grid and
    case list under ``cache_dir`` (an .npz keyed by the preprocessing, the cases' ids
    and image paths, and the statistics' names)."""
    from scipy import ndimage

    from volumevlm.data.datasets import SegmentationDataset
    from volumevlm.data.labels import LABEL_INDEX

    key = json.dumps([dict(preprocess), [[r.get("id"), str(r.get("image")), str(r.get("label"))] for r in rows],
                      list(structures), list(STATISTICS), BRIGHT_HU, DARK_HU, INTERIOR_MM, SMOOTH_MM, BONE_MM, SHELL_HU], sort_keys=True)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"organ-statistics-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
        if path.is_file():
            return np.load(path)["statistics"]
    dataset = SegmentationDataset(list(rows), preprocess)
    if len(dataset) != len(rows):
        raise SystemExit(f"visibility: {len(rows) - len(dataset)} cases have no label map; the oracle needs one per case")
    low, high = (float(v) for v in preprocess["hu_window"])
    spacing = [float(v) for v in preprocess["target_spacing"]]
    out = np.zeros((len(rows), len(structures), len(STATISTICS)))
    task = progress.add_task(grid_name(preprocess), total=len(rows)) if progress is not None else None
    for i in range(len(rows)):
        sample = dataset[i]
        hu = low + sample["image"][0].numpy().astype(np.float64) * (high - low)
        label = sample["label"][0].numpy()
        near_bone = ndimage.distance_transform_edt(label != LABEL_INDEX["vertebrae"], sampling=spacing) <= BONE_MM
        for j, name in enumerate(structures):
            mask = label == LABEL_INDEX[name]
            out[i, j] = organ_statistics(hu, mask, spacing, near_bone | ((label > 0) & ~mask))
        if task is not None:
            progress.advance(task)
    if path is not None:
        from volumevlm.io.writers import write_atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: np.savez(tmp, statistics=out), suffix=".npz")
    return out


# ---------------------------------------------------------------------- the oracle's figures


def oracle_figures(train_stats: np.ndarray, train_targets: np.ndarray, eval_stats: np.ndarray,
                   eval_targets: np.ndarray, findings: Sequence[str], structures: Sequence[str],
                   all_findings: Sequence[str], train_fraction: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """Per finding: the oracle probe's held-out AUROC and its 95% bootstrap interval.

    *_stats: [N, len(structures), len(STATISTICS)]; *_targets: [N, len(all_findings)]
    (0/1, -1 unlabelled). ``train_fraction`` < 1 fits on that share of the training
    cases (drawn with ``seed``, stratified per finding so each keeps its positives'
    share)."""
    from volumevlm.eval.probes import probe_scores
    from volumevlm.metrics import macro_auroc_interval, per_finding_auroc

    out: dict[str, Any] = {}
    for finding in findings:
        column = list(all_findings).index(finding)
        tx, ty = case_features(train_stats, structures, finding), train_targets[:, [column]]
        if train_fraction < 1.0:
            keep = stratified_subset(ty[:, 0], train_fraction, seed)
            tx, ty = tx[keep], ty[keep]
        ex, ey = case_features(eval_stats, structures, finding), eval_targets[:, [column]]
        scores, fitted = probe_scores(tx, ty, ex, seed=seed)
        auroc = per_finding_auroc(scores, ey, [finding])[finding] if fitted[0] else None
        interval = macro_auroc_interval(scores, ey) if auroc is not None else None
        out[finding] = {
            "auroc": auroc, "ci95": list(interval) if interval else None,
            "train_cases": int(len(ty)), "train_positives": int((ty[:, 0] > 0.5).sum()),
            "eval_positives": int((ey[:, 0] > 0.5).sum()), "eval_negatives": int((ey[:, 0] == 0).sum()),
        }
    return out


def case_features(stats: np.ndarray, structures: Sequence[str], finding: str) -> np.ndarray:
    """[N, D]: :func:`finding_features` of each case of ``stats`` [N, len(structures), len(STATISTICS)]."""
    return np.stack([finding_features(dict(zip(structures, case)), finding) for case in stats])


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of about ``fraction`` of the labelled cases, positives and negatives drawn
    separately (at least one of each class that has any)."""
    rng = np.random.default_rng(seed)
    keep = []
    for cls in (labels > 0.5) & (labels >= 0), (labels == 0):
        index = np.flatnonzero(cls)
        if index.size:
            keep.append(rng.choice(index, size=max(1, round(fraction * index.size)), replace=False))
    return np.sort(np.concatenate(keep)) if keep else np.array([], dtype=int)


def fact_ranges(rows: Sequence[Mapping[str, Any]], findings: Sequence[str]) -> dict[str, Any]:
    """Per finding, from the cohort's ``finding_facts`` of its positive cases: the size
    (or count) fact and the attenuation fact, as min / median / max."""
    out: dict[str, Any] = {}
    for finding in findings:
        size_key, hu_key = SIZE_FACTS[finding]
        entry: dict[str, Any] = {}
        for key in (size_key, hu_key):
            if key is None:
                continue
            values = [float((row.get("finding_facts") or {}).get(finding, {}).get(key))
                      for row in rows if (row.get("finding_facts") or {}).get(finding, {}).get(key) is not None]
            entry[key] = ({"min": min(values), "median": float(np.median(values)), "max": max(values)}
                          if values else None)
        out[finding] = entry
    return out


def stored_spacing(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The stored grids' voxel sizes (manifest ``spacing``, stored axis order), min / max per axis."""
    spacings = np.array([row["spacing"] for row in rows if row.get("spacing")], dtype=np.float64)
    shapes = sorted({tuple(row["shape"]) for row in rows if row.get("shape")})
    if spacings.size == 0:
        return {"shapes": [list(s) for s in shapes]}
    return {"shapes": [list(s) for s in shapes], "spacing_min_mm": spacings.min(axis=0).round(2).tolist(),
            "spacing_max_mm": spacings.max(axis=0).round(2).tolist()}


def counterfactual_signal(data: Path, rows: Sequence[Mapping[str, Any]], findings: Sequence[str],
                          preprocesses: Sequence[Mapping[str, Any]], per_finding: int, progress=None) -> dict[str, Any]:
    """How strong is each finding in the image itself? For up to ``per_finding`` positive
    cases of ``rows``, the generator renders the case twice at the cohort's stored shape
    (``volumevlm synth`` is a pure function of seed, index and shape, one random stream
    per structure, noise included): as it is, and with that finding removed. Their
    difference is the finding's own signal, free of noise and anatomy. Per grid (the
    stored one, then each of ``preprocesses`` through THE preprocessing), the peak
    |difference| in HU and the voxels where it exceeds the case's noise sigma; the
    stored noise sigma is the manifest's ``noise_sigma_hu``. None when ``data`` is not a
    ``volumevlm synth`` cohort (no cohort.json with its seed and shape)."""
    import copy

    from volumevlm.data.synthetic.cohort import render_case, sample_case
    from volumevlm.data.transforms import preprocess

    try:
        about = json.loads((Path(data) / "cohort.json").read_text())
        seed, shape = int(about["seed"]), tuple(int(v) for v in about["shape"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    out: dict[str, Any] = {}
    for finding in findings:
        positives = [row for row in rows if (row.get("findings") or {}).get(finding) == 1][:per_finding]
        task = progress.add_task(f"signal {finding}", total=len(positives)) if progress is not None else None
        cases = []
        for row in positives:
            index = int(str(row["id"]).rsplit("_", 1)[-1])
            case = sample_case(seed, index, shape)
            without = copy.deepcopy(case)
            without["findings"][finding] = 0
            without["finding_facts"].pop(finding, None)
            hu, _, affine = render_case(case, seed, index)
            hu0, _, _ = render_case(without, seed, index)
            sigma = float(row.get("noise_sigma_hu") or case["noise_sigma_hu"])
            grids = [{"grid": "stored", "spacing_mm": np.abs(np.diag(affine)[:3]).round(2).tolist(),
                      "peak_hu": float(np.abs(hu - hu0).max()), "voxels_above_noise": int((np.abs(hu - hu0) > sigma).sum())}]
            for config in preprocesses:
                low, high = (float(v) for v in config["hu_window"])
                a = preprocess((hu, affine), config)[0].numpy() * (high - low)
                b = preprocess((hu0, affine), config)[0].numpy() * (high - low)
                grids.append({"grid": grid_name(config), "peak_hu": float(np.abs(a - b).max()),
                              "voxels_above_noise": int((np.abs(a - b) > sigma).sum())})
            cases.append({"id": row["id"], "facts": (row.get("finding_facts") or {}).get(finding),
                          "contrast_phase": row.get("contrast_phase"), "noise_sigma_hu": sigma, "grids": grids})
            if task is not None:
                progress.advance(task)
        summary = {}
        for g in range(len(cases[0]["grids"]) if cases else 0):
            peaks = np.array([c["grids"][g]["peak_hu"] for c in cases])
            ratio = peaks / np.array([c["noise_sigma_hu"] for c in cases])
            summary[cases[0]["grids"][g]["grid"]] = {
                "peak_hu_median": float(np.median(peaks)), "peak_over_noise_median": float(np.median(ratio)),
                "share_peak_over_2_noise": float((ratio > 2).mean())}
        out[finding] = {"cases": cases, "summary": summary}
    return out


# ---------------------------------------------------------------------- output


def _auroc_text(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("auroc") is None:
        return "-"
    low, high = entry["ci95"] or (math.nan, math.nan)
    return f"{entry['auroc']:.2f} [{low:.2f}, {high:.2f}]"


def _range_text(value: Mapping[str, float] | None) -> str:
    if not value:
        return "-"
    return f"{value['min']:g}-{value['max']:g} (median {value['median']:g})"


def format_table(results: Mapping[str, Any]):
    from rich.table import Table

    grids = results["grids"]
    table = Table(title=f"Oracle (true organ mask + HU statistics, logistic probe) on {results['data']['eval_cases']} "
                        f"held-out cases ({results['data']['note']})")
    table.add_column("finding")
    table.add_column("organ")
    table.add_column("size / count")
    table.add_column("HU")
    table.add_column("held-out +")
    for grid in grids:
        table.add_column(f"oracle AUROC\n{grid['name']}")
    fractions = results.get("train_fractions") or []
    for fraction in fractions:
        table.add_column(f"{grids[-1]['name']}\n{fraction:g} of train")
    for finding in results["findings"]:
        facts = results["facts"][finding]
        size_key, hu_key = SIZE_FACTS[finding]
        first = grids[0]["oracle"][finding]
        table.add_row(finding, ", ".join(FINDING_STRUCTURES[finding]), f"{size_key}: {_range_text(facts.get(size_key))}",
                      f"{hu_key}: {_range_text(facts.get(hu_key))}" if hu_key else "-", str(first["eval_positives"]),
                      *(_auroc_text(g["oracle"][finding]) for g in grids),
                      *(_auroc_text(grids[-1]["by_train_fraction"][str(f)][finding]) for f in fractions))
    return table


def format_signal_table(results: Mapping[str, Any]):
    from rich.table import Table

    signal = results["signal"]
    grids = next((list(v["summary"]) for v in signal.values() if v["summary"]), [])
    table = Table(title="A finding's own signal: the same case rendered with and without it, peak |difference| "
                        "(median over cases; x noise sigma)")
    table.add_column("finding")
    table.add_column("cases")
    for grid in grids:
        table.add_column(grid)
    for finding, entry in signal.items():
        cells = []
        for grid in grids:
            s = entry["summary"].get(grid)
            cells.append(f"{s['peak_hu_median']:.0f} HU ({s['peak_over_noise_median']:.1f}x)" if s else "-")
        table.add_row(finding, str(len(entry["cases"])), *cells)
    return table


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the cohort folder (manifest.jsonl with label maps)")
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="model directory whose config.json gives the preprocessing (the 'checkpoint' grid, and "
                             "the HU window of every grid)")
    parser.add_argument("--grid", action="append", type=parse_grid, default=None, metavar="checkpoint|SXxSYxSZ",
                        help=f"a grid to run the oracle at (repeatable; default: {CHECKPOINT_GRID} and 2x2x3)")
    parser.add_argument("--findings", default=",".join(FINDING_STRUCTURES),
                        help="comma-separated findings (default: the small ones and the splenomegaly control)")
    parser.add_argument("--splits", default=EVAL_SPLITS, help=f"held-out splits scored (default {EVAL_SPLITS})")
    parser.add_argument("--max-cases", type=int, default=None,
                        help="use at most this many training and this many held-out cases (first in manifest order)")
    parser.add_argument("--train-fractions", default="",
                        help="comma-separated shares of the training cases to refit the oracle on at the last grid "
                             "(e.g. 0.25,0.5): does the oracle need more cases?")
    parser.add_argument("--signal-cases", type=int, default=0, metavar="K",
                        help="render up to K held-out positives per finding with and without it (synthetic cohorts "
                             "only) and measure the finding's own signal per grid (default 0: off)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"organ statistics cache (default {DEFAULT_CACHE})")
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder of the results JSON")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.grid = args.grid or [None, (2.0, 2.0, 3.0)]
    args.findings = [f.strip() for f in args.findings.split(",") if f.strip()]
    unknown = [f for f in args.findings if f not in FINDING_STRUCTURES]
    if unknown:
        parser.error(f"--findings: no organ is known for {', '.join(unknown)} (known: {', '.join(FINDING_STRUCTURES)})")
    try:
        args.train_fractions = [float(v) for v in args.train_fractions.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--train-fractions: expected numbers, got {args.train_fractions!r}")
    if any(not 0.0 < f < 1.0 for f in args.train_fractions):
        parser.error("--train-fractions: each share must be in (0, 1)")
    if args.max_cases is not None and args.max_cases < 2:
        parser.error("--max-cases must be at least 2")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from rich.console import Console

    import volumevlm
    from volumevlm.eval.evaluate import _progress, device_description, is_synthetic, read_split
    from volumevlm.io.writers import write_text_atomic
    from volumevlm.provenance import package_versions

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = input_from_checkpoint(args.checkpoint)
    train_rows = read_split(args.data, TRAIN_SPLIT)
    eval_rows = read_split(args.data, args.splits)
    if TRAIN_SPLIT in [s.strip() for s in args.splits.split(",")]:
        raise SystemExit(f"--splits {args.splits!r}: the held-out splits must not include {TRAIN_SPLIT!r}")
    if args.max_cases:
        train_rows, eval_rows = train_rows[:args.max_cases], eval_rows[:args.max_cases]
    all_findings = sorted({name for row in train_rows + eval_rows for name in (row.get("findings") or {})})
    missing = [f for f in args.findings if f not in all_findings]
    if missing:
        raise SystemExit(f"{args.data}: the cases carry no labels for {', '.join(missing)}")
    train_targets = finding_targets([row.get("findings") for row in train_rows], all_findings)
    eval_targets = finding_targets([row.get("findings") for row in eval_rows], all_findings)
    structures = structures_needed(args.findings)
    synthetic = is_synthetic(args.data, train_rows + eval_rows)
    cache_dir = None if args.no_cache else args.cache_dir

    grids = []
    with _progress(not args.no_progress) as bar:
        for spacing in args.grid:
            preprocess = grid_preprocess(spec["preprocess"], spacing)
            started = time.perf_counter()
            train_stats = case_statistics(train_rows, preprocess, structures, cache_dir, bar)
            eval_stats = case_statistics(eval_rows, preprocess, structures, cache_dir, bar)
            features_s = time.perf_counter() - started
            grid = {"name": grid_name(preprocess), "source": "checkpoint" if spacing is None else "--grid",
                    "preprocess": preprocess, "statistics_s": round(features_s, 1),
                    "oracle": oracle_figures(train_stats, train_targets, eval_stats, eval_targets, args.findings,
                                             structures, all_findings, seed=args.seed)}
            grids.append(grid)
        signal = (counterfactual_signal(args.data, eval_rows, args.findings, [g["preprocess"] for g in grids],
                                        args.signal_cases, bar) if args.signal_cases > 0 else None)
        if args.train_fractions:
            grids[-1]["by_train_fraction"] = {
                str(f): oracle_figures(train_stats, train_targets, eval_stats, eval_targets, args.findings, structures,
                                       all_findings, train_fraction=f, seed=args.seed)
                for f in args.train_fractions}

    date = dt.datetime.now(dt.timezone.utc)
    device = torch.device("cpu")
    results = {
        "benchmark": "visibility (oracle on true organ masks)",
        "device": device_description(device),
        "versions": package_versions("volumevlm", "torch", "monai", "numpy", "scikit-learn"),
        "date": date.isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/visibility.py", *(sys.argv[1:] if argv is None else argv)]),
        "data": {"root": str(args.data), "train_split": TRAIN_SPLIT, "train_cases": len(train_rows),
                 "eval_splits": args.splits, "eval_cases": len(eval_rows), "max_cases": args.max_cases,
                 "stored_grid": stored_spacing(train_rows + eval_rows), "synthetic": synthetic,
                 "note": SYNTHETIC_NOTE if synthetic else "user data"},
        "checkpoint": str(args.checkpoint),
        "oracle": {"structures": {f: list(FINDING_STRUCTURES[f]) for f in args.findings},
                   "statistics": list(STATISTICS), "bright_hu_above_median": BRIGHT_HU,
                   "dark_hu_below_median": DARK_HU, "interior_mm": INTERIOR_MM, "smooth_mm": list(SMOOTH_MM),
                   "wall": f"boundary layer + one voxel out, less other structures and {BONE_MM:g} mm around bone; "
                           f"HU over the interior median, voxels above +{SHELL_HU:g} HU",
                   "paired_organs": "elementwise max and min of the two kidneys' statistics",
                   "regression": "volumevlm.eval.probes.probe_scores (StandardScaler + LogisticRegressionCV)",
                   "interval": "95% percentile bootstrap over held-out cases (volumevlm.metrics)"},
        "findings": list(args.findings),
        "facts": fact_ranges(train_rows + eval_rows, args.findings),
        "train_fractions": args.train_fractions,
        "grids": grids,
        "signal": signal,
        "note": (f"{SYNTHETIC_NOTE}. " if synthetic else "") + volumevlm.NOT_FOR_CLINICAL_USE,
    }
    console = Console()
    console = console if console.is_terminal else Console(width=200)
    console.print(format_table(results))
    if signal:
        console.print(format_signal_table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"visibility-{device_slug(device)}-{date.date().isoformat()}" + (f"-{args.tag}" if args.tag else "")
    path = write_text_atomic(args.out / f"{stem}.json", json.dumps(results, indent=2, allow_nan=False) + "\n")
    print(f"results: {path}" + (f" ({SYNTHETIC_NOTE})" if synthetic else ""))
    return results


if __name__ == "__main__":
    from volumevlm.errors import VolumeVLMError

    try:
        main()
    except VolumeVLMError as err:  # bad input: one line, no traceback
        raise SystemExit(f"error: {err}") from None
