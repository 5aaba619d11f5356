"""Per-structure statistics of a label map on its CT: voxel count, volume (mL), mean HU.

What TotalSegmentator's ``--statistics`` gives its users, for a volumevlm mask::

    from volumevlm.inference.statistics import structure_statistics, write_statistics

    volume = volumevlm.read_volume("case.nii.gz")         # HU, the input's geometry
    mask = model.segment(volume)                            # label image, same geometry
    rows = structure_statistics(mask, volume, read_label_names(mask))
    write_statistics(rows, "stats.csv")                     # or stats.json

One row per structure of the label table (background, index 0, excluded), structures
the mask does not contain included with 0 voxels, volume 0 and no mean HU; a label the
mask holds but the table does not name is reported as ``label_<index>``. Volumes come
from the voxel size (|det| of the affine's 3x3 part), mean HU from the CT's values under
each label. The numbers describe whatever mask they are given: from a model trained on
synthetic phantoms they measure nothing clinical.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from volumevlm.errors import InputError, VolumeVLMError

# The columns of a row, in output order.
COLUMNS: tuple[str, ...] = ("label", "name", "voxels", "volume_ml", "mean_hu")
FORMATS: dict[str, str] = {".json": "json", ".csv": "csv"}
BACKGROUND = 0


def _mask_volume(mask: Any):
    """The mask as an integer label Volume (a nibabel image, a Volume or a path)."""
    import nibabel as nib

    from volumevlm.io import Volume, as_volume, read_volume

    if isinstance(mask, Volume):
        return mask
    if isinstance(mask, (str, os.PathLike)):
        return read_volume(mask, kind="label")
    if isinstance(mask, nib.spatialimages.SpatialImage):
        return as_volume(mask, kind="label", source=mask.get_filename() or "<segmentation mask>")
    raise VolumeVLMError(f"statistics: the mask must be a nibabel label image, a Volume or a path, got {type(mask).__name__}")


def _names(label_names: Mapping[Any, str] | None, mask: Any, source: str) -> dict[int, str]:
    from volumevlm.models.segmentation import read_label_names

    if label_names is None:
        if isinstance(mask, (str, os.PathLike)) or hasattr(mask, "header"):
            # A volumevlm mask carries its names in its header.
            return read_label_names(mask)
        raise VolumeVLMError(f"statistics: {source} carries no label names; pass label_names")
    try:
        return {int(k): str(v) for k, v in dict(label_names).items()}
    except (TypeError, ValueError):
        raise VolumeVLMError(f"statistics: label_names for {source} must map integer labels to names") from None


def voxel_volume_mm3(affine: Any) -> float:
    """|det(affine[:3, :3])|: one voxel's volume in mm^3.

    The cofactor expansion rather than an LU factorisation: for an axis-aligned grid it
    is exactly the product of the spacings (LU may be off in the last bit)."""
    (a, b, c), (d, e, f), (g, h, i) = np.asarray(affine, dtype=np.float64)[:3, :3].tolist()
    return abs(a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g))


def structure_statistics(mask: Any, image: Any, label_names: Mapping[Any, str] | None = None) -> list[dict[str, Any]]:
    """Rows {"label", "name", "voxels", "volume_ml", "mean_hu"} per non-background label.

    mask: the label image ``model.segment`` returns (nibabel), or a label Volume / path.
    image: the CT in Hounsfield units on the same grid: a Volume from
        :func:`volumevlm.io.read_volume`, or anything :func:`volumevlm.io.as_volume`
        reads (path, nibabel image, (array, affine)).
    label_names: {index: name}; None reads them from the mask's header
        (:func:`volumevlm.models.segmentation.read_label_names`).
    Rows are sorted by label; every label of ``label_names`` but 0 appears (0 voxels:
    volume 0.0, mean_hu None) plus any other label found in the mask. volume_ml =
    voxels x |det(affine[:3, :3])| / 1000. Mask and image must share shape and affine
    (to 1e-3 mm), else a one-line GeometryError naming the mask.
    """
    from volumevlm.io import as_volume, check_same_geometry

    labels = _mask_volume(mask)
    ct = as_volume(image)
    check_same_geometry(ct, labels)
    names = _names(label_names, mask, labels.source)
    values = np.asarray(labels.array).reshape(-1)
    if values.size and int(values.min()) < 0:
        raise InputError(labels.source, f"label map holds negative labels (minimum {int(values.min())})")
    values = values.astype(np.int64, copy=False)
    hu = np.asarray(ct.array, dtype=np.float64).reshape(-1)
    size = max([int(values.max()) + 1 if values.size else 1, *(k + 1 for k in names)])
    counts = np.bincount(values, minlength=size)
    sums = np.bincount(values, weights=hu, minlength=size)
    voxel_mm3 = voxel_volume_mm3(labels.affine)
    present = {int(i) for i in np.flatnonzero(counts)}
    rows = []
    for label in sorted((set(names) | present) - {BACKGROUND}):
        if label < 0:
            continue  # a negative key in a label table cannot occur in a mask
        voxels = int(counts[label])
        rows.append({
            "label": label,
            "name": names.get(label, f"label_{label}"),
            "voxels": voxels,
            "volume_ml": voxels * voxel_mm3 / 1000.0,
            "mean_hu": float(sums[label] / voxels) if voxels else None,
        })
    return rows


def statistics_format(path: str | os.PathLike) -> str:
    """"json" or "csv" from the path's suffix; another suffix is a one-line error naming it."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise InputError(path, f"statistics output must end with {' or '.join(FORMATS)}")
    return fmt


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    # The standard columns in their order; any extra key (e.g. "source") goes first.
    extra = [key for row in rows for key in row if key not in COLUMNS]
    return list(dict.fromkeys(extra)) + [c for c in COLUMNS if any(c in row for row in rows) or not rows]


def statistics_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as CSV text with a header; a missing mean HU is an empty cell."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = _columns(rows)
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else repr(row[c]) if isinstance(row[c], float) else row[c] for c in columns])
    return buffer.getvalue()


def write_statistics(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                     info: Mapping[str, Any] | None = None) -> Path:
    """Write the rows to ``path`` atomically, as JSON (.json) or CSV (.csv).

    JSON: {"note": the not-for-clinical-use statement, **info, "structures": rows}.
    CSV: one line per row under a header (extra keys such as "source" first)."""
    import volumevlm
    from volumevlm.io.writers import write_text_atomic

    fmt = statistics_format(path)
    if fmt == "json":
        document = {"note": volumevlm.NOT_FOR_CLINICAL_USE, **dict(info or {}), "structures": [dict(r) for r in rows]}
        text = json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    else:
        text = statistics_csv(rows)
    return write_text_atomic(path, text)


def format_statistics(rows: Sequence[Mapping[str, Any]]) -> str:
    """A readable fixed-width table of the rows (for a terminal)."""
    lead = [key for key in _columns(rows) if key not in COLUMNS]
    header = [*lead, "label", "name", "voxels", "volume_ml", "mean_hu"]
    lines = [[*(str(row.get(k, "")) for k in lead), str(row["label"]), str(row["name"]), str(row["voxels"]),
              f"{row['volume_ml']:.3f}", "-" if row["mean_hu"] is None else f"{row['mean_hu']:.1f}"] for row in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    numeric = {"label", "voxels", "volume_ml", "mean_hu"}

    def render(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if h in numeric else c.ljust(w) for c, w, h in zip(cells, widths, header)).rstrip()

    return "\n".join([render(header), *(render(line) for line in lines)])


__all__ = [
    "COLUMNS",
    "format_statistics",
    "statistics_csv",
    "statistics_format",
    "structure_statistics",
    "voxel_volume_mm3",
    "write_statistics",
]
