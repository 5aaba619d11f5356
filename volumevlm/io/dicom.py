"""DICOM input: what each file is, which series of a folder is the CT, enhanced CT frames.

Used by :func:`volumevlm.io.read_volume` only (the one reader); nothing here is a second
entry point. Headers are parsed with pydicom. A classic CT series (one file per slice)
is then read by SimpleITK/GDCM in the order worked out here; an Enhanced CT object
(one file, many frames, geometry in the shared and per-frame functional groups) is read
frame by frame with pydicom and its frames are put in order along the slice normal.

Objects that are not CT images (segmentations, RT structure sets, structured reports,
presentation states, MR, secondary captures ...) are refused with one line naming the
file and the object's type, before any model sees them.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from volumevlm.errors import InputError, one_line
from volumevlm.io.volume import VolumeWarning

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
MULTIFRAME_CT = (ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE)
CT_SOP_CLASSES = (CT_IMAGE_STORAGE, *MULTIFRAME_CT)
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR: an index, not an image


@dataclass(frozen=True, repr=False)
class DicomSource:
    """The DICOM objects a Volume was read from (headers only, no pixel data), kept so
    outputs (DICOM SEG) can reference them and reuse their geometry.

    datasets: one per slice in k order for a classic series; one multi-frame dataset
        for an enhanced CT.
    frame_of_k: enhanced CT only: the stored frame index (0-based) of each k slice.
    """

    datasets: tuple
    frame_of_k: tuple[int, ...] | None = None

    @property
    def enhanced(self) -> bool:
        return self.frame_of_k is not None

    def __repr__(self) -> str:
        kind = "enhanced CT" if self.enhanced else "CT series"
        return f"DicomSource({kind}, {len(self.datasets)} dataset(s))"


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file (the "DICM" marker after the 128-byte preamble)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_header(path: Path):
    """The file's header (no pixel data) as a pydicom Dataset, or None if not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, KeyError, TypeError):
        return None


def object_type(ds) -> str:
    """What a dataset is, for messages: "Segmentation Storage (Modality SEG)"."""
    from pydicom.uid import UID

    sop = str(ds.get("SOPClassUID", "") or "")
    name = UID(sop).name if sop else "no SOP Class UID"
    modality = str(ds.get("Modality", "") or "missing")
    return f"{name} (Modality {modality})"


def not_ct_problem(ds) -> str | None:
    """Why a dataset is not a CT image volumevlm can read, or None when it is one."""
    sop = str(ds.get("SOPClassUID", "") or "")
    modality = str(ds.get("Modality", "") or "").upper()
    if sop in CT_SOP_CLASSES and modality in ("CT", ""):
        return None
    if not sop and modality == "CT":  # some exporters drop the SOP class; the modality says CT
        return None
    return f"a {object_type(ds)} object, not a CT image; volumevlm reads CT image series and enhanced CT only"


def _is_localizer(ds) -> bool:
    return "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])]


@dataclass
class _Series:
    uid: str
    files: list  # [(path, header)]

    @property
    def first(self):
        return self.files[0][1]

    @property
    def description(self) -> str:
        return str(self.first.get("SeriesDescription", "") or "")

    def label(self) -> str:
        frames = sum(int(h.get("NumberOfFrames", 1) or 1) for _, h in self.files)
        text = f"{self.uid}"
        if self.description:
            text += f" '{self.description}'"
        return text + f" ({len(self.files)} file(s), {frames} image(s))"


def scan_folder(folder: Path) -> list[_Series]:
    """Every DICOM file under ``folder`` (recursively; others are ignored), grouped by
    SeriesInstanceUID, series and files in a stable order."""
    groups: dict[str, list] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            header = read_header(path)
            if header is None or str(header.get("SOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY:
                continue
            uid = str(header.get("SeriesInstanceUID", "") or "") or f"<no series uid: {name}>"
            groups.setdefault(uid, []).append((path, header))
    return [_Series(uid, files) for uid, files in groups.items()]


def choose_ct_series(series: list[_Series], source: str, wanted: str | None = None) -> _Series:
    """The one CT image series of a folder. Other objects (SEG, SR, MR ...) and CT
    localizers are skipped with a warning naming them; none, or several CT series
    (unless ``wanted`` names one by SeriesInstanceUID), is a one-line error."""
    if not series:
        raise InputError(source, "no DICOM series found (not DICOM files, or unreadable)")
    if wanted is not None:
        match = [s for s in series if s.uid == wanted]
        if not match:
            raise InputError(source, f"no series with SeriesInstanceUID {wanted} (found {len(series)} series)")
        problem = not_ct_problem(match[0].first)
        if problem:
            raise InputError(match[0].files[0][0], problem)
        return _say_skipped(series, match[0], source)
    ct = [s for s in series if not_ct_problem(s.first) is None]
    volumes = [s for s in ct if not _is_localizer(s.first)]
    if not volumes:
        if ct:
            raise InputError(source, f"only a CT localizer (scout) series {ct[0].label()}, no CT volume")
        path, header = series[0].files[0]
        others = f" (and {len(series) - 1} other non-CT series)" if len(series) > 1 else ""
        raise InputError(path, f"{not_ct_problem(header)}{others}")
    if len(volumes) > 1:
        listed = "; ".join(s.label() for s in volumes[:4]) + ("; ..." if len(volumes) > 4 else "")
        raise InputError(
            source,
            f"{len(volumes)} CT series ({listed}); pass the folder of one series "
            "(or read_volume(..., series=SeriesInstanceUID))",
        )
    return _say_skipped(series, volumes[0], source)


def _say_skipped(series: list[_Series], chosen: _Series, source: str) -> _Series:
    skipped = [s for s in series if s is not chosen]
    if skipped:
        what = ", ".join(f"{object_type(s.first)} {s.uid}" for s in skipped[:4]) + (", ..." if len(skipped) > 4 else "")
        warnings.warn(f"{source}: reading CT series {chosen.label()}; skipped {len(skipped)} other series: {what}",
                      VolumeWarning, stacklevel=5)
    return chosen


# --------------------------------------------------------------------------- geometry


def _floats(value, n: int, source, what: str) -> np.ndarray:
    try:
        values = np.array([float(v) for v in (value if value is not None else [])], dtype=np.float64)
    except (TypeError, ValueError):
        values = np.array([])
    if values.shape != (n,) or not np.all(np.isfinite(values)):
        raise InputError(source, f"DICOM {what} is missing or malformed", detail=repr(value)[:120])
    return values


def check_slice_positions(orientations: np.ndarray, positions: np.ndarray, source, what: str = "slices") -> np.ndarray:
    """Slices (or frames) must share one orientation, be evenly spaced along its normal
    (no gaps, no duplicates) and sit straight above one another (no gantry tilt: a voxel
    grid cannot hold sheared slices). Returns each one's distance along the normal (mm)."""
    orientation = orientations[0]
    if not np.allclose(orientations, orientation[None, :], atol=1e-4):
        raise InputError(source, f"{what} have different ImageOrientationPatient (mixed orientations)")
    normal = np.cross(orientation[:3], orientation[3:])
    along = positions @ normal
    gaps = np.diff(np.sort(along))
    if gaps.size == 0:
        return along
    if np.any(gaps < 1e-3):
        raise InputError(source, f"two or more {what} share one ImagePositionPatient (duplicate {what})")
    step = float(np.median(gaps))
    if np.any(np.abs(gaps - step) > max(0.01, 0.1 * step)):
        raise InputError(source, f"uneven slice spacing {float(gaps.min()):.4g}..{float(gaps.max()):.4g} mm (missing {what}?)")
    in_plane = positions - np.outer(along, normal)
    shift = float(np.max(np.linalg.norm(in_plane - in_plane[np.argmin(along)], axis=1)))
    if shift > max(0.1, 0.1 * step):
        raise InputError(source, f"{what} are shifted in-plane by up to {shift:.3g} mm along the stack (gantry tilt?); "
                                 "not supported")
    return along


def order_classic_series(series: _Series, source: str) -> list:
    """The files of a classic series sorted along the slice normal, after the checks of
    :func:`check_slice_positions`."""
    headers = [h for _, h in series.files]
    orientations = np.stack([_floats(h.get("ImageOrientationPatient"), 6, source, "ImageOrientationPatient") for h in headers])
    positions = np.stack([_floats(h.get("ImagePositionPatient"), 3, source, "ImagePositionPatient") for h in headers])
    along = check_slice_positions(orientations, positions, source)
    return [series.files[i] for i in np.argsort(along, kind="stable")]


def _group_item(ds, frame_group, sequence: str):
    """The first item of a functional-group macro: the per-frame one if present, else the shared one."""
    if frame_group is not None and sequence in frame_group and len(frame_group[sequence].value):
        return frame_group[sequence].value[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and sequence in shared[0] and len(shared[0][sequence].value):
        return shared[0][sequence].value[0]
    return None


def read_enhanced_ct(path: Path, source: str, guard) -> tuple[np.ndarray, np.ndarray, dict]:
    """An Enhanced (or Legacy Converted Enhanced) CT file as (HU [X, Y, Z], affine LPS, meta).

    Frames are put in order along the slice normal whatever their stored order; pixel
    spacing, orientation and position come from the shared / per-frame functional
    groups, the rescale per frame. ``guard(shape)`` raises before the pixels are decoded.
    """
    import pydicom

    try:
        # The header first: geometry and the memory guard come before the pixels are read.
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as err:  # pydicom raises many types on corrupt files
        raise InputError(source, "unreadable DICOM file", detail=one_line(err, 160)) from err
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    guard((columns, rows, n_frames))
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) != n_frames:
        raise InputError(source, f"enhanced CT with {n_frames} frames but {0 if per_frame is None else len(per_frame)} "
                                 "per-frame functional groups")
    orientations, positions, spacings, rescale = [], [], [], []
    for f in range(n_frames):
        group = per_frame[f]
        where = f"{source} (frame {f + 1})"
        orient = _group_item(ds, group, "PlaneOrientationSequence")
        pos = _group_item(ds, group, "PlanePositionSequence")
        measures = _group_item(ds, group, "PixelMeasuresSequence")
        if orient is None or pos is None or measures is None:
            raise InputError(where, "no plane orientation, plane position or pixel measures in the functional groups")
        orientations.append(_floats(orient.get("ImageOrientationPatient"), 6, where, "ImageOrientationPatient"))
        positions.append(_floats(pos.get("ImagePositionPatient"), 3, where, "ImagePositionPatient"))
        spacings.append(_floats(measures.get("PixelSpacing"), 2, where, "PixelSpacing"))
        transform = _group_item(ds, group, "PixelValueTransformationSequence") or ds
        rescale.append((float(transform.get("RescaleSlope", 1.0) or 1.0), float(transform.get("RescaleIntercept", 0.0) or 0.0)))
    orientations, positions, spacings = np.stack(orientations), np.stack(positions), np.stack(spacings)
    if not np.allclose(spacings, spacings[0][None, :], atol=1e-4):
        raise InputError(source, "frames have different PixelSpacing")
    along = check_slice_positions(orientations, positions, source, what="frames")
    order = np.argsort(along, kind="stable")
    try:
        stored = np.asarray(pydicom.dcmread(str(path)).pixel_array)
        stored = stored.reshape(n_frames, rows, columns)
    except Exception as err:
        raise InputError(source, "pixel data missing, truncated or not decodable", detail=one_line(err, 160)) from err
    # Filled frame by frame in slice order (no full-size float64 temporary), then viewed as
    # [columns (i), rows (j), frames (k)] like the classic reader's array.
    slices = np.empty((n_frames, rows, columns), dtype=np.float32)
    for k, f in enumerate(order):
        slope, intercept = rescale[f]
        slices[k] = stored[f].astype(np.float64) * slope + intercept
    array = np.transpose(slices, (2, 1, 0))

    row_dir, col_dir = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row_dir, col_dir)
    step = float(np.median(np.diff(along[order]))) if n_frames > 1 else float(spacings[0][0])
    affine = np.eye(4)
    affine[:3, 0] = row_dir * spacings[0][1]  # PixelSpacing = [between rows, between columns]
    affine[:3, 1] = col_dir * spacings[0][0]
    affine[:3, 2] = normal * step
    affine[:3, 3] = positions[order[0]]

    meta = {
        "format": "dicom",
        "dicom_form": "enhanced",
        "dtype": ("int" if int(ds.get("PixelRepresentation", 0) or 0) else "uint") + str(int(ds.get("BitsAllocated", 16))),
        "modality": str(ds.get("Modality", "") or ""),
        "series_uid": str(ds.get("SeriesInstanceUID", "") or ""),
        "series_description": str(ds.get("SeriesDescription", "") or ""),
        "n_files": 1,
        "n_frames": n_frames,
        # The header only (no pixels): what a DICOM SEG needs to reference the frames.
        "dicom": DicomSource(datasets=(ds,), frame_of_k=tuple(int(f) for f in order)),
    }
    return array, affine, meta


__all__ = [
    "CT_IMAGE_STORAGE",
    "CT_SOP_CLASSES",
    "DicomSource",
    "ENHANCED_CT_IMAGE_STORAGE",
    "LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE",
    "check_slice_positions",
    "choose_ct_series",
    "is_dicom_file",
    "not_ct_problem",
    "object_type",
    "order_classic_series",
    "read_enhanced_ct",
    "read_header",
    "scan_folder",
]
