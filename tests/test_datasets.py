"""Manifest datasets: exact preprocessing, label alignment, persistent-cache keys, partial cases."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import volumevlm.data.datasets as datasets_module
from volumevlm.data.datasets import PretrainDataset, SegmentationDataset, collate_cases
from volumevlm.data.manifest import read_manifest, write_manifest
from volumevlm.data.transforms import PreprocessConfig, preprocess
from volumevlm.errors import GeometryError
from volumevlm.io import write_nifti
from volumevlm.io.readers import VolumeWarning

CONFIG = PreprocessConfig(target_spacing=(3.0, 3.0, 3.0), hu_window=(-1000.0, 1000.0), spatial_size=(16, 16, 12))

# An LPS-stored volume (as DICOM-derived files are) with a bright off-centre block:
# orientation, spacing and position all have to be right for the label to line up.
AFFINE = np.array([[-2.0, 0, 0, 10.0], [0, -2.0, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])
BRIGHT = (slice(6, 12), slice(5, 10), slice(4, 9))


def _phantom(shift_hu: float = 0.0) -> np.ndarray:
    """[24, 20, 16] HU: air, a soft-tissue body (0 HU) and a bright block (300 HU)."""
    hu = np.full((24, 20, 16), -1000.0, np.float32)
    hu[4:20, 3:17, 2:14] = 0.0
    hu[BRIGHT] = 300.0
    return hu + np.float32(shift_hu)


@pytest.fixture()
def case(tmp_path) -> dict:
    image = write_nifti(tmp_path / "img" / "c1.nii.gz", _phantom(), AFFINE)
    label = np.zeros((24, 20, 16), np.uint8)
    label[BRIGHT] = 1
    label_path = write_nifti(tmp_path / "lab" / "c1.nii.gz", label, AFFINE)
    return {"id": "c1", "image": str(image), "label": str(label_path), "report": "FINDINGS: bright block.",
            "icd10": ["K76.0"], "phecodes": ["571.5"], "findings": {"liver_lesion": 1}}


def _reference(path, config=CONFIG) -> torch.Tensor:
    return preprocess(path, config).as_tensor()


def test_items_equal_preprocess_of_the_same_file(case, tmp_path):
    for cache_dir in (None, tmp_path / "cache", tmp_path / "cache"):  # no cache, cache miss, cache hit
        item = PretrainDataset([case], CONFIG, cache_dir=cache_dir)[0]
        assert item["image"].shape == (1, 16, 16, 12)
        assert item["image"].dtype == torch.float32
        assert torch.equal(item["image"], _reference(case["image"]))
    assert item["report"] == "FINDINGS: bright block."
    assert item["icd10"] == ["K76.0"] and item["phecodes"] == ["571.5"]
    assert item["findings"] == {"liver_lesion": 1}
    assert item["has_report"] and item["has_codes"] and item["id"] == "c1"


def test_cache_is_really_used(case, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = PretrainDataset([case], CONFIG, cache_dir=cache)[0]["image"]
    entries = list(cache.rglob("*.pt"))
    assert len(entries) == 1

    def no_reading(*args, **kwargs):
        raise AssertionError("the cache should have served this case")

    monkeypatch.setattr(datasets_module, "read_volume", no_reading)
    again = PretrainDataset([case], CONFIG, cache_dir=cache)[0]["image"]
    assert torch.equal(first, again)
    assert list(cache.rglob("*.pt")) == entries


def test_config_change_never_serves_stale_cache(case, tmp_path):
    cache = tmp_path / "cache"
    narrow = PreprocessConfig(target_spacing=(3.0, 3.0, 3.0), hu_window=(-200.0, 400.0), spatial_size=(16, 16, 12))
    coarse = PreprocessConfig(target_spacing=(4.0, 4.0, 4.0), hu_window=(-1000.0, 1000.0), spatial_size=(12, 12, 10))
    a = PretrainDataset([case], CONFIG, cache_dir=cache)[0]["image"]
    b = PretrainDataset([case], narrow, cache_dir=cache)[0]["image"]
    c = PretrainDataset([case], coarse, cache_dir=cache)[0]["image"]
    assert torch.equal(b, _reference(case["image"], narrow))
    assert torch.equal(c, _reference(case["image"], coarse))
    assert not torch.equal(a, b)
    assert c.shape == (1, 12, 12, 10)
    assert len({p.parent for p in cache.rglob("*.pt")}) == 3  # one cache folder per preprocessing


def test_changed_input_file_is_not_served_from_cache(case, tmp_path):
    cache = tmp_path / "cache"
    before = PretrainDataset([case], CONFIG, cache_dir=cache)[0]["image"]
    stat = os.stat(case["image"])
    write_nifti(case["image"], _phantom(shift_hu=200.0), AFFINE)
    os.utime(case["image"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # coarse clocks: force a new mtime
    after = PretrainDataset([case], CONFIG, cache_dir=cache)[0]["image"]
    assert not torch.equal(before, after)
    assert torch.equal(after, _reference(case["image"]))


def test_label_aligns_with_bright_structure(case, tmp_path):
    for cache_dir in (None, tmp_path / "cache"):
        item = SegmentationDataset([case], CONFIG, cache_dir=cache_dir)[0]
        image, label = item["image"], item["label"]
        assert label.dtype == torch.int64 and label.shape == image.shape == (1, 16, 16, 12)
        assert set(torch.unique(label).tolist()) == {0, 1}
        # Bright block: 300 HU -> 0.65 after the window; tissue 0 HU -> 0.5. Half-way = 0.575.
        bright = image > 0.575
        inside = label == 1
        iou = (bright & inside).sum().item() / (bright | inside).sum().item()
        assert iou >= 0.9, iou  # a label flipped along any axis scores below 0.3
        assert image[inside].mean().item() > 0.6
        assert image[~inside].max().item() <= 0.65
        # Volume is preserved: 6x5x5 voxels of 2x2x2.5 mm = 1500 mm^3 = ~55.6 voxels of 27 mm^3.
        assert 40 <= inside.sum().item() <= 75


def test_label_on_a_different_grid_raises_naming_the_label(case, tmp_path):
    shifted = AFFINE.copy()
    shifted[:3, 3] += 5.0  # same shape, moved 5 mm: resampling alone would hide it
    label = np.zeros((24, 20, 16), np.uint8)
    label[BRIGHT] = 1
    bad = write_nifti(tmp_path / "lab" / "moved.nii.gz", label, shifted)
    with pytest.raises(GeometryError, match=r"moved\.nii\.gz: label affine differs"):
        SegmentationDataset([dict(case, label=str(bad))], CONFIG)[0]


def test_missing_report_and_codes_still_yield_items(case, tmp_path):
    bare = {"id": "c2", "image": case["image"]}
    empty = {"id": "c3", "image": case["image"], "report": "  ", "icd10": [], "phecodes": None, "findings": None}
    ds = PretrainDataset([case, bare, empty], CONFIG)
    for item in (ds[1], ds[2]):
        assert item["report"] is None and item["icd10"] == [] and item["phecodes"] == []
        assert item["findings"] is None
        assert not item["has_report"] and not item["has_codes"]
        assert torch.equal(item["image"], ds[0]["image"])
    batch = collate_cases([ds[0], ds[1], ds[2]])
    assert batch["image"].shape == (3, 1, 16, 16, 12)
    assert batch["has_report"].tolist() == [True, False, False]
    assert batch["report"] == ["FINDINGS: bright block.", None, None]
    assert batch["icd10"] == [["K76.0"], [], []]


def test_segmentation_skips_unlabelled_rows(case, caplog):
    ds = SegmentationDataset([case, {"id": "u", "image": case["image"]}], CONFIG)
    assert len(ds) == 1 and ds[0]["id"] == "c1"
    assert "1 of 2 cases have no label" in caplog.text


def test_dataset_reads_a_manifest_file(case, tmp_path):
    manifest = write_manifest(tmp_path / "manifest.jsonl", [case])
    ds = PretrainDataset(read_manifest(manifest), CONFIG)
    assert torch.equal(ds[0]["image"], PretrainDataset(str(manifest), CONFIG)[0]["image"])


def test_rescale_and_spacing_override_from_the_row(tmp_path):
    """A CT-RATE-like file: raw stored values (HU + 1024) and a wrong header spacing."""
    truth = write_nifti(tmp_path / "truth.nii.gz", _phantom(), AFFINE)
    wrong_affine = AFFINE.copy()
    wrong_affine[:3, :3] = np.diag([-1.0, -1.0, 1.0])  # header says 1 mm; really 2 x 2 x 2.5 mm
    raw = write_nifti(tmp_path / "raw.nii.gz", _phantom() + 1024.0, wrong_affine, dtype=np.int16)
    row = {"id": "r", "image": str(raw), "rescale": {"slope": 1.0, "intercept": -1024.0},
           "spacing_override": [2.0, 2.0, 2.5]}
    for cache_dir in (None, tmp_path / "cache"):
        item = PretrainDataset([row], CONFIG, cache_dir=cache_dir)[0]
        assert torch.equal(item["image"], _reference(truth))
    with pytest.warns(VolumeWarning, match="not Hounsfield units"):  # the reader flags raw values
        without = PretrainDataset([{"id": "r", "image": str(raw)}], CONFIG, cache_dir=tmp_path / "cache")[0]
    assert not torch.equal(without["image"], item["image"])  # overrides are part of the cache key


def test_edited_preprocessing_code_gets_a_new_cache(monkeypatch):
    before = datasets_module.config_fingerprint(CONFIG, "pretrain")
    assert before == datasets_module.config_fingerprint(CONFIG, "pretrain")
    monkeypatch.setattr(datasets_module, "_code_fingerprint", lambda: "edited reader")
    assert datasets_module.config_fingerprint(CONFIG, "pretrain") != before


def test_synthetic_cohort_manifest_end_to_end(tmp_path):
    """The synthetic (not clinical) cohort's own manifest, NIfTI and DICOM cases alike."""
    from volumevlm.data.synthetic.cohort import generate_cohort

    generate_cohort(tmp_path / "cohort", 3, seed=3, shape=(32, 32, 16), dicom_fraction=0.5, workers=1, progress=False)
    manifest = read_manifest(tmp_path / "cohort" / "manifest.jsonl")
    assert len(manifest) == 3 and manifest.missing == []
    assert any(Path(row["image"]).is_dir() for row in manifest.rows)  # a DICOM series folder
    config = PreprocessConfig(target_spacing=(8.0, 8.0, 10.0), spatial_size=(32, 32, 32))
    pretrain = PretrainDataset(manifest, config, cache_dir=tmp_path / "cache")
    seg = SegmentationDataset(manifest, config, cache_dir=tmp_path / "cache")
    for index, row in enumerate(manifest.rows):
        item = pretrain[index]
        assert torch.equal(item["image"], _reference(row["image"], config))
        assert item["report"] == row["report"] and item["icd10"] == row["icd10"]
        sample = seg[index]
        assert torch.equal(sample["image"], item["image"])
        liver, lung = sample["label"] == 1, sample["label"] == 11  # indices of volumevlm.data.labels
        # Liver is soft tissue (window value near 0.5); lung is mostly air (near 0.1).
        assert sample["image"][liver].mean() > 0.45 and sample["image"][lung].mean() < 0.3


def test_spacing_override_moves_image_and_label_together(tmp_path):
    wrong_affine = AFFINE.copy()
    wrong_affine[:3, :3] = np.diag([-1.0, -1.0, 1.0])
    image = write_nifti(tmp_path / "raw.nii.gz", _phantom(), wrong_affine)
    label = np.zeros((24, 20, 16), np.uint8)
    label[BRIGHT] = 1
    label_path = write_nifti(tmp_path / "raw_label.nii.gz", label, wrong_affine)
    row = {"id": "r", "image": str(image), "label": str(label_path), "spacing_override": [2.0, 2.0, 2.5]}
    item = SegmentationDataset([row], CONFIG)[0]
    truth_image = write_nifti(tmp_path / "truth.nii.gz", _phantom(), AFFINE)
    truth_label = write_nifti(tmp_path / "truth_label.nii.gz", label, AFFINE)
    truth = SegmentationDataset([{"id": "t", "image": str(truth_image), "label": str(truth_label)}], CONFIG)[0]
    assert torch.equal(item["image"], truth["image"]) and torch.equal(item["label"], truth["label"])
