"""The one reader: every CT volume and label map enters volumevlm through here.

``read_volume`` reads NIfTI (nibabel), DICOM series folders and ``.zip`` archives of
one (SimpleITK/GDCM), NRRD and MetaImage (SimpleITK), and validates what it read.
Bad input raises :class:`InputError` with one line naming the file and the problem;
suspicious-but-usable input (values that do not look like Hounsfield units) emits a
:class:`VolumeWarning`. Input files are only ever opened for reading.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

from volumevlm.errors import InputError, TooLargeError
from volumevlm.io.archives import unpack_zip
from volumevlm.io.dicom import (
    MULTIFRAME_CT,
    DicomSource,
    choose_ct_series,
    is_dicom_file,
    not_ct_problem,
    order_classic_series,
    read_enhanced_ct,
    read_header,
    scan_folder,
)
from volumevlm.io.volume import (
    DEFAULT_MAX_VOXELS,
    LPS_TO_RAS,
    MAX_SPACING_MM,
    MAX_VOXELS_ENV,
    MIN_SPACING_MM,
    Volume,
    VolumeWarning,
    max_voxels_limit,
    spacing_from_affine,
)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = {".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "mha", ".mhd": "mha"}
ITK_IMAGE_IO = {"nrrd": "NrrdImageIO", "mha": "MetaImageIO"}
KINDS = ("image", "label")


def _why(err: BaseException) -> str:
    """The first non-empty line of an exception message, short enough for one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # ITK messages start with a file:line location; the useful part is the last line.
    text = lines[-1] if lines and lines[0].startswith("Exception thrown") else (lines[0] if lines else "")
    text = text or type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _format_of(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        return "dicom"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(".zip"):
        return "dicom-zip"
    for suffix, fmt in ITK_SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    if is_dicom_file(path):
        return "dicom-file"
    return "other"


def read_volume(path: str | os.PathLike, *, max_voxels: int | None = DEFAULT_MAX_VOXELS, kind: str = "image",
                series: str | None = None) -> Volume:
    """Read and validate one CT volume (``kind="image"``) or integer label map (``kind="label"``).

    path: .nii / .nii.gz, a DICOM series folder, a .zip of a DICOM series, .nrrd / .nhdr /
          .mha / .mhd, or a single DICOM file holding an Enhanced CT (multi-frame) image.
          DICOM objects that are not CT images (SEG, RTSTRUCT, SR, presentation states,
          MR, secondary captures ...) are refused; a folder holding them besides one CT
          series reads the CT series and warns which series it skipped.
    max_voxels: refuse volumes with more voxels (memory guard); the env var
          VOLUMEVLM_MAX_VOXELS overrides the default; None disables the guard.
    series: the SeriesInstanceUID to read from a DICOM folder or zip holding several
          CT series (without it, several CT series are a one-line error listing them).
    Returns a :class:`Volume`: array [X, Y, Z] in stored voxel order, float32 HU for
    images (rescale slope/intercept applied), an integer dtype for labels; affine
    voxel -> RAS mm. Raises InputError (one line naming ``path``) on bad input.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise InputError(source, "no such file or folder")
    limit = max_voxels_limit(max_voxels)
    fmt = _format_of(path)
    if fmt == "nifti":
        array, affine, meta = _read_nifti(path, source, limit, kind)
    elif fmt == "dicom":
        array, affine, meta = _read_dicom_folder(path, source, limit, series)
    elif fmt == "dicom-zip":
        array, affine, meta = _read_dicom_zip(path, source, limit, series)
    elif fmt == "dicom-file":
        array, affine, meta = _read_dicom_file(path, source, limit)
    else:
        array, affine, meta = _read_itk_file(path, source, limit, fmt)
    return _finish(array, affine, source, meta, kind, limit)


def as_volume(x, *, source: str | None = None, kind: str = "image") -> Volume:
    """Any supported input as a validated :class:`Volume` (inputs are never modified).

    x: a path | a nibabel image | (array [X, Y, Z], affine 4x4 voxel -> RAS mm) |
       a torch tensor [X, Y, Z] or [1, X, Y, Z] (a MONAI MetaTensor's own affine is used;
       a plain tensor is taken as 1 mm RAS voxels, with a warning) | a Volume.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(x, Volume):
        return x
    if isinstance(x, (str, os.PathLike)):
        return read_volume(x, kind=kind)
    limit = max_voxels_limit(DEFAULT_MAX_VOXELS)
    if isinstance(x, nib.spatialimages.SpatialImage):
        src = source or (x.get_filename() or f"<{type(x).__name__}>")
        _guard(x.shape, src, limit)
        try:
            data = np.array(x.dataobj) if kind == "label" else x.get_fdata(dtype=np.float32)
        except Exception as err:  # nibabel raises many types on corrupt data
            raise InputError(src, "image data unreadable", detail=_why(err)) from err
        meta = {"format": "nibabel", "dtype": str(x.get_data_dtype())}
        return _finish(data, x.affine, src, meta, kind, limit)
    if isinstance(x, (tuple, list)) and len(x) == 2:
        array, affine = x
        src = source or "<(array, affine)>"
        array = _to_numpy(array, src)
        if array.ndim == 4 and array.shape[0] == 1:  # a channel-first [1, X, Y, Z] tensor
            array = array[0]
        affine = _to_numpy(affine, src)
        meta = {"format": "array", "dtype": str(array.dtype)}
        return _finish(array, affine, src, meta, kind, limit)
    if _is_tensor(x):
        src = source or f"<{type(x).__name__}>"
        array = _to_numpy(x, src)
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]
        meta = {"format": "tensor", "dtype": str(array.dtype)}
        if getattr(x, "affine", None) is not None:
            affine = _to_numpy(x.affine, src)
            if affine.ndim == 3:  # a batched MetaTensor's affine is [B, 4, 4]
                affine = affine[0]
        else:
            warnings.warn(f"{src}: plain tensor has no affine; assuming 1 mm voxels in RAS order", VolumeWarning, stacklevel=2)
            affine = np.eye(4)
        return _finish(array, affine, src, meta, kind, limit)
    if isinstance(x, np.ndarray):
        raise InputError(source or "<array>", "a bare array has no geometry; pass (array, affine) instead")
    raise InputError(source or f"<{type(x).__name__}>", f"unsupported input type {type(x).__name__}")


def _is_tensor(x) -> bool:
    return type(x).__module__.startswith(("torch", "monai"))


def _to_numpy(x, source: str) -> np.ndarray:
    if _is_tensor(x):
        x = x.detach().cpu()
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        x = x.numpy()
    try:
        return np.asarray(x)
    except Exception as err:
        raise InputError(source, "cannot be read as an array", detail=_why(err)) from err


# --------------------------------------------------------------------------- NIfTI


def _read_nifti(path: Path, source: str, limit: int | None, kind: str):
    _check_raw_pixdim(path, source)
    try:
        # mmap=False: the file is read once, fully, through a read-only handle.
        # nibabel's own warnings about a garbled header would print extra lines; the
        # outcome (an error or our own warning) says what matters.
        with warnings.catch_warnings(), nib.imageglobals.LoggingOutputSuppressor():
            warnings.simplefilter("ignore")
            img = nib.load(str(path), mmap=False)
    except Exception as err:
        raise InputError(source, "not a readable NIfTI image", detail=_why(err)) from err
    header = img.header
    _check_shape(img.shape, source)
    _guard(img.shape, source, limit)
    if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        warnings.warn(
            f"{source}: NIfTI has neither qform nor sform; orientation is unknown (assumed from pixdim)",
            VolumeWarning,
            stacklevel=3,
        )
    try:
        data = np.asarray(img.dataobj) if kind == "label" else img.get_fdata(dtype=np.float32)
    except Exception as err:
        raise InputError(source, "truncated or corrupt image data", detail=_why(err)) from err
    meta = {"format": "nifti", "dtype": str(img.get_data_dtype())}
    return data, img.affine, meta


def _check_raw_pixdim(path: Path, source: str) -> None:
    """Refuse zero/negative voxel sizes as stored: nibabel silently 'fixes' them on load."""
    try:
        with nib.openers.ImageOpener(str(path), "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = nib.Nifti1Header.from_fileobj(f, check=False)
    except Exception:  # not NIfTI-1 (NIfTI-2, or not an image): nib.load reports it
        return
    n = int(min(3, max(0, raw["dim"][0])))
    pixdim = np.asarray(raw["pixdim"][1 : 1 + n], dtype=np.float64)
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
        raise InputError(source, f"non-positive or non-finite voxel size in header pixdim {pixdim.tolist()}")


# --------------------------------------------------------------------------- ITK (NRRD / MHA / DICOM)


@contextlib.contextmanager
def _quiet_itk():
    """ITK prints its warnings to stderr; ours are raised or warned explicitly instead."""
    import SimpleITK as sitk

    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield sitk
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _sitk_to_numpy(image) -> tuple[np.ndarray, np.ndarray]:
    """A SimpleITK image as (array [X, Y, Z, ...], affine voxel -> RAS mm)."""
    import SimpleITK as sitk

    dim = image.GetDimension()
    array = sitk.GetArrayFromImage(image)  # [.., Z, Y, X]
    array = np.transpose(array, tuple(range(dim - 1, -1, -1)))
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    n = min(dim, 3)
    affine_lps = np.eye(4)
    affine_lps[:n, :n] = direction[:n, :n] * spacing[:n]
    affine_lps[:n, 3] = origin[:n]
    return array, LPS_TO_RAS @ affine_lps


def _read_itk_file(path: Path, source: str, limit: int | None, fmt: str):
    with _quiet_itk() as sitk:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        if fmt in ITK_IMAGE_IO:
            # The suffix names the format: ITK must not pick another reader by probing.
            reader.SetImageIO(ITK_IMAGE_IO[fmt])
        try:
            reader.ReadImageInformation()
        except RuntimeError as err:
            what = "not a readable image" if fmt == "other" else f"not a readable {fmt.upper()} image"
            raise InputError(source, what, detail=_why(err)) from err
        size = tuple(int(n) for n in reader.GetSize())
        spacing = tuple(float(v) for v in reader.GetSpacing())
        if not all(np.isfinite(v) and v > 0 for v in spacing):
            raise InputError(source, f"non-positive or non-finite voxel size {list(spacing)} in the header")
        if reader.GetNumberOfComponents() != 1:
            raise InputError(source, f"{reader.GetNumberOfComponents()}-component (e.g. RGB) image; a CT volume has one")
        is_dicom = "0008|0060" in reader.GetMetaDataKeys() or "0020|000e" in reader.GetMetaDataKeys()
        if is_dicom and len(size) == 3 and size[2] == 1:
            raise InputError(source, "a single DICOM slice; pass the folder (or .zip) holding the whole series")
        _check_shape(size, source)
        _guard(size, source, limit)
        meta = {"format": "dicom" if is_dicom else (fmt if fmt != "other" else "itk")}
        if "0008|0060" in reader.GetMetaDataKeys():
            meta["modality"] = reader.GetMetaData("0008|0060").strip()
        try:
            image = reader.Execute()
        except RuntimeError as err:
            raise InputError(source, "truncated or corrupt image data", detail=_why(err)) from err
    meta["dtype"] = image.GetPixelIDTypeAsString()
    array, affine = _sitk_to_numpy(image)
    return array, affine, meta


def _dicom_dtype(header) -> str:
    """The stored pixel type, e.g. "int16" (before RescaleSlope/Intercept)."""
    bits = header.get("BitsAllocated")
    if not bits:
        return ""
    return ("int" if int(header.get("PixelRepresentation", 0) or 0) == 1 else "uint") + str(int(bits))


def _read_dicom_file(path: Path, source: str, limit: int | None):
    """One DICOM file: an enhanced (multi-frame) CT is a volume; anything else is refused."""
    header = read_header(path)
    if header is None:
        raise InputError(source, "not a readable DICOM file")
    problem = not_ct_problem(header)
    if problem:
        raise InputError(source, problem)
    if str(header.get("SOPClassUID", "")) in MULTIFRAME_CT or int(header.get("NumberOfFrames", 1) or 1) > 1:
        return _read_enhanced(path, source, limit)
    raise InputError(source, "a single DICOM slice; pass the folder (or .zip) holding the whole series")


def _read_enhanced(path: Path, source: str, limit: int | None):
    def guard(shape):
        _check_shape(shape, source)
        _guard(shape, source, limit)

    array, affine_lps, meta = read_enhanced_ct(path, source, guard)
    return array, LPS_TO_RAS @ affine_lps, meta


def _read_dicom_folder(folder: Path, source: str, limit: int | None, wanted: str | None = None):
    all_series = scan_folder(folder)
    chosen = choose_ct_series(all_series, source, wanted)
    first = chosen.first
    multiframe = [path for path, h in chosen.files
                  if str(h.get("SOPClassUID", "")) in MULTIFRAME_CT or int(h.get("NumberOfFrames", 1) or 1) > 1]
    if multiframe:
        if len(chosen.files) > 1:
            raise InputError(source, f"series {chosen.uid} holds {len(chosen.files)} files of which {len(multiframe)} "
                                     "multi-frame; pass one enhanced CT file")
        array, affine, meta = _read_enhanced(multiframe[0], source, limit)
        meta["n_series"] = len(all_series)
        return array, affine, meta
    shape = (int(first.get("Columns", 0) or 0), int(first.get("Rows", 0) or 0), len(chosen.files))
    _check_shape(shape, source)
    _guard(shape, source, limit)
    ordered = order_classic_series(chosen, source)
    with _quiet_itk() as sitk:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(path) for path, _ in ordered])
        try:
            image = reader.Execute()
        except RuntimeError as err:
            raise InputError(source, "truncated or corrupt DICOM series", detail=_why(err)) from err
    array, affine = _sitk_to_numpy(image)
    meta = {
        "format": "dicom",
        "dicom_form": "classic",
        "dtype": _dicom_dtype(first) or image.GetPixelIDTypeAsString(),
        "modality": str(first.get("Modality", "") or ""),
        "series_uid": chosen.uid,
        "series_description": chosen.description,
        "n_files": len(chosen.files),
        "n_series": len(all_series),
        "dicom": DicomSource(datasets=tuple(h for _, h in ordered)),
    }
    return array, affine, meta


def zip_unpack_limit(limit: int | None) -> int:
    """Most bytes a zipped series may unpack to: about 2 bytes per voxel plus headers,
    with room for 4 bytes per voxel."""
    return (4 * limit if limit is not None else 4 * DEFAULT_MAX_VOXELS) + (64 << 20)


def _read_dicom_zip(path: Path, source: str, limit: int | None, wanted: str | None = None):
    with tempfile.TemporaryDirectory(prefix="volumevlm-zip-") as tmp:
        # Counted while inflating (a zip's stated sizes can lie), flat under ``tmp``.
        unpack_zip(path, tmp, max_bytes=zip_unpack_limit(limit), source=source)
        array, affine, meta = _read_dicom_folder(Path(tmp), source, limit, wanted)
        array = np.array(array)  # own the memory before the folder goes
    meta["format"] = "dicom"
    meta["container"] = "zip"
    return array, affine, meta


# --------------------------------------------------------------------------- validation


def _check_shape(shape, source: str) -> None:
    shape = tuple(int(n) for n in shape)
    core = list(shape)
    while len(core) > 3 and core[-1] == 1:
        core.pop()
    if len(core) < 3:
        raise InputError(source, f"2D image (shape {shape}); a CT volume needs three dimensions")
    if len(core) > 3:
        raise InputError(source, f"{len(core)}D image (shape {shape}); pass a single 3D volume")
    if min(core) < 2:
        raise InputError(source, f"single slice (shape {shape}); a CT volume needs at least 2 voxels along every axis")


def _guard(shape, source: str, limit: int | None) -> None:
    n = int(np.prod([int(s) for s in shape], dtype=np.int64))
    if limit is not None and n > limit:
        raise TooLargeError(
            source,
            f"{n} voxels exceeds the memory guard of {limit} (raise it with max_voxels or {MAX_VOXELS_ENV})",
        )


def _finish(array, affine, source: str, meta: dict, kind: str, limit: int | None) -> Volume:
    """Validate geometry and values; return the Volume (arrays are fresh copies)."""
    array = np.asarray(array)
    _check_shape(array.shape, source)
    _guard(array.shape, source, limit)
    array = array.reshape(array.shape[:3])

    affine = np.array(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise InputError(source, f"affine must be 4x4, got shape {affine.shape}")
    if not np.all(np.isfinite(affine)):
        raise InputError(source, "affine holds NaN or infinite values")
    spacing = spacing_from_affine(affine)
    if min(spacing) <= 0 or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(source, f"zero voxel spacing or singular affine (spacing {_fmt(spacing)} mm)")
    if min(spacing) < MIN_SPACING_MM or max(spacing) > MAX_SPACING_MM:
        raise InputError(
            source,
            f"implausible voxel spacing {_fmt(spacing)} mm (expected {MIN_SPACING_MM}..{MAX_SPACING_MM} mm)",
        )

    if array.dtype.kind not in "biuf":
        raise InputError(source, f"unsupported voxel type {array.dtype}")
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            bad = int(array.size - np.count_nonzero(finite))
            raise InputError(source, f"{bad} non-finite (NaN or infinite) voxels")

    meta = dict(meta, kind=kind)
    if kind == "label":
        if array.dtype.kind == "f":
            if not np.array_equal(array, np.round(array)):
                raise InputError(source, "label map holds non-integer values")
        lo, hi = (float(array.min()), float(array.max()))
        dtype = next(
            (t for t in (np.uint8, np.int16, np.int32, np.int64) if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max)
        )
        array = array.astype(dtype)  # astype copies: the caller's array is never aliased
    else:
        array = np.array(array, dtype=np.float32)
        _warn_if_not_hu(array, source)
    return Volume(array=array, affine=affine, source=source, meta=meta)


def hu_problem(lo: float, hi: float) -> str | None:
    """Why a volume with value range [lo, hi] does not look like CT Hounsfield units, or None."""
    if lo >= 0.0 and hi <= 1.0:
        return f"values lie within [0, 1] ({lo:.4g}..{hi:.4g}): normalised intensities, not Hounsfield units"
    if lo > -500.0:
        return f"minimum value {lo:.4g} > -500: no air; not Hounsfield units (missing rescale intercept, or not CT?)"
    if hi < 0.0:
        return f"maximum value {hi:.4g} < 0: no soft tissue or bone; not Hounsfield units?"
    return None


def _warn_if_not_hu(array: np.ndarray, source: str) -> None:
    problem = hu_problem(float(array.min()), float(array.max()))
    if problem:
        warnings.warn(f"{source}: {problem}", VolumeWarning, stacklevel=4)


def _fmt(values) -> str:
    return " x ".join(f"{v:.4g}" for v in values)
