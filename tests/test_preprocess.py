"""The one preprocessing definition: config/spec round trips, invariance to how the same
phantom is stored (RAS NIfTI, LPS NIfTI at another spacing, DICOM), label alignment,
pad/crop, and exact inversion back to the input geometry. Phantom data is synthetic."""

from __future__ import annotations

import json

import monai.transforms as mt
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

import volumevlm
from volumevlm.data.transforms import (
    LoadVolumed,
    PreprocessConfig,
    argmax_on_input_grid,
    build_transforms,
    invert_to_input,
    load_spec,
    map_to_input_grid,
    pipeline,
    preprocess,
    transform_specs,
)
from volumevlm.errors import InputError
from volumevlm.io import Volume, read_volume, write_dicom_series, write_nifti

SMALL = PreprocessConfig(target_spacing=(2.0, 2.0, 3.0), spatial_size=None)
GRID_LOW = np.array([-30.0, -30.0, -30.0])  # every stored phantom grid starts here (RAS)

# The same analytic phantom, sampled on differently stored grids that share their
# lowest RAS corner, so after preprocessing every output grid starts at GRID_LOW.
STORAGES = {
    "ras": dict(spacing=(1.25, 1.5, 2.5), shape=(48, 40, 24), axcodes="RAS"),
    "lps_other_spacing": dict(spacing=(1.0, 1.0, 2.0), shape=(59, 59, 29), axcodes="LPS"),
    "psl": dict(spacing=(2.5, 1.5, 1.25), shape=(24, 40, 48), axcodes="PSL"),
}


def _store(tmp_path, ct_phantom, name, dicom=False):
    hu, labels, affine = ct_phantom(**STORAGES[name])
    if dicom:
        image = write_dicom_series(tmp_path / f"{name}_dcm", hu, affine, patient_id="phantom")
    else:
        image = write_nifti(tmp_path / f"{name}.nii.gz", hu, affine, slope=1.0, intercept=-1024.0)
    label = write_nifti(tmp_path / f"{name}_label.nii.gz", labels, affine)
    return image, label, hu, labels, affine


def _centroid_mm(mask, affine):
    ijk = np.argwhere(mask).mean(axis=0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


def test_config_round_trips_and_specs_are_json():
    cfg = PreprocessConfig.from_dict({"target_spacing": [1, 1, 2], "spatial_size": None})
    assert cfg.target_spacing == (1.0, 1.0, 2.0) and cfg.spatial_size is None
    assert PreprocessConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert PreprocessConfig() == PreprocessConfig.from_dict(PreprocessConfig().to_dict())
    with pytest.raises(ValueError, match="unknown"):
        PreprocessConfig.from_dict({"spacing": [1, 1, 1]})
    with pytest.raises(ValueError):
        PreprocessConfig(hu_window=(100.0, -100.0))
    specs = transform_specs(PreprocessConfig(), label_keys=["label"])
    assert json.loads(json.dumps(specs)) == specs
    names = [s["_target_"] for s in specs]
    assert names == ["Orientationd", "Spacingd", "ScaleIntensityRanged", "ResizeWithPadOrCropd", "EnsureTyped"]
    assert specs[1]["mode"] == ["bilinear", "nearest"] and specs[2]["keys"] == ["image"]
    built = build_transforms(PreprocessConfig(), label_keys=["label"]).transforms
    assert [type(t).__name__ for t in built] == names
    assert all(isinstance(t, getattr(mt, n)) for t, n in zip(built, names))
    assert load_spec(["image"], ["label"])["_target_"] == "volumevlm.data.transforms.LoadVolumed"
    assert "ResizeWithPadOrCropd" not in [s["_target_"] for s in transform_specs(SMALL)]


def test_preprocess_output_contract(tmp_path, ct_phantom):
    image, _, hu, _, affine = _store(tmp_path, ct_phantom, "lps_other_spacing")
    out = volumevlm.preprocess(image, SMALL)
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32 and out.ndim == 4 and out.shape[0] == 1
    np.testing.assert_allclose(out.affine.numpy(), np.diag([2.0, 2.0, 3.0, 1.0]) + np.c_[np.zeros((4, 3)), [*GRID_LOW, 0]], atol=1e-6)
    assert "".join(nib.aff2axcodes(out.affine.numpy())) == "RAS"
    assert float(out.min()) == 0.0 and float(out.max()) <= 1.0
    # Window: body soft tissue (40 HU) maps to (40 + 1000) / 2000.
    centre = tuple(int(round(c)) for c in np.linalg.solve(out.affine.numpy()[:3, :3], -GRID_LOW + [0, -8, 12]))
    assert float(out[0][centre]) == pytest.approx(0.52, abs=0.01)
    # Every accepted input kind gives the same tensor.
    for x in ((hu, affine), nib.Nifti1Image(hu, affine), Volume(hu, affine), read_volume(image)):
        torch.testing.assert_close(preprocess(x, SMALL).as_tensor(), out.as_tensor(), atol=2e-3, rtol=0)


def test_default_config_pads_and_crops_with_air(tmp_path, ct_phantom):
    image, *_ = _store(tmp_path, ct_phantom, "ras")
    cfg = PreprocessConfig(target_spacing=(1.0, 1.0, 1.0), spatial_size=(40, 80, 30))
    out = preprocess(image, cfg)
    assert tuple(out.shape) == (1, 40, 80, 30)
    # Resampled size is 60 x 60 x 58 (MONAI keeps the corner-to-corner extent).
    # Y grew from 60 to 80 voxels: 10 padded air slices each side, value exactly 0.
    assert torch.all(out[0, :, :10, :] == 0) and torch.all(out[0, :, -10:, :] == 0)
    assert torch.any(out[0, :, 10, :] != 0) and torch.any(out[0, :, -11, :] != 0)
    assert float(out[0, :, 10:-10, :].max()) > 0.8  # the bone marker survived the crop
    # The affine follows the crop/pad: X lost 10 voxels at its start, Z 14, Y gained 10.
    np.testing.assert_allclose(out.affine.numpy()[:3, 3], [-20.0, -40.0, -16.0], atol=1e-5)


@pytest.mark.parametrize("other", ["lps_other_spacing", "psl", "ras_dicom", "lps_dicom"])
def test_same_phantom_preprocesses_the_same_however_stored(tmp_path, ct_phantom, other):
    reference = preprocess(_store(tmp_path, ct_phantom, "ras")[0], SMALL)
    name, dicom = (other[:-6], True) if other.endswith("_dicom") else (other, False)
    name = {"ras": "ras", "lps": "lps_other_spacing"}.get(name, name)
    out = preprocess(_store(tmp_path, ct_phantom, name, dicom=dicom)[0], SMALL)
    np.testing.assert_allclose(out.affine.numpy()[:3, 3], GRID_LOW, atol=1e-4)
    np.testing.assert_allclose(out.affine.numpy()[:3, :3], reference.affine.numpy()[:3, :3], atol=1e-6)
    common = tuple(min(a, b) for a, b in zip(reference.shape[1:], out.shape[1:]))
    a = reference[0][: common[0], : common[1], : common[2]].numpy()
    b = out[0][: common[0], : common[1], : common[2]].numpy()
    diff = np.abs(a - b)
    assert diff.mean() < 0.01 and np.percentile(diff, 99) < 0.06, (diff.mean(), np.percentile(diff, 99))
    # The asymmetric bone marker is where it belongs (a flip would move it by > 20 mm).
    for x in (a, b):
        np.testing.assert_allclose(_centroid_mm(x > 0.75, reference.affine.numpy()), [-13.0, -9.0, 12.0], atol=1.5)


@pytest.mark.parametrize("name", ["ras", "lps_other_spacing", "psl"])
def test_labels_stay_aligned_with_the_image(tmp_path, ct_phantom, name):
    image, label, *_ = _store(tmp_path, ct_phantom, name)
    sample = pipeline(SMALL, label_keys=["label"])({"image": str(image), "label": str(label)})
    img, lab = sample["image"], sample["label"]
    assert img.shape == lab.shape and torch.equal(img.affine, lab.affine)
    assert set(np.unique(lab.numpy())) == {0.0, 1.0, 2.0}  # nearest: no blended label values
    affine = img.affine.numpy()
    # Bone label vs bright image voxels, liver label vs its centre in the definition.
    np.testing.assert_allclose(_centroid_mm(lab[0].numpy() == 2, affine), _centroid_mm(img[0].numpy() > 0.75, affine), atol=1.0)
    np.testing.assert_allclose(_centroid_mm(lab[0].numpy() == 1, affine), [9.0, 4.0, -3.0], atol=1.0)
    assert sample["image"].meta["filename_or_obj"] == str(image)


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("name, dicom", [("ras", False), ("lps_other_spacing", False), ("psl", False), ("lps_other_spacing", True)])
def test_invert_to_input_restores_input_geometry(tmp_path, ct_phantom, name, dicom):
    image, label, hu, labels, affine = _store(tmp_path, ct_phantom, name, dicom=dicom)
    reference = read_volume(image)
    ref_labels = labels
    if dicom:  # the DICOM reader may store k reversed: take the label in the read geometry
        from volumevlm.io import reorient

        ref_labels, _ = reorient(labels, affine, reference.orientation)
    # 1 x 1 x 2 mm keeps the small structures' Dice above 0.95 (at 2 x 2 x 3 mm the
    # resampling itself, not the inversion, costs ~0.1); padding to 64 x 64 x 32 keeps all.
    sample = pipeline(PreprocessConfig(target_spacing=(1.0, 1.0, 2.0), spatial_size=(64, 64, 32)), label_keys=["label"])(
        {"image": str(image), "label": str(label)}
    )
    inverted = invert_to_input(sample["label"], sample["image"], reference)
    assert inverted.shape == reference.shape
    np.testing.assert_allclose(inverted.affine, reference.affine, atol=1e-9)
    assert "".join(nib.aff2axcodes(inverted.affine)) == reference.orientation
    back = np.asarray(inverted.dataobj)
    assert back.dtype == np.uint8
    for value in (1, 2):
        assert _dice(back == value, ref_labels == value) > 0.95, (value, _dice(back == value, ref_labels == value))
    assert _dice(back > 0, ref_labels > 0) > 0.95
    # A float map comes back by linear interpolation: the windowed image itself.
    windowed = np.asarray(invert_to_input(sample["image"][0], sample["image"], reference).dataobj)
    assert windowed.dtype == np.float32
    expected = np.clip((reference.array + 1000.0) / 2000.0, 0, 1)
    assert np.abs(windowed - expected).mean() < 0.01


def test_invert_identity_grid_is_exact(ct_phantom):
    hu, labels, affine = ct_phantom(spacing=(2.0, 2.0, 3.0), shape=(30, 30, 20), axcodes="LPS")
    out = preprocess((hu, affine), SMALL)
    assert tuple(out.shape[1:]) == (30, 30, 20)  # already at target spacing: orientation only
    from volumevlm.io import reorient

    ras_labels, _ = reorient(labels, affine, "RAS")
    inverted = invert_to_input(torch.from_numpy(ras_labels.astype(np.int64)), out, Volume(hu, affine))
    np.testing.assert_array_equal(np.asarray(inverted.dataobj), labels)


def _interpolated_argmax(probs, to_grid, shape):
    """The definition, by brute force: every class interpolated at every voxel."""
    import scipy.ndimage as ndi

    index = np.indices(shape).reshape(3, -1).astype(np.float64)
    coords = to_grid[:3, :3] @ index + to_grid[:3, 3:]
    values = np.stack([ndi.map_coordinates(p, coords, order=1, mode="grid-constant", cval=0.0) for p in probs])
    return np.where(values.max(0) > 0, values.argmax(0), 0).reshape(shape)


@pytest.mark.parametrize("oblique", [True, False])
def test_argmax_on_input_grid_equals_interpolating_every_class(oblique, monkeypatch):
    """Only cells that straddle a boundary are interpolated, by the convexity argument;
    the result must equal interpolating all classes everywhere, on an oblique and flipped
    map and on one whose voxels land exactly on the grid's edges, in several slabs."""
    import scipy.ndimage as ndi

    import volumevlm.data.transforms as transforms

    rng = np.random.default_rng(3)
    logits = ndi.gaussian_filter(rng.normal(size=(5, 12, 10, 8)), sigma=(0, 1.5, 1.5, 1.5)) * 8
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    to_grid = np.eye(4)
    if oblique:
        c, s = np.cos(0.3), np.sin(0.3)
        to_grid[:3, :3] = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, -1.0]]) * np.array([0.4, 0.45, 0.35])
        to_grid[:3, 3] = [-2.0, 1.0, 9.5]
        shape = (40, 35, 30)
    else:
        to_grid[:3, :3] = np.diag([0.5, 0.5, 1.0])
        to_grid[:3, 3] = [-1.0, -1.0, -1.0]
        shape = (26, 22, 10)
    monkeypatch.setattr(transforms, "_ARGMAX_CHUNK_VOXELS", 3000)
    ours = argmax_on_input_grid(probs, to_grid, shape)
    expected = _interpolated_argmax(probs, to_grid, shape)
    assert ours.dtype == np.uint8 and ours.shape == shape
    np.testing.assert_array_equal(ours, expected)
    assert len(np.unique(ours)) == 5 and (ours == 0).any()
    # Not the coarse argmax resampled nearest-neighbour: boundaries move between voxels.
    nearest = ndi.affine_transform(probs.argmax(0), to_grid[:3, :3], offset=to_grid[:3, 3], output_shape=shape,
                                   order=0, mode="constant", cval=0)
    assert (nearest != ours).mean() > 0.01


def test_invert_probabilities_needs_classes_first():
    with pytest.raises(InputError, match=r"class probabilities \[C, X, Y, Z\]"):
        map_to_input_grid(np.zeros((4, 4, 4), np.float32), np.eye(4), np.eye(4), (4, 4, 4), mode="probabilities")


def test_load_volumed_reads_in_memory_and_labels(ct_phantom):
    hu, labels, affine = ct_phantom()
    d = LoadVolumed(["image", "label"], label_keys=["label"])({"image": (hu, affine), "label": (labels, affine), "id": 7})
    assert d["id"] == 7 and tuple(d["image"].shape) == (1, *hu.shape) and d["image"].dtype == torch.float32
    np.testing.assert_allclose(d["label"].affine.numpy(), affine)
    np.testing.assert_array_equal(d["label"][0].numpy(), labels)
