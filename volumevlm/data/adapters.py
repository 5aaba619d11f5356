"""Adapters: turn dataset layouts users already have on disk into our manifest rows.

Supported layouts (``adapt(layout, root, out_manifest)``; ``add_arguments``/``run`` make the
``volumevlm adapt LAYOUT ROOT --out MANIFEST`` command):

``merlin``
    Merlin's release: a folder of ``<study_id>.nii.gz`` volumes plus report and code
    tables (CSV or XLSX). Columns are found case-insensitively (spaces, ``_`` and ``-``
    ignored) among common names and can be named explicitly with ``columns=``
    (keys: id, findings, impression, report, icd10, phecodes, split). Code cells may be
    lists (``['K76.0', 'N28.1']``) or separated strings (``K76.0;N28.1``); a table
    with one code per line ("long" format) works too.
``ct-rate``
    CT-RATE: ``dataset/{train,valid}/<train_1>/<train_1_a>/<train_1_a_1>.nii.gz`` (the
    ``*_fixed`` folders too), the reports CSV, the multi-abnormality labels CSV and the
    metadata CSV, each found under ``root`` by its columns. CT-RATE's NIfTI headers are
    known to carry unreliable voxel spacing and no HU scaling, so when the metadata
    CSV is present each row records ``spacing_override`` ([sx, sy, sz] mm along the
    stored i, j, k axes, from XYSpacing and ZSpacing) and ``rescale`` ({"slope",
    "intercept"}: HU = slope * stored value + intercept); the datasets apply both at
    load time. A volume whose first slice already shows air at -1000 (a release with
    fixed values) gets no ``rescale``, so the scaling is never applied twice.
    Split comes from the folder: train -> train, valid -> val.
``totalsegmentator``
    TotalSegmentator: ``<root>/s0000/ct.nii.gz``, ``<root>/s0000/segmentations/<structure>.nii.gz``
    and ``<root>/meta.csv`` (``;``-separated). The binary masks are merged into one label
    map with OUR indices (:func:`volumevlm.data.labels.label_for_structure`; unmapped
    structures ignored), written as ``<out_dir>/labels/<case>.nii.gz`` (never inside the
    user's dataset).

Inputs are only ever read. Rows use the synthetic manifest's keys where they apply
(id, image, label, report, icd10, phecodes, findings, split, age, sex); fields a layout
does not have are omitted.
"""

from __future__ import annotations

import argparse
import ast
import csv
import io
import json
import logging
import math
import os
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from volumevlm.data.labels import LABELS, label_for_structure
from volumevlm.data.manifest import write_manifest
from volumevlm.errors import InputError, VolumeVLMError
from volumevlm.text.findings import CT_RATE_FINDING_NAMES

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
TABLE_SUFFIXES = (".csv", ".tsv", ".xlsx")
SPLIT_NAMES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}


# --------------------------------------------------------------------------- tables


def _norm(name: str) -> str:
    """Column-name key: case, spaces, '_' and '-' do not matter ("Study ID" == "study_id")."""
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


def _integral_id(text: str) -> str:
    """ "1001.0" (a number column saved by a spreadsheet) -> "1001"; other text unchanged."""
    try:
        value = float(text)
    except ValueError:
        return text
    return _cell_text(value) if math.isfinite(value) and value.is_integer() else text


def _cell_text(value) -> str:
    """A spreadsheet cell as text: integral numbers without ".0" (study ids), empty cells as ""."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return str(value)


def _read_xlsx(path: Path) -> list[list[str]]:
    """The first worksheet of an XLSX workbook as rows of cell strings (via openpyxl, read-only)."""
    import openpyxl

    book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        sheet = book.worksheets[0] if book.worksheets else None
        if sheet is None:
            raise InputError(path, "workbook has no worksheet")
        return [[_cell_text(value) for value in row] for row in sheet.iter_rows(values_only=True)]
    finally:
        book.close()


def read_table(path: str | os.PathLike) -> list[dict[str, str]]:
    """A CSV / TSV (delimiter sniffed among , ; tab) or XLSX (first sheet) table as dicts.

    Keys are the header cells as written; values are strings ("" when empty).
    Raises InputError naming the file when it is unreadable or has no header.
    """
    path = Path(path)
    try:
        if path.name.lower().endswith(".xlsx"):
            grid = _read_xlsx(path)
        else:
            text = path.read_text(encoding="utf-8-sig")
            first = text.split("\n", 1)[0]
            delimiter = max(",;\t", key=first.count) if first else ","
            grid = list(csv.reader(io.StringIO(text), delimiter=delimiter))
    except (OSError, UnicodeDecodeError, csv.Error, zipfile.BadZipFile, KeyError, ValueError) as err:
        raise InputError(path, f"unreadable table ({type(err).__name__}: {err})") from None
    grid = [row for row in grid if any(cell.strip() for cell in row)]
    if not grid:
        raise InputError(path, "table is empty (no header row)")
    header = [cell.strip() for cell in grid[0]]
    return [{name: (row[i].strip() if i < len(row) else "") for i, name in enumerate(header) if name} for row in grid[1:]]


def _find_column(header: Iterable[str], candidates: Sequence[str]) -> str | None:
    by_key = {_norm(name): name for name in header}
    for candidate in candidates:
        if _norm(candidate) in by_key:
            return by_key[_norm(candidate)]
    return None


def _excel_number(text: str) -> str:
    """A code that arrived as a number, as a spreadsheet shows it: 250.0 -> "250",
    571.5 -> "571.5" (the float's shortest repr, without a ".0" tail)."""
    return text[:-2] if text.endswith(".0") else text


def parse_codes(value: Any) -> list[str]:
    """Codes from a table cell: a list, a list literal "['K76.0', 'N28.1']" or a string
    separated by ; , | or whitespace. Empty / NaN cells give []."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        text = str(value).strip()
        if not text or text.lower() in ("nan", "none", "null", "[]"):
            return []
        items = None
        if text[0] in "[(":
            try:
                parsed = ast.literal_eval(text)
                items = list(parsed) if isinstance(parsed, (list, tuple)) else [parsed]
            except (ValueError, SyntaxError):
                items = None
        if items is None:
            items = re.split(r"[;,|\s]+", text.strip("[]()"))
    codes = []
    for item in items:
        code = _excel_number(str(item)) if isinstance(item, float) else str(item).strip().strip("'\"")
        if code and code.lower() not in ("nan", "none") and code not in codes:
            codes.append(code)
    return codes


def _compose_report(sections: Sequence[tuple[str, str | None]]) -> str | None:
    """'FINDINGS: ...' paragraphs from (heading, text) pairs; None when all are empty."""
    parts = [
        f"{heading}: {text.strip()}"
        for heading, text in sections
        if text and text.strip() and text.strip().lower() != "nan"
    ]
    return "\n\n".join(parts) if parts else None


def _strip_nifti_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _files_under(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under ``root`` ending in ``suffixes``; hidden files and Office lock files ("~$") skipped."""
    return sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.name.lower().endswith(suffixes) and not p.name.startswith((".", "~$"))
    )


def _volumes_under(root: Path) -> list[Path]:
    return _files_under(root, NIFTI_SUFFIXES)


def _tables_under(root: Path) -> list[Path]:
    return _files_under(root, TABLE_SUFFIXES)


def _snake(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def _sex(value: str) -> str | None:
    key = value.strip().lower()
    return {"m": "M", "male": "M", "f": "F", "female": "F"}.get(key, value.strip() or None)


def _age(value: str) -> float | int | None:
    """Age in years from "65", "65.0" or DICOM's "065Y"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([YyMmWwDd]?)\s*", value or "")
    if not match:
        return None
    number = float(match.group(1))
    number /= {"": 1, "y": 1, "m": 12, "w": 52.1775, "d": 365.25}[match.group(2).lower()]
    return int(number) if number.is_integer() else round(number, 2)


# --------------------------------------------------------------------------- Merlin

MERLIN_COLUMNS: dict[str, tuple[str, ...]] = {
    "id": ("study id", "study_id", "studyid", "study", "accession", "accession number", "case id", "id", "image id"),
    "findings": ("findings", "findings text", "report findings", "findings_en"),
    "impression": ("impression", "impressions", "impression text", "impressions_en"),
    "report": ("report", "report text", "radiology report", "text"),
    "icd10": ("icd10", "icd 10", "icd-10", "icd10 codes", "icd codes", "icd10_code", "icd code", "icd", "diagnosis codes"),
    "phecodes": ("phecodes", "phecode", "phe codes", "phe code"),
    "split": ("split", "partition"),
}


def merlin_rows(
    root: str | os.PathLike,
    *,
    tables: Sequence[str | os.PathLike] | None = None,
    columns: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Rows for Merlin's release: ``<study_id>.nii.gz`` volumes under ``root`` joined to
    report / code tables by study id.

    tables: the CSV/XLSX files to read (default: every table under ``root``). A table
        is used when it has a study-id column and at least one of findings, impression,
        report, icd10, phecodes, split.
    columns: explicit column names, e.g. {"id": "StudyID", "icd10": "dx_codes"}; the rest
        are detected case-insensitively among :data:`MERLIN_COLUMNS`.
    Rows: {id, image, report?, icd10?, phecodes?, split?}; a volume without a report
    or codes still gets a row (training uses what it has).
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "not a folder (expected Merlin's folder of <study_id>.nii.gz volumes)")
    columns = dict(columns or {})
    unknown = set(columns) - set(MERLIN_COLUMNS)
    if unknown:
        raise VolumeVLMError(f"merlin: unknown column key(s) {sorted(unknown)}; use {sorted(MERLIN_COLUMNS)}")
    volumes: dict[str, Path] = {}
    for path in _volumes_under(root):
        study = _strip_nifti_suffix(path.name)
        if study in volumes:
            raise InputError(path, f"study id {study!r} also names {volumes[study]}")
        volumes[study] = path
    if not volumes:
        raise InputError(root, "no .nii.gz volumes found (Merlin layout: <study_id>.nii.gz)")

    texts: dict[str, dict[str, str]] = {}
    codes: dict[str, dict[str, list[str]]] = {}
    splits: dict[str, str] = {}
    used_tables = 0
    for table_path in (Path(t) for t in (tables if tables is not None else _tables_under(root))):
        table = read_table(table_path)
        header = list(table[0]) if table else []
        # An explicitly named column is looked for first, then the usual names.
        found = {
            key: _find_column(header, ((columns[key],) if key in columns else ()) + names)
            for key, names in MERLIN_COLUMNS.items()
        }
        for name in columns.values():
            if tables is not None and _find_column(header, (name,)) is None:
                raise InputError(table_path, f"no column {name!r} (columns: {', '.join(header)})")
        id_column = found.pop("id")
        if id_column is None or not any(found.values()):
            if tables is not None:
                raise InputError(table_path, f"no study-id column or no report/code column (columns: {', '.join(header)})")
            continue
        used_tables += 1
        for record in table:
            raw = _strip_nifti_suffix(record[id_column].strip())
            if not raw:
                continue
            # "1001.0" (a number column saved by a spreadsheet) names 1001.nii.gz, but a
            # zero-padded id like "0012" must stay as written when a volume has that name.
            study = raw if raw in volumes else _integral_id(raw)
            for key in ("findings", "impression", "report"):
                if found[key] and record[found[key]]:
                    texts.setdefault(study, {})[key] = record[found[key]]
            for key in ("icd10", "phecodes"):
                if found[key]:
                    bucket = codes.setdefault(study, {}).setdefault(key, [])
                    bucket.extend(c for c in parse_codes(record[found[key]]) if c not in bucket)
            if found["split"] and record[found["split"]]:
                value = record[found["split"]].strip().lower()
                if value not in SPLIT_NAMES:
                    raise InputError(table_path, f"study {study}: unknown split {record[found['split']]!r}")
                splits[study] = SPLIT_NAMES[value]

    rows = []
    for study, path in sorted(volumes.items()):
        row: dict[str, Any] = {"id": study, "image": str(path)}
        text = texts.get(study, {})
        report = text.get("report") or _compose_report(
            [("FINDINGS", text.get("findings")), ("IMPRESSION", text.get("impression"))]
        )
        if report:
            row["report"] = report
        for key, values in codes.get(study, {}).items():
            if values:
                row[key] = values
        if study in splits:
            row["split"] = splits[study]
        rows.append(row)
    orphans = (set(texts) | set(codes)) - set(volumes)
    log.info(
        "merlin: %d volumes, %d with a report, %d with codes, from %d table(s); %d table entries have no volume",
        len(rows), sum("report" in r for r in rows), sum(bool(r.get("icd10") or r.get("phecodes")) for r in rows),
        used_tables, len(orphans),
    )
    return rows


# --------------------------------------------------------------------------- CT-RATE

# The column headers of CT-RATE's multi-abnormality labels CSV (the finding registry's).
CT_RATE_FINDINGS: tuple[str, ...] = CT_RATE_FINDING_NAMES
CT_RATE_REPORT_SECTIONS = (
    ("ClinicalInformation_EN", "CLINICAL INFORMATION"),
    ("Technique_EN", "TECHNIQUE"),
    ("Findings_EN", "FINDINGS"),
    ("Impressions_EN", "IMPRESSION"),
)
CT_RATE_SPLIT_FOLDERS = {"train": "train", "valid": "val", "train_fixed": "train", "valid_fixed": "val", "test": "test"}

# Air in Hounsfield units: the test that tells stored values from HU (see _needs_rescale).
_AIR_HU = (-1100.0, -900.0)


def _parse_spacing(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", text or "")]


def _needs_rescale(path: Path, slope: float, intercept: float) -> bool:
    """Whether the stored values still need ``slope * v + intercept`` to become HU.

    Reads only the first k-slice (the start of the file). The interpretation under
    which more voxels fall in the air window (-1100..-900 HU) wins: a volume already
    in HU shows its air there untouched; stored raw values show it after rescaling.
    A tie (no air either way) keeps the metadata's rescale, CT-RATE's documented rule.
    """
    import nibabel as nib

    try:
        image = nib.load(str(path))
        first = np.asarray(image.dataobj[..., 0], dtype=np.float64)
    except Exception as err:  # nibabel raises many types on corrupt files
        raise InputError(path, f"not a readable NIfTI image ({type(err).__name__}: {err})") from None
    lo, hi = _AIR_HU
    as_is = int(np.count_nonzero((first >= lo) & (first <= hi)))
    rescaled = first * slope + intercept
    after = int(np.count_nonzero((rescaled >= lo) & (rescaled <= hi)))
    return after >= as_is


def ct_rate_rows(root: str | os.PathLike, *, check_stored_values: bool = True) -> list[dict[str, Any]]:
    """Rows for CT-RATE: volumes under ``root`` (or ``root/dataset``) in the split folders,
    joined by VolumeName to the reports, multi-abnormality labels and metadata CSVs
    (found anywhere under ``root`` by their columns).

    Rows: {id, image, split, report?, findings? ({snake_case name: 0|1}, 18 names),
    spacing_override? ([sx, sy, sz] mm), rescale? ({slope, intercept}), age?, sex?}.
    check_stored_values: peek at each volume's first slice to skip ``rescale`` for
    volumes already in HU (see :func:`_needs_rescale`).
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "not a folder (expected CT-RATE's dataset folder)")
    base = root / "dataset" if (root / "dataset").is_dir() else root
    volumes: dict[str, tuple[Path, str]] = {}
    for folder, split in CT_RATE_SPLIT_FOLDERS.items():
        if not (base / folder).is_dir():
            continue
        for path in _volumes_under(base / folder):
            name = _strip_nifti_suffix(path.name)
            if name in volumes:
                # The *_fixed release repeats every volume: prefer the fixed copy.
                if not folder.endswith("_fixed"):
                    continue
            volumes[name] = (path, split)
    if not volumes:
        raise InputError(base, f"no volumes in {', '.join(f'{f}/' for f in CT_RATE_SPLIT_FOLDERS)} (CT-RATE layout)")

    reports: dict[str, dict[str, str]] = {}
    labels: dict[str, dict[str, str]] = {}
    metadata: dict[str, dict[str, str]] = {}
    for table_path in _tables_under(root):
        table = read_table(table_path)
        header = set(table[0]) if table else set()
        if "VolumeName" not in header:
            continue
        if "Findings_EN" in header or "Impressions_EN" in header:
            target = reports
        elif any(name in header for name in CT_RATE_FINDINGS):
            target = labels
        elif "XYSpacing" in header or "ZSpacing" in header:
            target = metadata
        else:
            continue
        for record in table:
            if record["VolumeName"]:
                target[_strip_nifti_suffix(record["VolumeName"])] = record

    rows = []
    kept_hu = 0
    for name, (path, split) in sorted(volumes.items()):
        row: dict[str, Any] = {"id": name, "image": str(path), "split": split}
        if name in reports:
            record = reports[name]
            report = _compose_report([(heading, record.get(column)) for column, heading in CT_RATE_REPORT_SECTIONS])
            if report:
                row["report"] = report
        if name in labels:
            record = labels[name]
            findings = {}
            for finding in CT_RATE_FINDINGS:
                value = record.get(finding, "")
                if value == "":
                    continue
                try:
                    flag = int(float(value))
                except ValueError:
                    raise InputError(path, f"label {finding!r} of {name} is {value!r}, not 0 or 1") from None
                if flag not in (0, 1):
                    raise InputError(path, f"label {finding!r} of {name} is {value!r}, not 0 or 1")
                findings[_snake(finding)] = flag
            if findings:
                row["findings"] = findings
        if name in metadata:
            record = metadata[name]
            xy = _parse_spacing(record.get("XYSpacing", ""))
            z = _parse_spacing(record.get("ZSpacing", ""))
            if xy and z and min(xy + z) > 0:
                # XYSpacing is DICOM PixelSpacing: [between rows (j), between columns (i)].
                row["spacing_override"] = [xy[-1], xy[0], z[0]]
            slope_text, intercept_text = record.get("RescaleSlope", ""), record.get("RescaleIntercept", "")
            if slope_text and intercept_text:
                try:
                    slope, intercept = float(slope_text), float(intercept_text)
                except ValueError:
                    raise InputError(
                        path, f"metadata RescaleSlope {slope_text!r} / RescaleIntercept {intercept_text!r} are not numbers"
                    ) from None
                if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
                    raise InputError(path, f"metadata rescale slope {slope} / intercept {intercept} unusable")
                if (slope, intercept) != (1.0, 0.0):
                    if not check_stored_values or _needs_rescale(path, slope, intercept):
                        row["rescale"] = {"slope": slope, "intercept": intercept}
                    else:
                        kept_hu += 1
            if record.get("PatientAge"):
                age = _age(record["PatientAge"])
                if age is not None:
                    row["age"] = age
            if _sex(record.get("PatientSex", "")):
                row["sex"] = _sex(record["PatientSex"])
        rows.append(row)
    log.info(
        "ct-rate: %d volumes, %d with a report, %d with labels, %d with metadata overrides (%d already in HU)",
        len(rows), sum("report" in r for r in rows), sum("findings" in r for r in rows),
        sum("spacing_override" in r for r in rows), kept_hu,
    )
    return rows


# --------------------------------------------------------------------------- TotalSegmentator


def merge_structure_masks(
    ct_path: str | os.PathLike, masks: Mapping[str, str | os.PathLike]
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Merge binary structure masks into one label map with OUR label indices.

    ct_path: the CT the masks belong to; every mask must share its grid exactly
        (else GeometryError naming the mask).
    masks: {structure name: mask file}; names mapped with label_for_structure,
        unmapped names ignored.
    Overlaps: masks of the SAME label are united; where masks of DIFFERENT labels
    overlap, the label with the smaller total volume wins (a small organ is not
    swallowed by its large neighbour); equal volumes: the higher index wins.
    Returns (label map [X, Y, Z] uint8 in the CT's stored voxel order, the CT's affine
    4x4 voxel -> RAS mm, {structure: label index} of the masks used).
    """
    from volumevlm.io import Volume, check_same_geometry
    from volumevlm.io.readers import read_volume

    image = read_volume(ct_path, kind="image")
    # Only the CT's grid is needed from here on: keep its affine and a zero-cost array
    # of its shape, and let the voxels go before the masks are read.
    ct_geometry = Volume(
        array=np.broadcast_to(np.zeros((), np.float32), image.shape), affine=image.affine, source=image.source
    )
    shape = image.shape
    del image

    # Per label: the union of its masks, kept as a bounding-box crop (masks are small
    # relative to the CT, so a hundred of them fit in memory).
    unions: dict[int, tuple[tuple[slice, ...], np.ndarray]] = {}
    used: dict[str, int] = {}
    for name in sorted(masks):
        index = label_for_structure(name)
        if index is None:
            continue
        mask_volume = read_volume(masks[name], kind="label")
        check_same_geometry(ct_geometry, mask_volume)
        mask = mask_volume.array != 0
        used[name] = index
        if not mask.any():
            continue
        box = _bounding_box(mask)
        if index in unions:
            old_box, old = unions[index]
            merged = tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(old_box, box))
            crop = np.zeros([s.stop - s.start for s in merged], dtype=bool)
            crop[_shift(old_box, merged)] |= old
            crop[_shift(box, merged)] |= mask[box]
            unions[index] = (merged, crop)
        else:
            unions[index] = (box, mask[box].copy())

    labels = np.zeros(shape, dtype=np.uint8)
    # Paint large labels first so smaller ones overwrite them where they overlap.
    order = sorted(unions, key=lambda i: (-int(unions[i][1].sum()), i))
    for index in order:
        box, crop = unions[index]
        labels[box][crop] = index
    return labels, ct_geometry.affine, used


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _shift(box: Sequence[slice], outer: Sequence[slice]) -> tuple[slice, ...]:
    return tuple(slice(b.start - o.start, b.stop - o.start) for b, o in zip(box, outer))


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def totalsegmentator_rows(
    root: str | os.PathLike, out_dir: str | os.PathLike, *, reuse_labels: bool = True
) -> list[dict[str, Any]]:
    """Rows for TotalSegmentator: one per ``<root>/<case>/ct.nii.gz``, with its
    ``segmentations/*.nii.gz`` merged (see :func:`merge_structure_masks`) into
    ``<out_dir>/labels/<case>.nii.gz`` (uint8, the CT's own geometry, written atomically).

    out_dir must lie outside ``root``: the user's dataset is never written to.
    reuse_labels: keep an existing label map that is newer than the case's CT and
        every mask (re-running the adapter then costs little).
    Rows: {id, image, label?, split?, age?, sex?}; split/age/sex from ``<root>/meta.csv``
    (columns image_id, age, gender, split).
    """
    from volumevlm.io import write_nifti

    root, out_dir = Path(root), Path(out_dir)
    if not root.is_dir():
        raise InputError(root, "not a folder (expected TotalSegmentator's <case>/ct.nii.gz folders)")
    if _inside(out_dir, root):
        raise InputError(out_dir, f"output folder lies inside the input dataset {root}; choose a folder outside it")
    cases = sorted(p.parent for p in root.glob("*/ct.nii.gz"))
    if not cases:
        raise InputError(root, "no <case>/ct.nii.gz found (TotalSegmentator layout)")

    meta: dict[str, dict[str, str]] = {}
    if (root / "meta.csv").is_file():
        for record in read_table(root / "meta.csv"):
            case_id = record.get(_find_column(record, ("image_id", "subject", "case")) or "", "")
            if case_id:
                meta[case_id] = record

    rows = []
    merged = reused = 0
    for case in cases:
        ct = case / "ct.nii.gz"
        row: dict[str, Any] = {"id": case.name, "image": str(ct)}
        mask_paths = {
            _strip_nifti_suffix(p.name): p
            for p in sorted((case / "segmentations").glob("*.nii*"))
            if p.name.lower().endswith(NIFTI_SUFFIXES)
        }
        if mask_paths:
            target = out_dir / "labels" / f"{case.name}.nii.gz"
            newest_input = max(p.stat().st_mtime_ns for p in [ct, *mask_paths.values()])
            if reuse_labels and target.is_file() and target.stat().st_mtime_ns >= newest_input:
                reused += 1
            else:
                labels, affine, _ = merge_structure_masks(ct, mask_paths)
                write_nifti(target, labels, affine, dtype=np.uint8)
                merged += 1
            row["label"] = str(target)
        record = meta.get(case.name)
        if record:
            split_column = _find_column(record, ("split",))
            if split_column and record[split_column]:
                value = record[split_column].strip().lower()
                if value not in SPLIT_NAMES:
                    raise InputError(root / "meta.csv", f"case {case.name}: unknown split {record[split_column]!r}")
                row["split"] = SPLIT_NAMES[value]
            age_column = _find_column(record, ("age",))
            if age_column and _age(record[age_column]) is not None:
                row["age"] = _age(record[age_column])
            sex_column = _find_column(record, ("gender", "sex"))
            if sex_column and _sex(record[sex_column]):
                row["sex"] = _sex(record[sex_column])
        rows.append(row)
    log.info(
        "totalsegmentator: %d cases, %d label maps merged, %d reused (labels: %s)",
        len(rows), merged, reused, ", ".join(f"{i}={n}" for i, n in LABELS.items() if i),
    )
    return rows


# --------------------------------------------------------------------------- entry points

LAYOUTS: dict[str, str] = {
    "merlin": "Merlin release: <study_id>.nii.gz + report / code tables (CSV or XLSX)",
    "ct-rate": "CT-RATE: dataset/{train,valid}/.../*.nii.gz + reports, labels and metadata CSVs",
    "totalsegmentator": "TotalSegmentator: <case>/ct.nii.gz + <case>/segmentations/*.nii.gz + meta.csv",
}


def _layout_key(name: str) -> str:
    key = _norm(name)
    for layout in LAYOUTS:
        if _norm(layout) == key:
            return layout
    raise VolumeVLMError(f"unknown dataset layout {name!r}; choose from {', '.join(LAYOUTS)}")


def adapt(layout_name: str, root: str | os.PathLike, out_manifest: str | os.PathLike, **options: Any) -> Path:
    """Write ``out_manifest`` (JSON lines) for the dataset at ``root`` in ``layout_name``'s layout.

    layout_name: "merlin" | "ct-rate" | "totalsegmentator" (case and '-'/'_' ignored).
    options: passed to the layout's adapter (merlin: tables, columns; ct-rate:
        check_stored_values; totalsegmentator: reuse_labels). Derived files (merged
        label maps) go beside the manifest; nothing is written inside ``root``.
    Returns the manifest path.
    """
    layout = _layout_key(layout_name)
    root, out_manifest = Path(root), Path(out_manifest)
    if root.is_dir() and _inside(out_manifest, root):
        raise InputError(out_manifest, f"manifest would be written inside the input dataset {root}; choose a path outside it")
    builders: dict[str, Callable[..., list[dict[str, Any]]]] = {
        "merlin": merlin_rows,
        "ct-rate": ct_rate_rows,
        "totalsegmentator": lambda r, **o: totalsegmentator_rows(r, out_manifest.parent, **o),
    }
    accepted = {"merlin": ("tables", "columns"), "ct-rate": ("check_stored_values",), "totalsegmentator": ("reuse_labels",)}
    unknown = sorted(set(options) - set(accepted[layout]))
    if unknown:
        raise VolumeVLMError(f"{layout}: unknown option(s) {unknown}; accepted: {', '.join(accepted[layout])}")
    rows = builders[layout](root, **options)
    return write_manifest(out_manifest, rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("layout", choices=sorted(LAYOUTS), help="; ".join(f"{k}: {v}" for k, v in LAYOUTS.items()))
    parser.add_argument("root", help="the dataset's folder (only read, never modified)")
    parser.add_argument("--out", required=True, help="manifest to write (.jsonl), outside the dataset folder")
    parser.add_argument(
        "--column", action="append", default=[], metavar="KEY=NAME",
        help=f"merlin: name a table column explicitly (keys: {', '.join(MERLIN_COLUMNS)})",
    )
    parser.add_argument("--table", action="append", default=[], help="merlin: read only these tables (repeatable)")
    parser.add_argument(
        "--no-value-check", action="store_true",
        help="ct-rate: record the metadata rescale without peeking at each volume's first slice",
    )
    parser.add_argument("--rebuild-labels", action="store_true", help="totalsegmentator: re-merge every label map")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options: dict[str, Any] = {}
    if args.layout == "merlin":
        columns = {}
        for item in args.column:
            key, sep, name = item.partition("=")
            if not sep:
                raise VolumeVLMError(f"--column {item!r}: expected KEY=NAME")
            columns[key.strip()] = name.strip()
        options = {"columns": columns, "tables": args.table or None}
    elif args.layout == "ct-rate":
        options = {"check_stored_values": not args.no_value_check}
    else:
        options = {"reuse_labels": not args.rebuild_labels}
    path = adapt(args.layout, args.root, args.out, **options)
    print(json.dumps({"manifest": str(path), "layout": args.layout}))
    return 0
