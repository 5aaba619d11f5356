"""``volumevlm inspect PATH``: JSON facts about a CT file or DICOM series, and its problems.

Unreadable input is a one-line error (exit 2, via the CLI); readable but suspicious
input is reported under "problems" (warnings are collected there, never printed).
"""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np

from volumevlm.io.readers import hu_problem, read_volume
from volumevlm.io.volume import Volume

# A subsample of this many voxels is enough for stable 1st/99th percentiles.
PERCENTILE_SAMPLE = 2_000_000
ANISOTROPY_RATIO = 3.0
THICK_SLICE_MM = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a .nii/.nii.gz, .nrrd/.nhdr, .mha/.mhd file, a DICOM series folder, or a .zip of one")
    parser.add_argument("--label", action="store_true", help="read as an integer label map (no HU checks)")
    parser.add_argument("--indent", type=int, default=2, help="JSON indentation (default 2)")


def describe(volume: Volume, problems: list[str]) -> dict:
    """The inspect report of a read volume (JSON-serialisable)."""
    array = volume.array
    flat = array.reshape(-1)
    sample = flat[:: max(1, flat.size // PERCENTILE_SAMPLE)]
    lo, hi = float(array.min()), float(array.max())
    p1, p99 = (float(v) for v in np.percentile(sample, [1, 99]))
    spacing = volume.spacing
    problems = list(problems)
    if max(spacing) / min(spacing) > ANISOTROPY_RATIO:
        problems.append(f"anisotropic voxels {'x'.join(f'{s:.3g}' for s in spacing)} mm (ratio > {ANISOTROPY_RATIO:g})")
    if max(spacing) > THICK_SLICE_MM:
        problems.append(f"thick slices: largest spacing {max(spacing):.3g} mm > {THICK_SLICE_MM:g} mm")
    directions = np.abs(volume.affine[:3, :3] / np.asarray(spacing))
    if np.any((directions > 1e-3) & (directions < 1 - 1e-3)):
        problems.append("oblique orientation: voxel axes are not aligned with the patient axes")
    kind = volume.meta.get("kind", "image")
    modality = volume.meta.get("modality") or (
        "label map" if kind == "label" else ("CT" if hu_problem(lo, hi) is None else "unknown (values are not HU)")
    )
    # Slices are counted along the axis closest to head-foot (S/I).
    slice_axis = next(i for i, code in enumerate(volume.axcodes) if code in "SI")
    return {
        "path": volume.source,
        "format": volume.meta.get("format", ""),
        "kind": kind,
        "shape": list(volume.shape),
        "spacing": [round(s, 6) for s in spacing],
        "orientation": volume.orientation,
        "affine": np.round(volume.affine, 6).tolist(),
        "dtype": volume.meta.get("dtype", str(array.dtype)),
        "hu_range": {"min": lo, "max": hi, "p1": p1, "p99": p99},
        "modality": modality,
        "n_slices": int(volume.shape[slice_axis]),
        "series_uid": volume.meta.get("series_uid"),
        # DICOM only: "classic" (one file per slice) or "enhanced" (one multi-frame file).
        "dicom_form": volume.meta.get("dicom_form"),
        "problems": problems,
    }


def run(args: argparse.Namespace) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        volume = read_volume(args.path, kind="label" if args.label else "image")
    problems = []
    for w in caught:
        text = str(w.message)
        # The report already names the file; keep the problem itself.
        problems.append(text[len(volume.source) + 2 :] if text.startswith(volume.source + ": ") else text)
    print(json.dumps(describe(volume, problems), indent=args.indent))
    return 0
