"""The manifest reader: path resolution, validation errors naming file and line, missing files."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from volumevlm.data.manifest import read_manifest, write_manifest
from volumevlm.errors import ManifestError


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _cohort(tmp_path: Path, n: int, missing: set[int]) -> Path:
    """n rows with image files under tmp_path/images, except the indices in ``missing``."""
    (tmp_path / "images").mkdir()
    lines = []
    for i in range(n):
        name = f"images/case{i:03d}.nii.gz"
        if i not in missing:
            (tmp_path / name).write_bytes(b"x")
        split = ("train", "val", "test")[i % 3]
        lines.append(json.dumps({"id": f"case{i:03d}", "image": name, "split": split, "report": f"r{i}"}))
    return _write_lines(tmp_path / "manifest.jsonl", lines)


def test_paths_resolve_relative_to_manifest_folder(tmp_path, monkeypatch):
    path = _cohort(tmp_path, 6, missing=set())
    monkeypatch.chdir("/")  # the working directory must not matter
    manifest = read_manifest(path)
    assert len(manifest) == 6
    assert manifest.missing == []
    assert manifest.rows[2]["image"] == str(tmp_path.resolve() / "images" / "case002.nii.gz")
    assert [r["id"] for r in manifest.split("val")] == ["case001", "case004"]
    assert manifest.rows[0]["report"] == "r0"


def test_missing_files_counted_reported_and_dropped(tmp_path, caplog):
    path = _cohort(tmp_path, 200, missing={5, 17, 150})
    with caplog.at_level(logging.WARNING):
        manifest = read_manifest(path)
    assert len(manifest) == 197
    assert [m.id for m in manifest.missing] == ["case005", "case017", "case150"]
    assert [m.line for m in manifest.missing] == [6, 18, 151]
    assert "case005" not in manifest.ids
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "\n" not in warnings[0]
    assert warnings[0].startswith("manifest.jsonl: 3 of 200 rows point at missing files")
    assert "case005.nii.gz" in warnings[0]


def test_strict_raises_on_first_missing_file(tmp_path):
    path = _cohort(tmp_path, 10, missing={4})
    with pytest.raises(ManifestError, match=r"line 5: image file not found: .*case004\.nii\.gz"):
        read_manifest(path, strict=True)


def test_missing_label_file_drops_the_row(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    path = _write_lines(tmp_path / "m.jsonl", [json.dumps({"id": "a", "image": "a.nii.gz", "label": "nolabel.nii.gz"})])
    manifest = read_manifest(path)
    assert manifest.rows == []
    assert manifest.missing[0].field == "label"


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"id": "b", "image": "b.nii.gz"', "line 3: malformed JSON"),
        ('["not", "an", "object"]', "line 3: expected a JSON object"),
        ('{"id": "b"}', "line 3: missing required field 'image'"),
        ('{"id": "b", "image": "b.nii.gz", "icd10": "K76.0"}', "line 3: field 'icd10' must be a list"),
        ('{"id": "b", "image": "b.nii.gz", "findings": {"ascites": 2}}', "line 3: findings values must be 0 or 1"),
        ('{"id": "b", "image": "b.nii.gz", "spacing_override": [1, 1]}', "line 3: spacing_override must be 3"),
        ('{"id": "a", "image": "b.nii.gz"}', "line 3: duplicate id 'a' \\(first on line 1\\)"),
    ],
    ids=["truncated-json", "not-object", "no-image", "codes-not-list", "finding-value", "spacing-len", "duplicate-id"],
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line, message):
    for name in ("a.nii.gz", "b.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    path = _write_lines(tmp_path / "cohort.jsonl", ['{"id": "a", "image": "a.nii.gz"}', "", bad_line])
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    text = str(err.value)
    assert "\n" not in text
    assert str(path) in text
    assert re.search(message, text), text


def test_missing_manifest_is_one_line_error(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")


def test_unknown_split_name_is_an_error(tmp_path):
    manifest = read_manifest(_cohort(tmp_path, 3, missing=set()))
    with pytest.raises(ManifestError, match="no split named 'validation'; splits present: test, train, val"):
        manifest.split("validation")


def test_id_defaults_to_image_stem(tmp_path):
    (tmp_path / "scan_7.nii.gz").write_bytes(b"x")
    (tmp_path / "dicom_9").mkdir()
    path = _write_lines(tmp_path / "m.jsonl", ['{"image": "scan_7.nii.gz"}', '{"image": "dicom_9/"}'])
    assert read_manifest(path).ids == ["scan_7", "dicom_9"]


def test_write_then_read_round_trip_is_portable(tmp_path):
    (tmp_path / "cohort" / "img").mkdir(parents=True)
    image = tmp_path / "cohort" / "img" / "a.nii.gz"
    image.write_bytes(b"x")
    outside = tmp_path / "elsewhere.nii.gz"
    outside.write_bytes(b"y")
    rows = [
        {"id": "a", "image": image, "report": "Liver normal.", "icd10": ["K76.0"], "findings": {"ascites": 0}},
        {"id": "b", "image": str(outside), "report": None, "icd10": []},
    ]
    out = write_manifest(tmp_path / "cohort" / "manifest.jsonl", rows)
    raw = [json.loads(line) for line in out.read_text().splitlines()]
    assert raw[0]["image"] == "img/a.nii.gz"  # relative: the folder can move
    assert raw[1]["image"] == str(outside)  # outside the folder: kept absolute
    assert not list(out.parent.glob(".*tmp"))  # no temp file left behind

    moved = tmp_path / "moved"
    (tmp_path / "cohort").rename(moved)
    back = read_manifest(moved / "manifest.jsonl")
    assert back.rows[0]["image"] == str(moved.resolve() / "img" / "a.nii.gz")
    assert back.rows[0]["icd10"] == ["K76.0"] and back.rows[0]["findings"] == {"ascites": 0}
    assert back.rows[1]["report"] is None


def test_write_rejects_non_serialisable_rows(tmp_path):
    with pytest.raises(ManifestError, match="row 0 .* not JSON-serialisable"):
        write_manifest(tmp_path / "m.jsonl", [{"id": "a", "image": "a.nii.gz", "bad": object()}])
    assert not (tmp_path / "m.jsonl").exists()
