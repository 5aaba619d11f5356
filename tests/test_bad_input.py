"""Every kind of bad input gives one line naming the file, through the Python API and the
CLI, and is never modified. Phantom data is synthetic."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volumevlm.cli import main
from volumevlm.errors import InputError
from volumevlm.io import VolumeWarning, read_volume, write_dicom_series, write_nifti


def _nifti_raw(path, array, affine):
    """A NIfTI written by nibabel directly (our writer refuses some of these arrays)."""
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _nifti_with_pixdim(path, array, affine, *, axis, value):
    """A NIfTI whose header pixdim[axis] is ``value`` (nibabel refuses to write such a
    header, so the bytes are patched); qform only, so the affine comes from pixdim."""
    img = nib.Nifti1Image(array, affine)
    img.set_sform(None, code=0)
    raw = bytearray(img.to_bytes())
    struct.pack_into("<f", raw, 76 + 4 * axis, value)  # pixdim starts at byte 76
    path.write_bytes(gzip.compress(bytes(raw)) if path.name.endswith(".gz") else bytes(raw))
    return path


def _make_bad(kind: str, tmp: Path, hu, affine) -> Path:
    if kind == "text_named_nii_gz":
        p = tmp / "notes.nii.gz"
        p.write_text("this is not an image\n")
    elif kind == "text_named_nii":
        p = tmp / "notes.nii"
        p.write_text("this is not an image either, but it is long enough to look like a header. " * 8)
    elif kind == "truncated_nii_gz":
        full = write_nifti(tmp / "full.nii.gz", hu, affine).read_bytes()
        p = tmp / "truncated.nii.gz"
        p.write_bytes(full[: len(full) // 2])
        (tmp / "full.nii.gz").unlink()
    elif kind == "truncated_nii":
        full = write_nifti(tmp / "full.nii", hu, affine).read_bytes()
        p = tmp / "truncated.nii"
        p.write_bytes(full[: len(full) // 2])
        (tmp / "full.nii").unlink()
    elif kind == "image_2d":
        p = _nifti_raw(tmp / "flat.nii.gz", hu[:, :, 0], affine)
    elif kind == "single_slice":
        p = _nifti_raw(tmp / "one_slice.nii.gz", hu[:, :, :1], affine)
    elif kind == "image_4d":
        p = _nifti_raw(tmp / "four_d.nii.gz", np.stack([hu, hu, hu], axis=-1), affine)
    elif kind == "nan_voxels":
        bad = hu.copy()
        bad[3, 4, 5] = np.nan
        bad[6, 7, 8] = np.inf
        p = _nifti_raw(tmp / "nan.nii.gz", bad, affine)
    elif kind == "zero_spacing":
        p = _nifti_with_pixdim(tmp / "zero_spacing.nii.gz", hu, affine, axis=3, value=0.0)
    elif kind == "tiny_spacing":
        p = _nifti_raw(tmp / "tiny_spacing.nii.gz", hu, np.diag([0.01, 0.01, 0.01, 1.0]))
    elif kind == "huge_spacing":
        p = _nifti_raw(tmp / "huge_spacing.nii.gz", hu, np.diag([1.0, 1.0, 100.0, 1.0]))
    elif kind == "negative_pixdim":
        p = _nifti_with_pixdim(tmp / "negative_pixdim.nii", hu, affine, axis=2, value=-1.0)
    elif kind in ("negative_spacing_mha", "zero_spacing_mha"):
        p = tmp / f"{kind}.mha"
        spacing = "1 -1 2" if kind.startswith("negative") else "1 0 2"
        header = (
            f"ObjectType = Image\nNDims = 3\nDimSize = {hu.shape[0]} {hu.shape[1]} {hu.shape[2]}\n"
            f"ElementSpacing = {spacing}\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n"
        )
        p.write_bytes(header.encode() + np.asfortranarray(hu).tobytes(order="F"))
    elif kind == "not_a_zip":
        p = tmp / "series.zip"
        p.write_bytes(os.urandom(2048))
    elif kind == "zip_without_dicom":
        import zipfile

        p = tmp / "empty_series.zip"
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("readme.txt", "no images here")
    elif kind == "folder_without_dicom":
        p = tmp / "no_dicom"
        p.mkdir()
        (p / "a.txt").write_text("hello")
    elif kind == "dicom_missing_slice":
        p = write_dicom_series(tmp / "gappy", hu, affine, patient_id="p")
        (p / sorted(os.listdir(p))[hu.shape[2] // 2]).unlink()
    elif kind == "dicom_single_file":
        p = write_dicom_series(tmp / "one", hu[:, :, :1], affine, patient_id="p")
    elif kind == "one_file_of_a_series":
        folder = write_dicom_series(tmp / "series", hu, affine, patient_id="p")
        p = folder / sorted(os.listdir(folder))[0]
    elif kind == "missing_file":
        p = tmp / "does_not_exist.nii.gz"
    elif kind == "unknown_format":
        p = tmp / "scan.jpg"
        p.write_bytes(b"\xff\xd8\xff" + os.urandom(100))
    else:
        raise AssertionError(kind)
    return p


BAD = {
    "text_named_nii_gz": "not a readable NIfTI",
    "text_named_nii": "not a readable NIfTI",
    "truncated_nii_gz": "truncated",
    "truncated_nii": "truncated",
    "image_2d": "2D image",
    "single_slice": "single slice",
    "image_4d": "4D image",
    "nan_voxels": "2 non-finite",
    "zero_spacing": "non-positive or non-finite voxel size",
    "tiny_spacing": "implausible voxel spacing",
    "huge_spacing": "implausible voxel spacing",
    "negative_pixdim": "non-positive or non-finite voxel size",
    "negative_spacing_mha": "non-positive or non-finite voxel size",
    "zero_spacing_mha": "non-positive or non-finite voxel size",
    "not_a_zip": "not a readable zip",
    "zip_without_dicom": "no DICOM series",
    "folder_without_dicom": "no DICOM series",
    "dicom_missing_slice": "uneven slice spacing",
    "dicom_single_file": "single slice",
    "one_file_of_a_series": "a single DICOM slice; pass the folder",
    "missing_file": "no such file",
    "unknown_format": "not a readable image",
}


def _digest(path: Path) -> dict:
    if not path.exists():
        return {}
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input_one_line_error_api_and_cli(tmp_path, ct_phantom, capsys, kind):
    hu, _, affine = ct_phantom(shape=(24, 20, 12))
    path = _make_bad(kind, tmp_path, hu, affine)
    before = _digest(path)
    with pytest.raises(InputError) as err:
        read_volume(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path) + ":")
    assert BAD[kind] in message, message
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], captured.err
    assert captured.out == ""
    assert _digest(path) == before  # inputs are never modified
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_memory_guard_env_var_and_argument(tmp_path, ct_phantom, monkeypatch, capsys):
    hu, _, affine = ct_phantom(shape=(24, 20, 12))
    path = write_nifti(tmp_path / "big.nii.gz", hu, affine)
    with pytest.raises(InputError, match="memory guard of 1000"):
        read_volume(path, max_voxels=1000)
    assert read_volume(path, max_voxels=None).shape == hu.shape
    monkeypatch.setenv("VOLUMEVLM_MAX_VOXELS", "5000")
    with pytest.raises(InputError, match="big.nii.gz: 5760 voxels exceeds the memory guard of 5000"):
        read_volume(path)
    assert main(["inspect", str(path)]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_singleton_fourth_dimension_is_squeezed(tmp_path, ct_phantom):
    hu, _, affine = ct_phantom(shape=(24, 20, 12))
    path = _nifti_raw(tmp_path / "x.nii.gz", hu[..., None], affine)
    vol = read_volume(path)
    assert vol.shape == hu.shape
    np.testing.assert_allclose(vol.array, hu)


@pytest.mark.parametrize(
    "name, transform, expect",
    [
        ("normalised.nii.gz", lambda hu: (hu + 1000) / 1700, "within [0, 1]"),
        ("no_intercept.nii.gz", lambda hu: hu + 1024, "> -500"),
        ("all_negative.nii.gz", lambda hu: np.minimum(hu, -100), "< 0"),
    ],
)
def test_non_hu_values_warn_and_inspect_reports(tmp_path, ct_phantom, capsys, name, transform, expect):
    hu, _, affine = ct_phantom(shape=(24, 20, 12))
    path = write_nifti(tmp_path / name, transform(hu).astype(np.float32), affine)
    with pytest.warns(VolumeWarning) as record:
        read_volume(path)
    assert len(record) == 1 and str(path) in str(record[0].message) and expect in str(record[0].message)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inspect collects warnings; none may escape
        assert main(["inspect", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    report = json.loads(captured.out)
    assert any(expect in p for p in report["problems"])
    assert report["modality"].startswith("unknown")


def test_inspect_reports_a_clean_ct(tmp_path, ct_phantom, capsys):
    hu, _, affine = ct_phantom(spacing=(1.0, 1.0, 4.0), shape=(24, 20, 12), axcodes="LPS")
    folder = write_dicom_series(tmp_path / "ct", hu, affine, patient_id="p", series_uid="1.2.3.9")
    before = _digest(folder)
    assert main(["inspect", str(folder)]) == 0
    assert _digest(folder) == before
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "dicom" and report["modality"] == "CT" and report["series_uid"] == "1.2.3.9"
    assert report["shape"] == [24, 20, 12] and report["n_slices"] == 12
    assert report["spacing"] == [1.0, 1.0, 4.0]
    assert report["hu_range"]["min"] == pytest.approx(float(np.round(hu).min()))
    assert report["hu_range"]["max"] == pytest.approx(float(np.round(hu).max()))
    assert report["hu_range"]["p1"] <= report["hu_range"]["p99"]
    assert report["problems"] == ["anisotropic voxels 1x1x4 mm (ratio > 3)"]


@pytest.mark.parametrize("kind", ["text_named_nii", "truncated_nii_gz"])
def test_console_script_bad_input(tmp_path, ct_phantom, kind):
    path = _make_bad(kind, tmp_path, *ct_phantom(shape=(24, 20, 12))[::2])
    script = Path(sys.executable).parent / "volumevlm"
    proc = subprocess.run([str(script), "inspect", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and str(path) in proc.stderr
    assert proc.stdout == ""
