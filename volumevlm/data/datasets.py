"""Manifest datasets: cases -> preprocessed tensors (+ report, codes, findings, labels).

Every image goes through THE preprocessing (:func:`volumevlm.data.transforms.pipeline`),
after our reader (:func:`volumevlm.io.readers.read_volume`) and the per-row overrides a
manifest may carry (``spacing_override``, ``rescale``; see :func:`load_case_volume`).

Caching: with ``cache_dir`` the preprocessed tensors are kept on disk through
``monai.data.PersistentDataset`` under ``cache_dir/<kind>-<fingerprint>/``. The
fingerprint covers the preprocessing config, the transform definition it expands to
and the MONAI version; each entry's key covers the case's file paths, sizes and
modification times and its overrides. Changing any of them makes a new key, so a stale
cache entry is never served (old entries are simply no longer read).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import monai
import monai.transforms as mt
import numpy as np
import torch
from monai.data import Dataset as MonaiDataset
from monai.data import PersistentDataset

from volumevlm.data.manifest import Manifest, read_manifest
from volumevlm.data.transforms import PreprocessConfig, pipeline, transform_specs
from volumevlm.errors import ManifestError, VolumeVLMError
from volumevlm.io import Volume, check_same_geometry
from volumevlm.io.readers import VolumeWarning, hu_problem, read_volume
from volumevlm.io.writers import write_text_atomic

log = logging.getLogger(__name__)

# Bump when what this module puts into a cache entry changes meaning.
CACHE_FORMAT = 1
OVERRIDE_FIELDS = ("spacing_override", "rescale")


# --------------------------------------------------------------------------- loading one case


def apply_spacing_override(volume: Volume, spacing_mm: Sequence[float]) -> Volume:
    """The same voxels with voxel size ``spacing_mm`` ([sx, sy, sz] along stored i, j, k).

    The affine keeps its directions and origin; only its column lengths change.
    """
    affine = np.array(volume.affine, dtype=np.float64)
    old = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    affine[:3, :3] = affine[:3, :3] * (np.asarray(spacing_mm, dtype=np.float64) / old)[None, :]
    meta = dict(volume.meta, spacing_override=[float(s) for s in spacing_mm], header_spacing=old.tolist())
    return Volume(array=volume.array, affine=affine, source=volume.source, meta=meta)


def load_case_volume(row: Mapping[str, Any], key: str = "image") -> Volume:
    """Read ``row[key]`` (key "image" -> HU float32, "label" -> integer map) and apply the row's overrides.

    ``rescale`` ({"slope", "intercept"}) maps the stored values read from an image to HU
    (HU = slope * value + intercept); ``spacing_override`` ([sx, sy, sz] mm) replaces the
    header's voxel size, for the image and its label alike (they share one header
    geometry). Both come from adapters for datasets whose headers are known to be
    unreliable (CT-RATE). Returns a :class:`Volume` [X, Y, Z] in stored voxel order.
    """
    kind = "label" if key == "label" else "image"
    rescale = row.get("rescale") if kind == "image" else None
    if rescale:
        # The stored values are not HU yet: the reader's "not HU" warning is expected here,
        # and the values are checked again after rescaling.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", VolumeWarning)
            volume = read_volume(row[key], kind=kind)
        slope, intercept = float(rescale["slope"]), float(rescale["intercept"])
        array = volume.array * np.float32(slope) + np.float32(intercept)
        volume = Volume(array=array.astype(np.float32), affine=volume.affine, source=volume.source,
                        meta=dict(volume.meta, rescale=[slope, intercept]))
        problem = hu_problem(float(array.min()), float(array.max()))
        if problem:
            warnings.warn(f"{volume.source}: after the manifest's rescale, {problem}", VolumeWarning, stacklevel=2)
    else:
        volume = read_volume(row[key], kind=kind)
    if row.get("spacing_override"):
        volume = apply_spacing_override(volume, row["spacing_override"])
    return volume


class ReadCased(mt.MapTransform):
    """Read a case dict {"image": path, "label"?: path, overrides...} into Volumes.

    A MONAI Transform so that PersistentDataset caches from the read onwards. The
    label's geometry is checked against the image's as stored on disk, BEFORE any
    resampling (GeometryError naming the label file); overrides are applied after.
    Output: {"image": Volume, "label"?: Volume}; override fields are consumed.
    """

    def __init__(self, label_key: str | None = None):
        keys = ["image"] + ([label_key] if label_key else [])
        super().__init__(keys)
        self.label_key = label_key

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        # Read without the spacing override first: the geometry check compares the grids
        # as stored; the override then moves image and label together.
        image = load_case_volume({"image": data["image"], "rescale": data.get("rescale")}, "image")
        out: dict[str, Any] = {"image": image}
        if self.label_key:
            label = load_case_volume({"label": data[self.label_key]}, "label")
            check_same_geometry(image, label)
            out[self.label_key] = label
        spacing = data.get("spacing_override")
        if spacing:
            out = {key: apply_spacing_override(volume, spacing) for key, volume in out.items()}
        return out


# --------------------------------------------------------------------------- caching


def config_fingerprint(config: PreprocessConfig, kind: str, label_keys: Sequence[str] = ()) -> str:
    """Hex digest naming one preprocessing definition: config, the transform specs it
    expands to, the MONAI version and this module's cache format."""
    payload = {
        "kind": kind,
        "config": config.to_dict(),
        "specs": transform_specs(config, "image", list(label_keys)),
        "code": _code_fingerprint(),
        "monai": monai.__version__,
        "torch": torch.__version__,
        "format": CACHE_FORMAT,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _code_fingerprint() -> str:
    """Digest of the source of every module that shapes a cache entry (reader,
    geometry, preprocessing, this module): an edited reader or transform must not be
    answered from entries the old code made."""
    import volumevlm.data.transforms as transforms_module
    import volumevlm.io.readers as readers_module
    import volumevlm.io.volume as volume_module

    digest = hashlib.sha256()
    for module in (readers_module, volume_module, transforms_module, sys.modules[__name__]):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def _file_stamp(path: str) -> list:
    """Identity of a file's (or DICOM folder's) content for cache keys: size and mtime of every file."""
    p = Path(path)
    try:
        if p.is_dir():
            return sorted(
                [entry.name, entry.stat().st_size, entry.stat().st_mtime_ns]
                for entry in os.scandir(p)
                if entry.is_file()
            )
        stat = p.stat()
    except OSError:
        return ["missing"]  # the read that follows raises the one-line error
    return [stat.st_size, stat.st_mtime_ns]


def case_hash(item: Mapping[str, Any]) -> bytes:
    """Cache key of one case dict: paths, file stamps and overrides (not report text)."""
    payload = {
        key: ([str(value), _file_stamp(str(value))] if key in ("image", "label") else value)
        for key, value in sorted(item.items())
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest().encode()


def _cached_dataset(items: list[dict], transform: mt.Compose, cache_dir, fingerprint: str, kind: str):
    if cache_dir is None:
        return MonaiDataset(items, transform)
    folder = Path(cache_dir) / f"{kind}-{fingerprint[:16]}"
    folder.mkdir(parents=True, exist_ok=True)
    about = folder / "preprocessing.json"
    if not about.exists():
        # For people looking at the cache folder: which preprocessing made these entries.
        write_text_atomic(about, json.dumps({"fingerprint": fingerprint, "kind": kind}))
    return PersistentDataset(items, transform, cache_dir=folder, hash_func=case_hash)


def _as_rows(manifest_or_rows) -> list[dict[str, Any]]:
    if isinstance(manifest_or_rows, Manifest):
        return list(manifest_or_rows.rows)
    if isinstance(manifest_or_rows, (str, os.PathLike)):
        return list(read_manifest(manifest_or_rows).rows)
    rows = [dict(r) for r in manifest_or_rows]
    for index, row in enumerate(rows):
        if not row.get("image"):
            raise ManifestError(f"row {index} (id {row.get('id')!r}): no 'image'")
    return rows


def _case_item(row: Mapping[str, Any], label: bool) -> dict[str, Any]:
    item = {"image": str(row["image"])}
    if label:
        item["label"] = str(row["label"])
    for key in OVERRIDE_FIELDS:
        if row.get(key):
            item[key] = row[key]
    return item


def _fetch(data, index: int) -> dict[str, Any]:
    """``data[index]``, with our one-line errors surfacing as themselves: MONAI wraps any
    exception raised inside a transform in RuntimeError("applying transform ...")."""
    try:
        return data[index]
    except RuntimeError as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, VolumeVLMError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


def _plain(tensor) -> torch.Tensor:
    """A plain tensor (MetaTensor's metadata dropped; training batches need none)."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else torch.as_tensor(tensor)


def _config(config) -> PreprocessConfig:
    if config is None:
        return PreprocessConfig()
    return config if isinstance(config, PreprocessConfig) else PreprocessConfig.from_dict(dict(config))


# --------------------------------------------------------------------------- datasets


def case_report(row: dict) -> str | None:
    """A manifest row's report as training uses it: None where it is missing or blank."""
    report = row.get("report")
    return report if isinstance(report, str) and report.strip() else None


class PretrainDataset(torch.utils.data.Dataset):
    """Image-report-codes cases for pretraining.

    manifest_or_rows: a Manifest, a manifest path, or row dicts (paths absolute or
        relative to the working directory).
    config: the PreprocessConfig (default: PreprocessConfig()).
    cache_dir: folder for the persistent preprocessing cache (None: no cache).

    Item: {"image": float32 [1, X, Y, Z] (preprocessed), "report": str | None,
    "icd10": list[str], "phecodes": list[str], "findings": {name: 0|1} | None,
    "id": str, "has_report": bool, "has_codes": bool}. A case without report or
    codes still yields an item: training uses what each case has.
    """

    def __init__(self, manifest_or_rows, config: PreprocessConfig | None = None, cache_dir: str | os.PathLike | None = None):
        self.rows = _as_rows(manifest_or_rows)
        self.config = _config(config)
        transform = mt.Compose([ReadCased(), *pipeline(self.config, keys=("image",)).transforms])
        self.fingerprint = config_fingerprint(self.config, "pretrain")
        items = [_case_item(row, label=False) for row in self.rows]
        self._data = _cached_dataset(items, transform, cache_dir, self.fingerprint, "pretrain")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.image(index), **self.case_fields(index)}

    def image(self, index: int) -> torch.Tensor:
        """The preprocessed image float32 [1, X, Y, Z] of case ``index``."""
        return _plain(_fetch(self._data, index)["image"])

    def case_fields(self, index: int) -> dict[str, Any]:
        """Everything of an item but its image (no volume is read)."""
        row = self.rows[index]
        report = case_report(row)
        icd10 = [str(c) for c in (row.get("icd10") or [])]
        phecodes = [str(c) for c in (row.get("phecodes") or [])]
        findings = row.get("findings")
        return {
            "report": report,
            "icd10": icd10,
            "phecodes": phecodes,
            "findings": {str(k): int(v) for k, v in findings.items()} if findings else None,
            "id": str(row.get("id", index)),
            "has_report": report is not None,
            "has_codes": bool(icd10 or phecodes),
        }


class SegmentationDataset(torch.utils.data.Dataset):
    """Image + label-map cases for segmentation.

    rows: a Manifest, a manifest path, or row dicts; rows without a ``label`` are
        skipped (one warning line counts them).
    Item: {"image": float32 [1, X, Y, Z], "label": int64 [1, X, Y, Z] (indices of
    volumevlm.data.labels, resampled nearest-neighbour through the same pipeline),
    "id": str}. A label whose grid differs from its image's raises GeometryError
    naming the label file (checked on the stored grids, before resampling).
    """

    def __init__(self, rows, config: PreprocessConfig | None = None, cache_dir: str | os.PathLike | None = None):
        all_rows = _as_rows(rows)
        self.rows = [row for row in all_rows if row.get("label")]
        if len(self.rows) < len(all_rows):
            first = next(row for row in all_rows if not row.get("label"))
            log.warning(
                "segmentation: %d of %d cases have no label and are skipped (first: %s)",
                len(all_rows) - len(self.rows), len(all_rows), first.get("id"),
            )
        self.config = _config(config)
        transform = mt.Compose([ReadCased("label"), *pipeline(self.config, keys=("image",), label_keys=("label",)).transforms])
        self.fingerprint = config_fingerprint(self.config, "segmentation", ("label",))
        items = [_case_item(row, label=True) for row in self.rows]
        self._data = _cached_dataset(items, transform, cache_dir, self.fingerprint, "segmentation")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = _fetch(self._data, index)
        return {
            "image": _plain(sample["image"]),
            # Resampled nearest-neighbour as float32: the values are whole numbers already.
            "label": torch.round(_plain(sample["label"])).long(),
            "id": str(self.rows[index].get("id", index)),
        }


def collate_cases(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch items of these datasets: tensors stacked ([B, 1, X, Y, Z]); flags as bool
    tensors [B]; everything else (reports, code lists, findings, ids) as lists."""
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if torch.is_tensor(values[0]):
            out[key] = torch.stack(values)
        elif isinstance(values[0], bool):
            out[key] = torch.tensor(values, dtype=torch.bool)
        else:
            out[key] = values
    return out
