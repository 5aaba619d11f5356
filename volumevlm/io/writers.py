"""Writers: NIfTI files, DICOM CT (classic series, enhanced multi-frame) and the atomic file writer every output uses.

A reader of a half-written output must never see it: every file goes to a temporary
name in the destination directory first and is moved into place with ``os.replace``;
a DICOM series is written into a temporary folder beside the destination and renamed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from volumevlm.errors import InputError
from volumevlm.io.volume import LPS_TO_RAS

NIFTI_SUFFIXES = (".nii.gz", ".nii")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"


def _nifti_suffix(path: Path) -> str:
    for suffix in NIFTI_SUFFIXES:
        if path.name.lower().endswith(suffix):
            return suffix
    raise InputError(path, "a NIfTI output must end with .nii or .nii.gz")


def _umask_mode(mode: int) -> int:
    # mkstemp/mkdtemp create private (0o600/0o700) entries; a finished output gets the
    # permissions an ordinary open() would have given it.
    current = os.umask(0)
    os.umask(current)
    return mode & ~current


def _check_affine(affine: np.ndarray, target: Path) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputError(target, f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(target, "affine is singular (a zero voxel spacing?)")
    return affine


def _quantize(array: np.ndarray, slope: float, intercept: float, dtype, target: Path) -> np.ndarray:
    """Stored integers such that ``stored * slope + intercept`` reproduces ``array`` (HU)."""
    if slope == 0 or not np.isfinite(slope) or not np.isfinite(intercept):
        raise InputError(target, f"invalid rescale slope {slope} / intercept {intercept}")
    if not np.all(np.isfinite(array)):
        raise InputError(target, "array holds NaN or infinite values; refusing to write")
    stored = np.rint((np.asarray(array, dtype=np.float64) - intercept) / slope)
    info = np.iinfo(dtype)
    if stored.size and (stored.min() < info.min or stored.max() > info.max):
        lo, hi = info.min * slope + intercept, info.max * slope + intercept
        raise InputError(
            target,
            f"values {float(np.min(array)):.6g}..{float(np.max(array)):.6g} do not fit {np.dtype(dtype).name} "
            f"with slope {slope} and intercept {intercept} (representable {min(lo, hi):.6g}..{max(lo, hi):.6g})",
        )
    return stored.astype(dtype)


def _smallest_int_dtype(array: np.ndarray):
    lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if lo >= info.min and hi <= info.max:
            return dtype
    return np.int64


def write_nifti(
    path: str | os.PathLike,
    array: np.ndarray,
    affine: np.ndarray,
    *,
    dtype=None,
    slope: float | None = None,
    intercept: float | None = None,
) -> Path:
    """Write ``array`` ([X, Y, Z] or [X, Y, Z, C]) with ``affine`` (voxel -> RAS mm) as NIfTI-1.

    dtype: on-disk dtype. Default: int16 when ``slope``/``intercept`` are given (then
    ``stored = round((array - intercept) / slope)`` and scl_slope/scl_inter are set, so
    readers get the values back to within slope/2); otherwise float32 for float arrays
    and the smallest fitting integer type for integer/bool arrays (label maps).
    qform and sform are both set to the affine (code 1, scanner), units mm.
    The file appears atomically; ``.nii.gz`` is gzip-compressed.
    """
    path = Path(path)
    _nifti_suffix(path)  # an unsupported suffix fails here, before any work
    affine = _check_affine(affine, path)
    array = np.asarray(array)
    if array.ndim not in (3, 4):
        raise InputError(path, f"expected a 3D (or 4D) array, got shape {array.shape}")

    scaled = slope is not None or intercept is not None
    if scaled:
        slope = 1.0 if slope is None else float(slope)
        intercept = 0.0 if intercept is None else float(intercept)
        out_dtype = np.dtype(dtype or np.int16)
        if out_dtype.kind not in "iu":
            raise InputError(path, f"slope/intercept need an integer storage dtype, got {out_dtype.name}")
        data = _quantize(array, slope, intercept, out_dtype, path)
    elif dtype is not None:
        out_dtype = np.dtype(dtype)
        if out_dtype.kind in "iu":
            if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
                raise InputError(path, f"non-integer values cannot be stored as {out_dtype.name} without a slope")
            data = _quantize(array, 1.0, 0.0, out_dtype, path)
        else:
            data = array.astype(out_dtype)
    elif array.dtype.kind in "biu":
        data = array.astype(_smallest_int_dtype(array))
    else:
        data = array.astype(np.float32)

    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    if scaled:
        # nibabel writes the given integers verbatim when the header carries a scaling.
        img.header.set_slope_inter(slope, intercept)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")

    return save_image_atomic(img, path)


def write_atomic(path: str | os.PathLike, write: Callable[[str], None], suffix: str = "") -> Path:
    """The one atomic writer: ``write(tmp)`` fills a temporary file beside ``path`` (its
    name ends in ``suffix`` for writers that pick a format by name), which then gets an
    ordinary file's permissions and is renamed onto ``path``, so a reader sees the old
    file or the new one, never half of one. The temporary file never outlives a failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _umask_mode(0o666))  # mkstemp makes 0600; an open() would give 0666 & ~umask
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_image_atomic(image, path: str | os.PathLike) -> Path:
    """Write a nibabel image exactly as it is to ``path`` (.nii or .nii.gz), atomically."""
    return write_atomic(path, image.to_filename, suffix=_nifti_suffix(Path(path)))


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters) keeping as many digits as fit."""
    value = float(value) + 0.0  # no "-0"
    for digits in range(15, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    raise InputError("<dicom>", f"cannot format {value} as a DICOM decimal string")


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


class _DicomGeometry:
    """What a DICOM CT writer needs of an affine: LPS directions, spacing, slice positions."""

    def __init__(self, affine: np.ndarray, target: Path):
        lps = LPS_TO_RAS @ _check_affine(affine, target)  # RAS -> LPS flips x, y: the same matrix
        self.lps = lps
        self.spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
        dir_i, dir_j, dir_k = (_unit(lps[:3, n]) for n in range(3))
        if abs(float(dir_i @ dir_j)) > 1e-4:
            raise InputError(target, "affine i and j axes are not orthogonal; a DICOM slice cannot store shear")
        if abs(abs(float(np.cross(dir_i, dir_j) @ dir_k)) - 1.0) > 1e-4:
            raise InputError(target, "affine k axis is not normal to the slices (gantry tilt); not supported")
        self.normal = np.cross(dir_i, dir_j)
        # ImageOrientationPatient: the direction of a row (along i), then of a column (along j).
        self.orientation = [_ds(v) for v in (*dir_i, *dir_j)]
        # PixelSpacing: [between rows (j), between columns (i)].
        self.pixel_spacing = [_ds(self.spacing[1]), _ds(self.spacing[0])]

    def position(self, k: int) -> np.ndarray:
        return (self.lps @ np.array([0.0, 0.0, float(k), 1.0]))[:3]


def _ct_dataset(name: Path, sop_class: str, sop_uid: str, *, patient_id: str, study_uid: str, series_uid: str,
                frame_uid: str, series_description: str, stored: np.ndarray):
    """A CT dataset holding what classic and enhanced CT share: patient, study, series,
    frame of reference, equipment and the image pixel module (16-bit signed)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(name), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.Modality = "CT"
    ds.Manufacturer = "volumevlm"
    ds.PatientID = str(patient_id)
    ds.PatientName = str(patient_id)
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 1
    ds.SeriesDescription = series_description
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = int(stored.shape[1])
    ds.Columns = int(stored.shape[0])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    return ds


def _frame_uid(study_uid: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[study_uid, "frame-of-reference"])


def write_dicom_series(
    folder: str | os.PathLike,
    array_hu: np.ndarray,
    affine: np.ndarray,
    *,
    patient_id: str,
    series_description: str = "",
    study_uid: str | None = None,
    series_uid: str | None = None,
    slice_thickness: float | None = None,
    slope: float = 1.0,
    intercept: float = -1024.0,
) -> Path:
    """Write a CT volume as a DICOM series: one file per k index (``array_hu[:, :, k]``).

    array_hu: [X, Y, Z] Hounsfield units; stored as signed 16-bit
              ``round((HU - intercept) / slope)`` with RescaleSlope/RescaleIntercept.
    affine:   4x4 voxel -> RAS mm; any orientation whose i and j axes are orthogonal
              and whose k axis is normal to them (no shear / gantry tilt).
    Pixel (row r, column c) of slice k holds voxel (c, r, k): columns run along i,
    rows along j, so ImageOrientationPatient = (direction of i, direction of j) in LPS.
    UIDs: when ``study_uid``/``series_uid`` are given, FrameOfReferenceUID and every
    SOPInstanceUID are derived from them deterministically; otherwise fresh UIDs.
    The folder appears atomically (written beside it, then renamed); an existing
    folder is replaced. Returns the folder.
    """
    from pydicom.uid import generate_uid

    folder = Path(folder)
    geometry = _DicomGeometry(affine, folder)
    array_hu = np.asarray(array_hu)
    if array_hu.ndim != 3:
        raise InputError(folder, f"expected a 3D array [X, Y, Z], got shape {array_hu.shape}")
    stored = _quantize(array_hu, float(slope), float(intercept), np.int16, folder)

    study_uid = study_uid or generate_uid()
    frame_uid = _frame_uid(study_uid)
    deterministic = series_uid is not None
    series_uid = series_uid or generate_uid()
    thickness = float(slice_thickness) if slice_thickness is not None else float(geometry.spacing[2])
    n_slices = stored.shape[2]
    width = max(4, len(str(n_slices)))

    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists() and not folder.is_dir():
        raise InputError(folder, "exists and is not a folder; refusing to replace it with a DICOM series")
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        for k in range(n_slices):
            sop_uid = generate_uid(entropy_srcs=[series_uid, str(k)]) if deterministic else generate_uid()
            name = tmp / f"slice_{k:0{width}d}.dcm"
            ds = _ct_dataset(name, CT_IMAGE_STORAGE, sop_uid, patient_id=patient_id, study_uid=study_uid,
                             series_uid=series_uid, frame_uid=frame_uid, series_description=series_description,
                             stored=stored)
            ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
            ds.InstanceNumber = k + 1
            position = geometry.position(k)
            ds.ImagePositionPatient = [_ds(v) for v in position]
            ds.ImageOrientationPatient = geometry.orientation
            ds.SliceLocation = _ds(float(position @ geometry.normal))
            ds.PixelSpacing = geometry.pixel_spacing
            ds.SliceThickness = _ds(thickness)
            ds.SpacingBetweenSlices = _ds(geometry.spacing[2])
            ds.RescaleSlope = _ds(slope)
            ds.RescaleIntercept = _ds(intercept)
            ds.RescaleType = "HU"
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype("<i2").tobytes()
            ds.save_as(str(name), enforce_file_format=True)
        os.chmod(tmp, _umask_mode(0o777))
        for name in tmp.iterdir():
            os.chmod(name, _umask_mode(0o666))
        _replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def write_dicom_enhanced(
    path: str | os.PathLike,
    array_hu: np.ndarray,
    affine: np.ndarray,
    *,
    patient_id: str,
    series_description: str = "",
    study_uid: str | None = None,
    series_uid: str | None = None,
    slice_thickness: float | None = None,
    slope: float = 1.0,
    intercept: float = -1024.0,
    frame_order=None,
) -> Path:
    """Write a CT volume as ONE Enhanced CT Image Storage file (multi-frame): frame f holds
    slice ``array_hu[:, :, frame_order[f]]`` (default: k order).

    The geometry lives where scanners put it: PixelMeasures and PlaneOrientation in the
    shared functional groups, PlanePosition, FrameContent and PixelValueTransformation
    (RescaleSlope/Intercept) per frame. array_hu, affine, slope, intercept, UIDs: as
    :func:`write_dicom_series` (the SOP Instance UID derives from ``series_uid`` when
    given). frame_order: a permutation of range(Z), to store frames out of spatial order
    as some exports do (readers must sort them along the slice normal). Holds the modules
    volumevlm and viewers need to place the frames; it is not validated against every
    attribute the Enhanced CT IOD requires. Written atomically; returns ``path``.
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    path = Path(path)
    geometry = _DicomGeometry(affine, path)
    array_hu = np.asarray(array_hu)
    if array_hu.ndim != 3:
        raise InputError(path, f"expected a 3D array [X, Y, Z], got shape {array_hu.shape}")
    stored = _quantize(array_hu, float(slope), float(intercept), np.int16, path)
    n_frames = stored.shape[2]
    order = np.arange(n_frames) if frame_order is None else np.asarray(frame_order, dtype=np.int64)
    if sorted(order.tolist()) != list(range(n_frames)):
        raise InputError(path, f"frame_order must be a permutation of 0..{n_frames - 1}")

    study_uid = study_uid or generate_uid()
    deterministic = series_uid is not None
    series_uid = series_uid or generate_uid()
    sop_uid = generate_uid(entropy_srcs=[series_uid, "enhanced"]) if deterministic else generate_uid()
    thickness = float(slice_thickness) if slice_thickness is not None else float(geometry.spacing[2])

    def item(**values) -> Sequence:
        entry = Dataset()
        for key, value in values.items():
            setattr(entry, key, value)
        return Sequence([entry])

    def write(tmp: str) -> None:
        ds = _ct_dataset(Path(tmp), ENHANCED_CT_IMAGE_STORAGE, sop_uid, patient_id=patient_id, study_uid=study_uid,
                         series_uid=series_uid, frame_uid=_frame_uid(study_uid),
                         series_description=series_description, stored=stored)
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL", "NONE"]
        ds.InstanceNumber = 1
        ds.ContentQualification = "RESEARCH"
        ds.NumberOfFrames = n_frames
        ds.BurnedInAnnotation = "NO"
        ds.PresentationLUTShape = "IDENTITY"
        ds.LossyImageCompression = "00"
        shared = Dataset()
        shared.PixelMeasuresSequence = item(PixelSpacing=geometry.pixel_spacing, SliceThickness=_ds(thickness),
                                            SpacingBetweenSlices=_ds(geometry.spacing[2]))
        shared.PlaneOrientationSequence = item(ImageOrientationPatient=geometry.orientation)
        shared.CTImageFrameTypeSequence = item(FrameType=["DERIVED", "SECONDARY", "AXIAL", "NONE"])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        frames = []
        for k in order.tolist():
            group = Dataset()
            group.PlanePositionSequence = item(ImagePositionPatient=[_ds(v) for v in geometry.position(k)])
            group.FrameContentSequence = item(InStackPositionNumber=k + 1, StackID="1",
                                              DimensionIndexValues=[k + 1])
            group.PixelValueTransformationSequence = item(RescaleSlope=_ds(slope), RescaleIntercept=_ds(intercept),
                                                          RescaleType="HU")
            frames.append(group)
        ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
        dimension_uid = generate_uid(entropy_srcs=[sop_uid, "dimensions"])
        ds.DimensionOrganizationSequence = item(DimensionOrganizationUID=dimension_uid)
        ds.DimensionIndexSequence = item(DimensionOrganizationUID=dimension_uid,
                                         DimensionIndexPointer=0x00200032,  # ImagePositionPatient
                                         FunctionalGroupPointer=0x00209113)  # PlanePositionSequence
        ds.PixelData = np.ascontiguousarray(np.transpose(stored[:, :, order], (2, 1, 0))).astype("<i2").tobytes()
        ds.save_as(tmp, enforce_file_format=True)

    return write_atomic(path, write)


def _replace_folder(new: Path, folder: Path) -> None:
    """Move ``new`` to ``folder``; an existing folder is moved aside first, then deleted."""
    if not folder.exists():
        os.replace(new, folder)
        return
    old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
    os.replace(folder, old / folder.name)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text to ``path`` atomically (see :func:`write_atomic`)."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
