"""Readers and writers: geometry round trips (NIfTI, DICOM, zip, NRRD, MHA), reorient,
geometry checks, in-memory inputs, atomic writes. Phantom data is synthetic."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

from ct_files import rotation_z
from volumevlm.errors import GeometryError, InputError
from volumevlm.io import (
    LPS_TO_RAS,
    Volume,
    VolumeWarning,
    as_volume,
    check_same_geometry,
    read_volume,
    reorient,
    write_dicom_series,
    write_nifti,
)

AFFINES = {
    "RAS": np.array([[1.25, 0, 0, -30], [0, 1.5, 0, -30], [0, 0, 2.5, -30], [0, 0, 0, 1.0]]),
    "LPS": np.array([[-0.9, 0, 0, 20], [0, -1.1, 0, 25], [0, 0, 2.0, -40], [0, 0, 0, 1.0]]),
    "PSL": np.array([[0, 0, -2.5, 10], [-0.8, 0, 0, 20], [0, 1.2, 0, -30], [0, 0, 0, 1.0]]),
    "LAI": np.array([[-1.0, 0, 0, 5], [0, 1.0, 0, -7], [0, 0, -3.0, 30], [0, 0, 0, 1.0]]),
    "oblique": rotation_z(30) @ np.array([[1.0, 0, 0, -20], [0, 1.2, 0, -25], [0, 0, 2.0, -30], [0, 0, 0, 1.0]]),
}


def _no_temp_left(folder):
    return [p for p in os.listdir(folder) if ".tmp" in p or ".old-" in p]


@pytest.mark.parametrize("name", list(AFFINES))
def test_nifti_round_trip_float_scaled_and_label(tmp_path, ct_phantom, name):
    hu, labels, affine = ct_phantom(affine=AFFINES[name])
    for path, kwargs, atol in (
        (tmp_path / "f.nii.gz", {}, 0.0),
        (tmp_path / "s.nii.gz", {"slope": 0.5, "intercept": -1024.0}, 0.25 + 1e-4),
        (tmp_path / "u.nii", {"slope": 1.0, "intercept": -1024.0}, 0.5 + 1e-4),
    ):
        write_nifti(path, hu, affine, **kwargs)
        vol = read_volume(path)
        assert vol.array.dtype == np.float32 and vol.shape == hu.shape
        np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
        assert np.abs(vol.array - hu).max() <= atol
        raw = nib.load(path)
        assert int(raw.header["qform_code"]) == 1 and int(raw.header["sform_code"]) == 1
        if kwargs:
            assert raw.get_data_dtype() == np.int16
            assert raw.dataobj.slope == kwargs["slope"] and raw.dataobj.inter == kwargs["intercept"]
    write_nifti(tmp_path / "l.nii.gz", labels, affine)
    lab = read_volume(tmp_path / "l.nii.gz", kind="label")
    assert lab.array.dtype.kind in "iu" and np.array_equal(lab.array, labels)
    assert not _no_temp_left(tmp_path)


@pytest.mark.parametrize("name", list(AFFINES))
def test_dicom_round_trip_any_orientation(tmp_path, ct_phantom, name):
    hu, _, affine = ct_phantom(affine=AFFINES[name])
    folder = write_dicom_series(tmp_path / "series", hu, affine, patient_id="phantom-1",
                                study_uid="1.2.826.0.1.3680043.10.1", series_uid="1.2.826.0.1.3680043.10.1.2")
    assert len(os.listdir(folder)) == hu.shape[2]
    vol = read_volume(folder)
    assert vol.meta["format"] == "dicom" and vol.meta["modality"] == "CT"
    # The reader sorts slices along the slice normal, which may reverse k: compare in
    # the written orientation.
    array, back = reorient(vol.array, vol.affine, "".join(nib.aff2axcodes(affine)))
    np.testing.assert_allclose(back, affine, atol=1e-4)
    np.testing.assert_array_equal(array, np.round(hu))
    ds = pydicom.dcmread(folder / sorted(os.listdir(folder))[0])
    assert ds.Modality == "CT" and float(ds.RescaleIntercept) == -1024.0 and float(ds.RescaleSlope) == 1.0
    assert ds.PatientID == "phantom-1" and ds.SeriesInstanceUID == "1.2.826.0.1.3680043.10.1.2"
    assert not _no_temp_left(tmp_path)


def test_dicom_uids_are_deterministic_and_zip_reads(tmp_path, ct_phantom, monkeypatch):
    hu, _, affine = ct_phantom()
    uids = {"study_uid": "1.2.3.4", "series_uid": "1.2.3.4.5"}
    a = write_dicom_series(tmp_path / "a", hu, affine, patient_id="p", **uids)
    b = write_dicom_series(tmp_path / "b", hu, affine, patient_id="p", **uids)
    sop = [[pydicom.dcmread(f / n).SOPInstanceUID for n in sorted(os.listdir(f))] for f in (a, b)]
    assert sop[0] == sop[1] and len(set(sop[0])) == hu.shape[2]
    # Overwriting an existing series replaces it atomically and leaves nothing behind.
    write_dicom_series(a, hu + 10, affine, patient_id="p", **uids)
    assert np.allclose(read_volume(a).array, np.round(hu + 10))
    assert not _no_temp_left(tmp_path)
    archive = shutil.make_archive(str(tmp_path / "series"), "zip", root_dir=tmp_path, base_dir="b")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    vol = read_volume(archive)
    assert os.listdir(scratch) == []  # the private extraction folder is gone
    assert vol.meta["container"] == "zip" and vol.meta["dtype"] == "int16"
    np.testing.assert_array_equal(vol.array, read_volume(b).array)
    np.testing.assert_allclose(vol.affine, read_volume(b).affine)


def test_dicom_folder_reads_its_ct_series_says_what_it_skipped_and_asks_among_several(tmp_path, ct_phantom):
    hu, _, affine = ct_phantom()
    write_dicom_series(tmp_path / "study" / "ct", hu, affine, patient_id="p", series_uid="1.2.3.1", study_uid="1.2.3")
    big = np.concatenate([hu, hu], axis=2)
    mr = write_dicom_series(tmp_path / "study" / "mr", big, affine, patient_id="p", series_uid="1.2.3.3", study_uid="1.2.3")
    for name in os.listdir(mr):  # a larger series that is not CT must not win
        ds = pydicom.dcmread(mr / name)
        ds.Modality = "MR"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        ds.save_as(mr / name)
    with pytest.warns(VolumeWarning, match=r"reading CT series 1\.2\.3\.1 .*skipped 1 other series: MR Image Storage"):
        vol = read_volume(tmp_path / "study")
    assert vol.meta["series_uid"] == "1.2.3.1" and vol.shape == hu.shape and vol.meta["n_series"] == 2
    # A second CT series: the reader asks which one rather than guessing.
    write_dicom_series(tmp_path / "study" / "small", hu[:, :, :6], affine, patient_id="p", series_uid="1.2.3.2", study_uid="1.2.3")
    with pytest.raises(InputError, match=r"2 CT series \(1\.2\.3\.1 .*1\.2\.3\.2 .*pass the folder of one series") as err:
        read_volume(tmp_path / "study")
    assert "\n" not in str(err.value)
    with pytest.warns(VolumeWarning, match="skipped 2 other series"):
        small = read_volume(tmp_path / "study", series="1.2.3.2")
    assert small.shape == (*hu.shape[:2], 6)
    with pytest.raises(InputError, match="MR Image Storage"):
        read_volume(tmp_path / "study", series="1.2.3.3")


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_formats_round_trip(tmp_path, ct_phantom, suffix):
    hu, _, affine = ct_phantom(affine=AFFINES["PSL"])
    lps = LPS_TO_RAS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.transpose(hu, (2, 1, 0)))
    image.SetSpacing(tuple(spacing))
    image.SetDirection(tuple((lps[:3, :3] / spacing).ravel()))
    image.SetOrigin(tuple(lps[:3, 3]))
    sitk.WriteImage(image, str(tmp_path / f"x{suffix}"))
    vol = read_volume(tmp_path / f"x{suffix}")
    np.testing.assert_allclose(vol.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(vol.array, hu)
    assert vol.orientation == "PSL"


def test_reorient_is_exact_and_preserves_world_positions(ct_phantom):
    hu, _, affine = ct_phantom(affine=AFFINES["PSL"])
    out, out_affine = reorient(hu, affine, "LPS")
    assert "".join(nib.aff2axcodes(out_affine)) == "LPS"
    # The brightest voxel (bone marker centre) sits at the same world point.
    world = [a[:3, :3] @ np.unravel_index(np.argmax(x), x.shape) + a[:3, 3] for x, a in ((hu, affine), (out, out_affine))]
    np.testing.assert_allclose(world[0], world[1])
    back, back_affine = reorient(out, out_affine, "PSL")
    np.testing.assert_array_equal(back, hu)
    np.testing.assert_allclose(back_affine, affine)


def test_check_same_geometry(ct_phantom):
    hu, labels, affine = ct_phantom()
    image = Volume(hu, affine, "img.nii.gz")
    check_same_geometry(image, Volume(labels, affine + 1e-5, "lab.nii.gz"))
    shifted = affine.copy()
    shifted[0, 3] += 2.0
    with pytest.raises(GeometryError, match="lab.nii.gz"):
        check_same_geometry(image, Volume(labels, shifted, "lab.nii.gz"))
    with pytest.raises(GeometryError, match="shape"):
        check_same_geometry(image, Volume(labels[:-1], affine, "lab.nii.gz"))


def test_as_volume_in_memory_inputs_are_not_modified(tmp_path, ct_phantom):
    hu, _, affine = ct_phantom(affine=AFFINES["LPS"])
    before = hu.copy()
    from_tuple = as_volume((hu, affine))
    from_nib = as_volume(nib.Nifti1Image(hu, affine))
    from_meta = as_volume(MetaTensor(torch.from_numpy(hu)[None], affine=torch.as_tensor(affine)))
    for vol in (from_tuple, from_nib, from_meta):
        np.testing.assert_array_equal(vol.array, hu)
        np.testing.assert_allclose(vol.affine, affine)
        assert not np.shares_memory(vol.array, hu)
    from_tuple.array[:] = 0  # a consumer scribbling on the Volume leaves the caller's array alone
    np.testing.assert_array_equal(hu, before)
    assert as_volume(from_nib) is from_nib
    with pytest.warns(VolumeWarning, match="no affine"):
        plain = as_volume(torch.from_numpy(hu))
    np.testing.assert_allclose(plain.affine, np.eye(4))
    with pytest.raises(InputError, match="no geometry"):
        as_volume(hu)
    write_nifti(tmp_path / "p.nii.gz", hu, affine)
    assert as_volume(str(tmp_path / "p.nii.gz")).source == str(tmp_path / "p.nii.gz")


def test_failed_writes_leave_nothing(tmp_path, ct_phantom):
    hu, _, affine = ct_phantom()
    bad = hu.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        write_dicom_series(tmp_path / "s", bad, affine, patient_id="p")
    with pytest.raises(InputError, match="do not fit"):
        write_nifti(tmp_path / "x.nii.gz", hu * 100, affine, slope=1.0, intercept=0.0)
    sheared = affine.copy()
    sheared[0, 1] = 0.7
    with pytest.raises(InputError, match="orthogonal"):
        write_dicom_series(tmp_path / "s", hu, sheared, patient_id="p")
    assert os.listdir(tmp_path) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean CT phantom raises no warning
        read_volume(write_nifti(tmp_path / "ok.nii.gz", hu, affine))
