"""The one reader (and writer) of case manifests.

A manifest is a JSON-lines file: one JSON object per line, one line per case. Paths in
a row (``image``, ``label``) are relative to the manifest's own directory (absolute
paths are allowed), so a cohort folder can be moved or copied as a whole.

Common row fields (every field but ``image`` is optional; unknown fields are kept):

==================  ==========================================================
``id``              unique case id (str); defaults to the image file's stem
``image``           CT volume: NIfTI / NRRD / MHA file or a DICOM series folder
``label``           label map (NIfTI, integer indices of volumevlm.data.labels)
``report``          radiology report text (str)
``icd10``           ICD-10 codes (list of str)
``phecodes``        phecodes (list of str)
``findings``        {finding name: 0 | 1}
``split``           "train" | "val" | "test"
``spacing_override``  [sx, sy, sz] mm per voxel axis, replaces the header's spacing
``rescale``         {"slope": s, "intercept": b}: HU = s * stored value + b
==================  ==========================================================

:func:`read_manifest` resolves paths, validates every line (a malformed line raises
:class:`~volumevlm.errors.ManifestError` naming file and line), and drops rows whose
files are missing, with one warning line (``strict=True`` raises instead).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from volumevlm.errors import ManifestError

log = logging.getLogger(__name__)

# Row fields that hold file-system paths (resolved against the manifest's folder).
PATH_FIELDS: tuple[str, ...] = ("image", "label")
SPLITS: tuple[str, ...] = ("train", "val", "test")

# field -> (accepted Python types, wording for the error message)
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "id": ((str, int), "a string"),
    "image": ((str,), "a path string"),
    "label": ((str, type(None)), "a path string or null"),
    "report": ((str, type(None)), "a string or null"),
    "icd10": ((list, type(None)), "a list of codes or null"),
    "phecodes": ((list, type(None)), "a list of codes or null"),
    "findings": ((dict, type(None)), "an object {finding: 0|1} or null"),
    "split": ((str, type(None)), "a string"),
    "spacing_override": ((list, type(None)), "a list of 3 spacings in mm or null"),
    "rescale": ((dict, type(None)), 'an object {"slope": s, "intercept": b} or null'),
}


@dataclass(frozen=True)
class MissingFile:
    """One row dropped because a file it names does not exist."""

    line: int  # 1-based line number in the manifest
    id: str
    field: str  # which row field ("image", "label")
    path: str  # the resolved, absolute path that is missing


@dataclass
class Manifest:
    """Validated manifest rows with absolute paths.

    ``rows``: the usable rows (dicts, paths absolute strings); ``missing``: the rows
    dropped for missing files, one :class:`MissingFile` per dropped row.
    """

    path: Path
    rows: list[dict[str, Any]]
    missing: list[MissingFile] = field(default_factory=list)

    @property
    def root(self) -> Path:
        """The folder relative paths were resolved against."""
        return self.path.parent

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]

    @property
    def ids(self) -> list[str]:
        return [row["id"] for row in self.rows]

    def split(self, name: str) -> list[dict[str, Any]]:
        """Rows whose ``split`` is ``name``; an unknown name is an error, not an empty list."""
        present = sorted({row.get("split") for row in self.rows if row.get("split")})
        if name not in SPLITS and name not in present:
            raise ManifestError(
                f"{self.path}: no split named {name!r}; splits present: {', '.join(present) or 'none'}"
            )
        return [row for row in self.rows if row.get("split") == name]


def _resolve(value: str, root: Path) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else root / path


def _default_id(image: str) -> str:
    name = Path(image.rstrip("/")).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _validate_row(row: Any, where: str, require: Sequence[str]) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in require:
        if row.get(key) in (None, ""):
            raise ManifestError(f"{where}: missing required field {key!r}")
    for key, (types, wording) in _FIELD_TYPES.items():
        if key in row and not isinstance(row[key], types):
            raise ManifestError(f"{where}: field {key!r} must be {wording}, got {type(row[key]).__name__}")
    for key in ("icd10", "phecodes"):
        if isinstance(row.get(key), list) and not all(isinstance(c, (str, int)) for c in row[key]):
            raise ManifestError(f"{where}: field {key!r} must list codes as strings")
    if isinstance(row.get("findings"), dict):
        bad = [k for k, v in row["findings"].items() if v not in (0, 1)]
        if bad:
            raise ManifestError(f"{where}: findings values must be 0 or 1 (bad: {bad[0]!r})")
    spacing = row.get("spacing_override")
    if spacing is not None and (
        len(spacing) != 3 or not all(isinstance(s, (int, float)) and s > 0 for s in spacing)
    ):
        raise ManifestError(f"{where}: spacing_override must be 3 positive numbers (mm), got {spacing!r}")
    rescale = row.get("rescale")
    if rescale is not None:
        if not all(isinstance(rescale.get(k), (int, float)) for k in ("slope", "intercept")):
            raise ManifestError(f"{where}: rescale must be {{'slope': number, 'intercept': number}}")
        if rescale["slope"] == 0:
            raise ManifestError(f"{where}: rescale slope must not be 0")
    return row


def read_manifest(
    path: str | os.PathLike, *, strict: bool = False, require: Sequence[str] = ("image",)
) -> Manifest:
    """Read and validate a JSON-lines manifest.

    ``require``: row fields that must be present and non-empty on every line.
    Relative paths are resolved against the manifest's folder (and returned absolute).
    Rows naming a file that does not exist are dropped and reported in one warning
    line; with ``strict=True`` they raise :class:`ManifestError` instead. Blank lines
    are skipped. Raises ManifestError for unreadable files, malformed JSON (naming the
    line), wrong field types and duplicate ids.
    """
    manifest_path = Path(path).expanduser().resolve()
    root = manifest_path.parent
    try:
        text = manifest_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{manifest_path}: manifest not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"{manifest_path}: cannot read manifest ({err})") from None

    rows: list[dict[str, Any]] = []
    missing: list[MissingFile] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{manifest_path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
        row = _validate_row(row, where, require)
        row = dict(row)
        if row.get("id") in (None, ""):
            if not row.get("image"):
                raise ManifestError(f"{manifest_path} line {number}: row has neither 'id' nor 'image'")
            row["id"] = _default_id(row["image"])
        row["id"] = str(row["id"])
        if row["id"] in seen:
            raise ManifestError(
                f"{manifest_path} line {number}: duplicate id {row['id']!r} (first on line {seen[row['id']]})"
            )
        seen[row["id"]] = number

        absent = None
        for key in PATH_FIELDS:
            if row.get(key) in (None, ""):
                continue
            resolved = _resolve(row[key], root)
            row[key] = str(resolved)
            if absent is None and not resolved.exists():
                absent = MissingFile(number, row["id"], key, str(resolved))
        if absent is not None:
            if strict:
                raise ManifestError(f"{where}: {absent.field} file not found: {absent.path}")
            missing.append(absent)
            continue
        rows.append(row)

    if missing:
        first = missing[0]
        total = len(rows) + len(missing)
        log.warning(
            "%s: %d of %d rows point at missing files (first: line %d, %s %s); they are skipped",
            manifest_path.name, len(missing), total, first.line, first.field, first.path,
        )
    return Manifest(path=manifest_path, rows=rows, missing=missing)


def _portable(value: Any, root: Path) -> Any:
    """A path under the manifest's folder becomes relative (so the folder can move)."""
    path = Path(value)
    if not path.is_absolute():
        return str(value)
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


def write_manifest(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write rows as a JSON-lines manifest, atomically (temp file + os.replace).

    Absolute ``image``/``label`` paths under the manifest's folder are written relative
    to it; other paths are kept as given. Returns the manifest path. Raises
    ManifestError for rows that are not JSON-serialisable.
    """
    out = Path(path).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, row in enumerate(rows):
        record = dict(row)
        for key in PATH_FIELDS:
            if record.get(key) not in (None, ""):
                record[key] = _portable(os.fspath(record[key]), out.parent)
        try:
            lines.append(json.dumps(record, ensure_ascii=False, allow_nan=False))
        except (TypeError, ValueError) as err:
            raise ManifestError(f"{out}: row {index} (id {record.get('id')!r}) is not JSON-serialisable ({err})") from None
    from volumevlm.io.writers import write_text_atomic

    write_text_atomic(out, "".join(line + "\n" for line in lines))
    return out
