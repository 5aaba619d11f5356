"""Dataset-layout adapters on tiny fabricated copies of each layout (real file and column names)."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from volumevlm.data.adapters import (
    CT_RATE_FINDINGS,
    adapt,
    add_arguments,
    ct_rate_rows,
    merge_structure_masks,
    merlin_rows,
    parse_codes,
    read_table,
    run,
)
from volumevlm.data.datasets import PretrainDataset, SegmentationDataset
from volumevlm.data.labels import LABEL_INDEX
from volumevlm.data.manifest import read_manifest
from volumevlm.data.transforms import PreprocessConfig, preprocess
from volumevlm.errors import GeometryError, InputError, VolumeVLMError
from volumevlm.io import write_nifti

SMALL = PreprocessConfig(target_spacing=(2.0, 2.0, 3.0), spatial_size=(12, 12, 8))


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _ct(shape=(16, 14, 10), value_shift=0.0) -> np.ndarray:
    """HU: air with a 0 HU body and a 400 HU block; the first k-slice is all air."""
    hu = np.full(shape, -1000.0, np.float32)
    hu[3:-3, 3:-3, 1:] = 0.0
    hu[5:9, 4:8, 3:6] = 400.0
    return hu + np.float32(value_shift)


def _write_csv(path: Path, header: list[str], rows: list[list], delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _write_xlsx(path: Path, grid: list[list]) -> Path:
    """A workbook as spreadsheet programs write it (openpyxl), first sheet holding ``grid``."""
    import openpyxl

    book = openpyxl.Workbook()
    for row in grid:
        book.active.append([None if value == "" else value for value in row])
    book.save(path)
    return path


def test_read_table_csv_semicolons_and_xlsx(tmp_path):
    semi = _write_csv(tmp_path / "meta.csv", ["image_id", "age", "gender"], [["s0000", "65", "m"]], delimiter=";")
    assert read_table(semi) == [{"image_id": "s0000", "age": "65", "gender": "m"}]
    book = _write_xlsx(
        tmp_path / "t.xlsx",
        [["study id", "Findings", "phecode"], [1001, "Liver, spleen & kidneys <normal>.", 250.19999999999999], [1002, "", 8.0]],
    )
    assert read_table(book) == [
        {"study id": "1001", "Findings": "Liver, spleen & kidneys <normal>.", "phecode": "250.2"},
        {"study id": "1002", "Findings": "", "phecode": "8"},
    ]
    with pytest.raises(InputError, match=r"bad\.xlsx: unreadable table"):
        read_table(_write_csv(tmp_path / "bad.xlsx", ["not", "a", "zip"], []))


@pytest.mark.parametrize(
    "cell, codes",
    [
        ("K76.0;N28.1", ["K76.0", "N28.1"]),
        ("['571.5', '250.2']", ["571.5", "250.2"]),
        ("K76.0, N28.1 | E11.9", ["K76.0", "N28.1", "E11.9"]),
        ("", []),
        ("nan", []),
        (["R16.0", "R16.0"], ["R16.0"]),
        ("[571.5, 250.0]", ["571.5", "250"]),
        ([8.0, 250.25, "K76.0"], ["8", "250.25", "K76.0"]),
    ],
    ids=["semicolons", "list-literal", "mixed-separators", "empty", "nan", "list-dedup", "numbers-literal", "numbers-list"],
)
def test_parse_codes(cell, codes):
    assert parse_codes(cell) == codes


# --------------------------------------------------------------------------- Merlin


@pytest.fixture()
def merlin_root(tmp_path) -> Path:
    root = tmp_path / "merlin_release"
    for study in ("1001", "1002", "1003"):
        write_nifti(root / "merlin_data" / f"{study}.nii.gz", _ct(), np.diag([1.5, 1.5, 3.0, 1.0]))
    _write_xlsx(
        root / "reports_final.xlsx",
        [
            ["Study ID", "Findings", "Impressions", "Phecode"],
            [1001, "Liver is enlarged.", "Hepatomegaly.", ""],
            [1002, "Normal abdomen.", "", 250.19999999999999],
            [9999, "A report whose volume is not in the release.", "", ""],
        ],
    )
    _write_csv(
        root / "ehr" / "icd_codes.csv",
        ["study_id", "ICD10_codes", "phecodes"],
        [["1001", "K76.0;N28.1", "['571.5', '250.2']"], ["1001", "E11.9", ""], ["1003", "R16.0", ""]],
    )
    return root


def test_merlin_rows_join_volumes_reports_and_codes(merlin_root):
    before = _tree_hashes(merlin_root)
    rows = {row["id"]: row for row in merlin_rows(merlin_root)}
    assert _tree_hashes(merlin_root) == before
    assert sorted(rows) == ["1001", "1002", "1003"]  # 9999 has no volume
    assert rows["1001"]["image"] == str(merlin_root / "merlin_data" / "1001.nii.gz")
    assert rows["1001"]["report"] == "FINDINGS: Liver is enlarged.\n\nIMPRESSION: Hepatomegaly."
    assert rows["1001"]["icd10"] == ["K76.0", "N28.1", "E11.9"]  # long-format rows are united
    assert rows["1001"]["phecodes"] == ["571.5", "250.2"]
    assert rows["1002"] == {
        "id": "1002", "image": str(merlin_root / "merlin_data" / "1002.nii.gz"),
        "report": "FINDINGS: Normal abdomen.", "phecodes": ["250.2"],
    }
    assert rows["1003"] == {"id": "1003", "image": str(merlin_root / "merlin_data" / "1003.nii.gz"), "icd10": ["R16.0"]}


def test_merlin_explicit_columns_and_tables(merlin_root, tmp_path):
    write_nifti(merlin_root / "merlin_data" / "0012.nii.gz", _ct(), np.diag([1.5, 1.5, 3.0, 1.0]))
    table = _write_csv(
        tmp_path / "mine.csv",
        ["Accession", "Body", "Dx", "ICD10"],
        [["1002.0", "Whole report text.", "K80.20", "X00"], ["0012", "Padded id.", "", ""]],
    )
    columns = {"id": "Accession", "report": "Body", "icd10": "Dx"}
    rows = {r["id"]: r for r in merlin_rows(merlin_root, tables=[table], columns=columns)}
    assert rows["1002"]["report"] == "Whole report text."  # "1002.0" from a spreadsheet names 1002
    assert rows["1002"]["icd10"] == ["K80.20"]  # the named column, not the usual "ICD10"
    assert rows["0012"]["report"] == "Padded id."  # zero-padded ids stay as written
    assert "report" not in rows["1001"]
    # A named column that is absent is an error, even when a usual name is present.
    with pytest.raises(InputError, match=r"mine\.csv: no column 'Codes'"):
        merlin_rows(merlin_root, tables=[table], columns={"id": "Accession", "icd10": "Codes"})


def test_adapt_merlin_writes_a_readable_manifest(merlin_root, tmp_path):
    out = adapt("Merlin", merlin_root, tmp_path / "out" / "merlin.jsonl")
    manifest = read_manifest(out)
    assert manifest.ids == ["1001", "1002", "1003"] and manifest.missing == []
    item = PretrainDataset(manifest, SMALL)[2]
    assert item["report"] is None and item["icd10"] == ["R16.0"] and item["has_codes"]
    assert torch.equal(item["image"], preprocess(merlin_root / "merlin_data" / "1003.nii.gz", SMALL).as_tensor())
    with pytest.raises(InputError, match="inside the input dataset"):
        adapt("merlin", merlin_root, merlin_root / "manifest.jsonl")
    with pytest.raises(VolumeVLMError, match="unknown dataset layout 'mimic'"):
        adapt("mimic", merlin_root, tmp_path / "x.jsonl")


# --------------------------------------------------------------------------- CT-RATE

# Header spacing CT-RATE files carry (wrong) vs the true spacing from the metadata CSV.
HEADER_AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])
TRUE_SPACING = (0.7, 0.8, 2.0)  # i, j, k; metadata XYSpacing "[0.8, 0.7]" is [rows (j), columns (i)]


def _ct_rate_volume(base: Path, split_folder: str, name: str, *, raw: bool) -> Path:
    parts = name.split("_")
    path = base / split_folder / "_".join(parts[:2]) / "_".join(parts[:3]) / f"{name}.nii.gz"
    values = _ct(value_shift=1024.0) if raw else _ct()  # raw: stored = HU + 1024, no header scaling
    return write_nifti(path, values, HEADER_AFFINE, dtype=np.int16)


@pytest.fixture()
def ct_rate_root(tmp_path) -> Path:
    root = tmp_path / "CT-RATE"
    base = root / "dataset"
    _ct_rate_volume(base, "train", "train_1_a_1", raw=True)
    _ct_rate_volume(base, "train", "train_1_a_2", raw=False)  # a volume already stored in HU
    _ct_rate_volume(base, "train", "train_2_a_1", raw=True)  # no report, no labels, no metadata
    _ct_rate_volume(base, "valid", "valid_1_a_1", raw=True)
    report_header = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
    _write_csv(base / "radiology_text_reports" / "train_reports.csv", report_header, [
        ["train_1_a_1.nii.gz", "Cough, fever.", "Non-contrast chest CT.", "A nodule, 6 mm, in the right upper lobe.", "Lung nodule."],
        ["train_1_a_2.nii.gz", "", "", "No abnormality.", ""],
    ])
    _write_csv(base / "radiology_text_reports" / "validation_reports.csv", report_header, [
        ["valid_1_a_1.nii.gz", "Dyspnea.", "Chest CT.", "Bilateral pleural effusion.", "Pleural effusion."],
    ])
    flags = {"train_1_a_1.nii.gz": {"Lung nodule"}, "train_1_a_2.nii.gz": set(), "valid_1_a_1.nii.gz": {"Pleural effusion", "Cardiomegaly"}}
    _write_csv(
        base / "multi_abnormality_labels" / "train_predicted_labels.csv",
        ["VolumeName", *CT_RATE_FINDINGS],
        [[name, *(int(f in on) for f in CT_RATE_FINDINGS)] for name, on in flags.items()],
    )
    meta_header = ["VolumeName", "Manufacturer", "PatientSex", "PatientAge", "XYSpacing", "ZSpacing",
                   "RescaleSlope", "RescaleIntercept", "Rows"]
    _write_csv(base / "metadata" / "train_metadata.csv", meta_header, [
        [name, "SIEMENS", sex, age, "[0.8, 0.7]", "2.0", "1", "-1024", "16"]
        for name, sex, age in (
            ("train_1_a_1.nii.gz", "M", "065Y"), ("train_1_a_2.nii.gz", "F", "070Y"), ("valid_1_a_1.nii.gz", "F", "048Y")
        )
    ])
    return root


def test_ct_rate_rows(ct_rate_root):
    before = _tree_hashes(ct_rate_root)
    rows = {row["id"]: row for row in ct_rate_rows(ct_rate_root)}
    assert _tree_hashes(ct_rate_root) == before
    assert sorted(rows) == ["train_1_a_1", "train_1_a_2", "train_2_a_1", "valid_1_a_1"]
    assert [rows[k]["split"] for k in sorted(rows)] == ["train", "train", "train", "val"]
    first = rows["train_1_a_1"]
    assert first["image"].endswith("dataset/train/train_1/train_1_a/train_1_a_1.nii.gz")
    assert first["report"] == (
        "CLINICAL INFORMATION: Cough, fever.\n\nTECHNIQUE: Non-contrast chest CT.\n\n"
        "FINDINGS: A nodule, 6 mm, in the right upper lobe.\n\nIMPRESSION: Lung nodule."
    )
    assert len(first["findings"]) == 18
    assert {k for k, v in first["findings"].items() if v} == {"lung_nodule"}
    assert {k for k, v in rows["valid_1_a_1"]["findings"].items() if v} == {"pleural_effusion", "cardiomegaly"}
    assert first["spacing_override"] == list(TRUE_SPACING)
    assert first["rescale"] == {"slope": 1.0, "intercept": -1024.0}
    assert first["age"] == 65 and first["sex"] == "M"
    # Already in HU (air at -1000 in its first slice): the spacing is fixed, the values left alone.
    assert rows["train_1_a_2"]["spacing_override"] == list(TRUE_SPACING)
    assert "rescale" not in rows["train_1_a_2"]
    assert rows["train_1_a_2"]["report"] == "FINDINGS: No abnormality."
    assert rows["train_2_a_1"] == {"id": "train_2_a_1", "image": rows["train_2_a_1"]["image"], "split": "train"}
    # Without the peek, the metadata's rescale is recorded as CT-RATE documents it.
    assert ct_rate_rows(ct_rate_root, check_stored_values=False)[1]["rescale"] == {"slope": 1.0, "intercept": -1024.0}


def test_ct_rate_overrides_make_the_true_volume(ct_rate_root, tmp_path):
    """Through the manifest and the dataset, a raw CT-RATE file becomes exactly the
    volume with true HU and true spacing."""
    truth = write_nifti(tmp_path / "truth.nii.gz", _ct(), np.diag([*TRUE_SPACING, 1.0]))
    manifest = read_manifest(adapt("ct-rate", ct_rate_root, tmp_path / "ctrate.jsonl"))
    dataset = PretrainDataset(manifest, SMALL, cache_dir=tmp_path / "cache")
    expected = preprocess(truth, SMALL).as_tensor()
    for index in (manifest.ids.index("train_1_a_1"), manifest.ids.index("train_1_a_2")):
        assert torch.equal(dataset[index]["image"], expected)


# --------------------------------------------------------------------------- TotalSegmentator

TS_AFFINE = np.array([[-1.5, 0, 0, 40.0], [0, -1.5, 0, 30.0], [0, 0, 2.0, -80.0], [0, 0, 0, 1]])
TS_SHAPE = (20, 18, 16)


def _box(*slices) -> np.ndarray:
    mask = np.zeros(TS_SHAPE, np.uint8)
    mask[tuple(slices)] = 1
    return mask


TS_MASKS = {
    "liver": _box(slice(2, 12), slice(2, 12), slice(2, 10)),
    "gallbladder": _box(slice(9, 14), slice(9, 13), slice(6, 9)),  # overlaps the liver's corner
    "vertebrae_L1": _box(slice(8, 12), slice(13, 17), slice(2, 8)),
    "vertebrae_L2": _box(slice(8, 12), slice(13, 17), slice(6, 13)),  # overlaps L1: same label
    "lung_upper_lobe_left": _box(slice(14, 19), slice(2, 8), slice(10, 16)),
    "lung_lower_lobe_left": _box(slice(14, 19), slice(2, 8), slice(4, 10)),
    "kidney_cyst_left": _box(slice(0, 3), slice(0, 3), slice(0, 3)),  # not one of our labels
    "spleen": np.zeros(TS_SHAPE, np.uint8),  # empty mask: nothing to paint
}


def _ts_case(root: Path, case: str, masks: dict[str, np.ndarray], mask_affine=TS_AFFINE) -> Path:
    hu = np.full(TS_SHAPE, -1000.0, np.float32)
    for mask in masks.values():
        hu[mask > 0] = 60.0
    write_nifti(root / case / "ct.nii.gz", hu, TS_AFFINE)
    for name, mask in masks.items():
        write_nifti(root / case / "segmentations" / f"{name}.nii.gz", mask, mask_affine, dtype=np.uint8)
    return root / case


@pytest.fixture()
def ts_root(tmp_path) -> Path:
    root = tmp_path / "Totalsegmentator_dataset_v201"
    _ts_case(root, "s0000", TS_MASKS)
    _ts_case(root, "s0001", {"liver": TS_MASKS["liver"]})
    (root / "meta.csv").write_text(
        "image_id;age;gender;institute;study_type;split;manufacturer\n"
        "s0000;65;m;A;ct abdomen-pelvis;train;siemens\n"
        "s0001;40;f;B;ct thorax;test;ge\n"
    )
    return root


def _expected_label_map() -> np.ndarray:
    """Built independently of the adapter: unions per label; the smaller gallbladder wins over the liver."""
    m = TS_MASKS
    expected = np.zeros(TS_SHAPE, np.uint8)
    expected[(m["lung_upper_lobe_left"] | m["lung_lower_lobe_left"]) > 0] = LABEL_INDEX["lung_left"]
    expected[(m["vertebrae_L1"] | m["vertebrae_L2"]) > 0] = LABEL_INDEX["vertebrae"]
    expected[m["liver"] > 0] = LABEL_INDEX["liver"]
    expected[m["gallbladder"] > 0] = LABEL_INDEX["gallbladder"]
    return expected


def test_totalsegmentator_adapter_merges_masks(ts_root, tmp_path):
    before = _tree_hashes(ts_root)
    out = adapt("TotalSegmentator", ts_root, tmp_path / "ts" / "manifest.jsonl")
    assert _tree_hashes(ts_root) == before  # nothing written into the user's dataset
    manifest = read_manifest(out)
    rows = {row["id"]: row for row in manifest.rows}
    assert rows["s0000"]["split"] == "train" and rows["s0000"]["age"] == 65 and rows["s0000"]["sex"] == "M"
    assert rows["s0001"]["split"] == "test" and rows["s0001"]["sex"] == "F"
    assert rows["s0000"]["image"] == str((ts_root / "s0000" / "ct.nii.gz").resolve())
    label_path = Path(rows["s0000"]["label"])
    assert label_path == (tmp_path / "ts" / "labels" / "s0000.nii.gz").resolve()

    img = nib.load(label_path)
    labels = np.asarray(img.dataobj)
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, TS_AFFINE)
    np.testing.assert_array_equal(labels, _expected_label_map())
    m = TS_MASKS
    counts = {int(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))}
    # Same-label masks: the count is exactly their union.
    assert counts[LABEL_INDEX["vertebrae"]] == int(((m["vertebrae_L1"] | m["vertebrae_L2"]) > 0).sum())
    assert counts[LABEL_INDEX["lung_left"]] == int(((m["lung_upper_lobe_left"] | m["lung_lower_lobe_left"]) > 0).sum())
    assert counts[LABEL_INDEX["gallbladder"]] == int(m["gallbladder"].sum())
    assert counts[LABEL_INDEX["liver"]] == int(((m["liver"] > 0) & (m["gallbladder"] == 0)).sum())
    assert set(counts) == {0, LABEL_INDEX["liver"], LABEL_INDEX["gallbladder"], LABEL_INDEX["vertebrae"], LABEL_INDEX["lung_left"]}

    # Through the segmentation dataset, the merged labels sit on the structures' voxels.
    item = SegmentationDataset(manifest, PreprocessConfig(target_spacing=(1.5, 1.5, 2.0), spatial_size=None))[0]
    assert set(torch.unique(item["label"]).tolist()) == set(counts)
    assert torch.all(item["image"][item["label"] > 0] > 0.5)  # 60 HU -> 0.53 after the window


def test_overlap_resolution_does_not_depend_on_mask_order(ts_root):
    case = ts_root / "s0000"
    paths = {name: case / "segmentations" / f"{name}.nii.gz" for name in TS_MASKS}
    forward, affine, used = merge_structure_masks(case / "ct.nii.gz", paths)
    backward, _, _ = merge_structure_masks(case / "ct.nii.gz", dict(reversed(list(paths.items()))))
    np.testing.assert_array_equal(forward, backward)
    np.testing.assert_array_equal(forward, _expected_label_map())
    assert "kidney_cyst_left" not in used and used["vertebrae_L2"] == LABEL_INDEX["vertebrae"]


@pytest.mark.parametrize("problem", ["affine", "shape"])
def test_mask_on_another_grid_raises_naming_the_mask(tmp_path, problem):
    root = tmp_path / "ts"
    _ts_case(root, "s0000", {"liver": TS_MASKS["liver"]})
    if problem == "affine":
        moved = TS_AFFINE.copy()
        moved[:3, 3] += 3.0
        write_nifti(root / "s0000" / "segmentations" / "spleen.nii.gz", TS_MASKS["liver"], moved, dtype=np.uint8)
    else:
        write_nifti(root / "s0000" / "segmentations" / "spleen.nii.gz", np.zeros((20, 18, 15), np.uint8), TS_AFFINE, dtype=np.uint8)
    with pytest.raises(GeometryError, match=r"segmentations/spleen\.nii\.gz: label (affine|shape)"):
        adapt("totalsegmentator", root, tmp_path / "out" / "m.jsonl")
    assert not (tmp_path / "out" / "m.jsonl").exists()


def test_totalsegmentator_refuses_output_inside_dataset_and_reuses_labels(ts_root, tmp_path):
    with pytest.raises(InputError, match="inside the input dataset"):
        adapt("totalsegmentator", ts_root, ts_root / "derived" / "m.jsonl")
    out = tmp_path / "o" / "m.jsonl"
    adapt("totalsegmentator", ts_root, out)
    label = tmp_path / "o" / "labels" / "s0001.nii.gz"
    first = label.stat().st_mtime_ns
    adapt("totalsegmentator", ts_root, out)
    assert label.stat().st_mtime_ns == first  # up to date: reused
    mask = ts_root / "s0001" / "segmentations" / "liver.nii.gz"
    os.utime(mask, ns=(first + 10**9, first + 10**9))
    adapt("totalsegmentator", ts_root, out)
    assert label.stat().st_mtime_ns > first  # a newer mask: merged again


def test_cli_entry_point(ts_root, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "cli" / "m.jsonl"
    assert run(parser.parse_args(["totalsegmentator", str(ts_root), "--out", str(out)])) == 0
    assert json.loads(capsys.readouterr().out)["manifest"] == str(out.resolve())
    assert read_manifest(out).ids == ["s0000", "s0001"]
