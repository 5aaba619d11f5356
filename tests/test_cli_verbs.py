"""The one-shot CLI verbs (``volumevlm embed | zero-shot | phenotypes | segment | retrieve |
report``) and per-structure statistics (volumevlm.inference.statistics).

Every verb runs through the real console entry (``volumevlm.cli.main`` in-process, and
``python -m volumevlm.cli`` as a subprocess) on one phantom stored as NIfTI, a DICOM
series folder and a zip of that series, and its output is compared with the Python API's
result for the same input. The checkpoint is tiny and untrained (one fast_dev_run step
on a 12-case synthetic cohort, NOT clinical data, with both heads built directly on
it): the checks are about agreement, geometry, files and errors, not quality.
Statistics are checked against numpy on a mask and CT built here with known counts.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import volumevlm
from ct_files import seg_content, zip_series
from pretrain_helpers import TINY_REPORT_HEAD, make_checkpoints
from volumevlm.cli import COMMANDS, main
from volumevlm.errors import GeometryError, InputError, VolumeVLMError
from volumevlm.inference.commands import report_text
from volumevlm.inference.index import build_index
from volumevlm.inference.statistics import (
    format_statistics,
    structure_statistics,
    voxel_volume_mm3,
    write_statistics,
)
from volumevlm.io import read_volume
from volumevlm.io.writers import write_dicom_series, write_nifti
from volumevlm.models.segmentation import read_label_names
from volumevlm.text.sections import split_report

VERBS = ("embed", "zero-shot", "phenotypes", "segment", "retrieve", "report")
NOTE = volumevlm.NOT_FOR_CLINICAL_USE


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{"plain": no heads, "full": segmentation + report heads, "root", "cohort"}."""
    return make_checkpoints(tmp_path_factory.mktemp("cli_verbs"))


@pytest.fixture(scope="module")
def model(checkpoints):
    return volumevlm.load(checkpoints["full"])


def lps_affine(spacing, shape) -> np.ndarray:
    """Voxel -> RAS mm of a grid stored L, P, S (as DICOM stores it), centred on 0."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape, dtype=float) - 1.0) / 2.0)
    return affine


def phantom_hu(affine: np.ndarray, shape, bone_centre=(50.0, -30.0, 40.0)) -> np.ndarray:
    """Integer HU (exact in DICOM): air, a soft-tissue ellipsoid, a bone ball off-centre."""
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), axis=-1)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[((xyz / (120.0, 90.0, 100.0)) ** 2).sum(-1) <= 1.0] = 40.0
    hu[(((xyz - bone_centre) / 25.0) ** 2).sum(-1) <= 1.0] = 700.0
    return hu


@pytest.fixture(scope="module")
def inputs(checkpoints):
    """The same phantom as NIfTI, DICOM folder and DICOM zip, and another phantom (other
    grid, bone elsewhere) as NIfTI: {"nifti", "dicom", "zip", "other"} -> str."""
    folder = checkpoints["root"] / "inputs"
    folder.mkdir()
    shape = (30, 26, 16)
    affine = lps_affine((10.0, 12.0, 16.0), shape)
    hu = phantom_hu(affine, shape)
    nifti = write_nifti(folder / "ct.nii.gz", hu, affine)
    series = write_dicom_series(folder / "series", hu, affine, patient_id="PHANTOM")
    archive = zip_series(series, folder / "archive.zip")
    other_shape = (28, 24, 18)
    other_affine = lps_affine((11.0, 13.0, 15.0), other_shape)
    other = write_nifti(folder / "other.nii.gz", phantom_hu(other_affine, other_shape, (-60.0, 20.0, -30.0)), other_affine)
    return {"nifti": str(nifti), "dicom": str(series), "zip": str(archive), "other": str(other)}


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


@pytest.fixture(autouse=True)
def inputs_untouched(request):
    """Every test that uses the phantom inputs leaves them byte for byte as they were."""
    if "inputs" not in request.fixturenames:
        yield
        return
    paths = request.getfixturevalue("inputs")
    before = {name: _digest(Path(p)) for name, p in paths.items()}
    yield
    assert {name: _digest(Path(p)) for name, p in paths.items()} == before


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """``volumevlm ARGS`` in-process: (exit status, stdout, stderr). A verb runs on the CPU
    unless told otherwise, like the API model it is compared with (on a GPU, convolutions
    may use TF32 and move a mask voxel)."""
    argv = [str(a) for a in args]
    if argv and argv[0] in VERBS and "--device" not in argv and "--help" not in argv:
        argv += ["--device", "cpu"]
    capsys.readouterr()
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def no_temporaries(folder: Path) -> None:
    """An atomic writer leaves nothing but its finished outputs (no dot-files, no .tmp)."""
    leftovers = [p.name for p in folder.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]
    assert leftovers == []


# ---------------------------------------------------------------------- the console entry


def test_every_verb_is_registered_and_has_help(capsys):
    status, out, _ = run_cli(capsys, "--help")
    assert status == 0
    for verb in (*VERBS, "serve"):
        assert verb in COMMANDS and verb in out
    for verb in VERBS:
        with pytest.raises(SystemExit) as exited:
            main([verb, "--help"])
        assert exited.value.code == 0
        text = capsys.readouterr().out
        assert "--checkpoint" in text and "--input" in text and "--device" in text


def test_default_device_is_cuda_when_available_else_cpu():
    from volumevlm.inference.commands import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"


# ---------------------------------------------------------------------- embed


def test_embed_writes_the_apis_embeddings_in_every_format(model, checkpoints, inputs, tmp_path, capsys):
    sources = [inputs["nifti"], inputs["other"], inputs["dicom"], inputs["zip"]]
    expected = model.embed(sources)
    assert expected.shape == (4, model.embed_dim)
    # The other phantom embeds elsewhere, so the row order is visible in every output.
    assert float((expected[1] - expected[0]).abs().max()) > 1e-3

    out = tmp_path / "emb.safetensors"
    out.write_bytes(b"an older, longer file that must be replaced whole " * 1000)
    status, stdout, _ = run_cli(capsys, "embed", "-m", checkpoints["full"], "-i", *sources, "-o", out)
    assert status == 0 and str(out) in stdout
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        stored, meta = f.get_tensor("embeddings"), f.metadata()
    torch.testing.assert_close(stored, expected, atol=1e-5, rtol=0)
    assert json.loads(meta["sources"]) == sources and meta["note"] == NOTE
    # The same phantom in three containers: the same voxels, the same embedding.
    torch.testing.assert_close(stored[2], stored[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(stored[3], stored[0], atol=1e-5, rtol=0)

    # -i repeated works like -i with several values; .npy / .npz / .json hold the same rows.
    assert run_cli(capsys, "embed", "-m", checkpoints["full"], "-i", sources[0], "-i", *sources[1:3], "-i", sources[3],
                   "-o", tmp_path / "emb.npy")[0] == 0
    np.testing.assert_allclose(np.load(tmp_path / "emb.npy"), expected.numpy(), atol=1e-5, rtol=0)
    assert run_cli(capsys, "embed", "-m", checkpoints["full"], "-i", *sources, "-o", tmp_path / "emb.npz")[0] == 0
    with np.load(tmp_path / "emb.npz") as npz:
        np.testing.assert_allclose(npz["embeddings"], expected.numpy(), atol=1e-5, rtol=0)
        assert npz["sources"].tolist() == sources and str(npz["note"]) == NOTE
    assert run_cli(capsys, "embed", "-m", checkpoints["full"], "-i", *sources, "-o", tmp_path / "emb.json")[0] == 0
    doc = json.loads((tmp_path / "emb.json").read_text())
    assert doc["note"] == NOTE and doc["embed_dim"] == model.embed_dim
    assert [row["source"] for row in doc["embeddings"]] == sources
    np.testing.assert_allclose(np.array([row["embedding"] for row in doc["embeddings"]]), expected.numpy(), atol=1e-5, rtol=0)
    # Without -o: the JSON document on stdout.
    status, stdout, _ = run_cli(capsys, "embed", "-m", checkpoints["full"], "-i", sources[0])
    printed = json.loads(stdout)
    assert status == 0 and printed["note"] == NOTE
    np.testing.assert_allclose(printed["embeddings"][0]["embedding"], expected[0].numpy(), atol=1e-5, rtol=0)
    no_temporaries(tmp_path)


# ---------------------------------------------------------------------- zero-shot, phenotypes


def test_zero_shot_equals_the_api_with_findings_and_prompts(model, checkpoints, inputs, tmp_path, capsys):
    sources = [inputs["other"], inputs["zip"]]
    findings = ["splenomegaly", "pleural effusion"]
    expected = model.zero_shot(sources, findings=findings, prompts="synthetic")
    out = tmp_path / "zs.json"
    status, _, _ = run_cli(capsys, "zero-shot", "-m", checkpoints["full"], "-i", *sources, "-o", out,
                           "--findings", "splenomegaly, pleural effusion", "--prompts", "synthetic")
    assert status == 0
    doc = json.loads(out.read_text())
    assert doc["note"] == NOTE and doc["prompt_set"] == "synthetic" and doc["findings"] == findings
    assert list(doc["results"]) == sources
    for source, probs in zip(sources, expected):
        assert doc["results"][source] == pytest.approx(probs, abs=1e-6)
        assert list(doc["results"][source]) == findings
    # Default prompt set, every finding, printed as a table: one line per finding.
    everything = model.zero_shot(inputs["nifti"])
    status, stdout, _ = run_cli(capsys, "zero-shot", "-m", checkpoints["full"], "-i", inputs["nifti"])
    lines = stdout.strip().splitlines()
    assert status == 0 and lines[0].split() == ["finding", "ct.nii.gz"] and len(lines) == 1 + len(everything)
    for line, (name, p) in zip(lines[1:], everything.items()):
        assert line.split() == [name, f"{p:.4f}"]


def test_phenotypes_equal_the_api(model, checkpoints, inputs, tmp_path, capsys):
    expected = model.phenotypes(inputs["dicom"], top_k=3)
    out = tmp_path / "phe.json"
    assert run_cli(capsys, "phenotypes", "-m", checkpoints["full"], "-i", inputs["dicom"], "--top-k", "3", "-o", out)[0] == 0
    doc = json.loads(out.read_text())
    assert doc["note"] == NOTE and doc["top_k"] == 3
    rows = doc["results"][inputs["dicom"]]
    assert [(r["phecode"], r["description"]) for r in rows] == [(c, d) for c, d, _ in expected]
    assert [r["probability"] for r in rows] == pytest.approx([p for _, _, p in expected], abs=1e-6)
    every = model.phenotypes(inputs["nifti"], top_k=None)
    assert run_cli(capsys, "phenotypes", "-m", checkpoints["full"], "-i", inputs["nifti"], "--top-k", "all", "-o", out)[0] == 0
    assert len(json.loads(out.read_text())["results"][inputs["nifti"]]) == len(every)
    status, stdout, _ = run_cli(capsys, "phenotypes", "-m", checkpoints["full"], "-i", inputs["nifti"], "--top-k", "2")
    assert status == 0 and every[0][0] in stdout and f"{every[0][2]:.4f}" in stdout


# ---------------------------------------------------------------------- segment and statistics


def hand_statistics(mask: np.ndarray, hu: np.ndarray, affine: np.ndarray, names: dict[int, str]) -> list[dict]:
    """The statistics by plain numpy, label by label."""
    ml_per_voxel = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    rows = []
    for label in sorted(set(names) - {0}):
        inside = mask == label
        count = int(inside.sum())
        rows.append({"label": label, "name": names[label], "voxels": count, "volume_ml": count * ml_per_voxel,
                     "mean_hu": float(hu[inside].astype(np.float64).mean()) if count else None})
    return rows


def same_rows(got: list[dict], expected: list[dict]) -> None:
    assert [(r["label"], r["name"], r["voxels"]) for r in got] == [(r["label"], r["name"], r["voxels"]) for r in expected]
    for g, e in zip(got, expected):
        assert g["volume_ml"] == pytest.approx(e["volume_ml"], rel=1e-12, abs=0)
        assert (g["mean_hu"] is None) == (e["mean_hu"] is None)
        if e["mean_hu"] is not None:
            assert g["mean_hu"] == pytest.approx(e["mean_hu"], rel=1e-12, abs=1e-12)


def test_segment_one_input_writes_the_apis_mask_in_the_inputs_geometry(model, checkpoints, inputs, tmp_path, capsys):
    expected = model.segment(inputs["zip"])
    volume = read_volume(inputs["zip"])
    out = tmp_path / "mask.nii.gz"
    out.write_bytes(b"stale")
    status, stdout, _ = run_cli(capsys, "segment", "-m", checkpoints["full"], "-i", inputs["zip"], "-o", out)
    assert status == 0 and str(out) in stdout
    mask = nib.load(str(out))
    labels = np.asarray(mask.dataobj)
    assert labels.shape == volume.shape and labels.dtype == np.uint8
    np.testing.assert_allclose(mask.affine, volume.affine, atol=1e-4)
    np.testing.assert_array_equal(labels, np.asarray(expected.dataobj))
    assert read_label_names(mask) == model.head("segmentation").label_names
    no_temporaries(tmp_path)


def test_segment_several_inputs_with_statistics_as_json_and_csv(model, checkpoints, inputs, tmp_path, capsys):
    sources = [inputs["other"], inputs["dicom"]]
    names = model.head("segmentation").label_names
    folder = tmp_path / "masks"
    stats_json = tmp_path / "stats.json"
    status, stdout, _ = run_cli(capsys, "segment", "-m", checkpoints["full"], "-i", *sources, "-o", folder,
                                "--statistics", stats_json)
    assert status == 0
    assert sorted(p.name for p in folder.iterdir()) == ["other.nii.gz", "series.nii.gz"]
    doc = json.loads(stats_json.read_text())
    assert doc["note"] == NOTE and doc["masks"] == {sources[0]: str(folder / "other.nii.gz"), sources[1]: str(folder / "series.nii.gz")}
    for source, file in zip(sources, ("other.nii.gz", "series.nii.gz")):
        volume = read_volume(source)
        mask = nib.load(str(folder / file))
        labels = np.asarray(mask.dataobj)
        np.testing.assert_array_equal(labels, np.asarray(model.segment(source).dataobj))
        assert labels.shape == volume.shape
        np.testing.assert_allclose(mask.affine, volume.affine, atol=1e-4)
        expected = hand_statistics(labels, volume.array, volume.affine, names)
        assert len(expected) == len(names) - 1  # every structure, also those the mask lacks
        rows = [row for row in doc["structures"] if row["source"] == source]
        same_rows(rows, expected)
        # The printed table holds every row of this input.
        for row in expected:
            assert any(line.split()[:4] == [source, str(row["label"]), row["name"], str(row["voxels"])]
                       for line in stdout.splitlines())
    # The CSV form holds the same numbers, an absent structure's mean HU as an empty cell.
    stats_csv = tmp_path / "stats.csv"
    assert run_cli(capsys, "segment", "-m", checkpoints["full"], "-i", *sources, "-o", folder, "--statistics", stats_csv)[0] == 0
    table = list(csv.DictReader(io.StringIO(stats_csv.read_text())))
    assert list(table[0]) == ["source", "label", "name", "voxels", "volume_ml", "mean_hu"]
    from_csv = [{"source": r["source"], "label": int(r["label"]), "name": r["name"], "voxels": int(r["voxels"]),
                 "volume_ml": float(r["volume_ml"]), "mean_hu": float(r["mean_hu"]) if r["mean_hu"] else None} for r in table]
    assert from_csv == doc["structures"]
    no_temporaries(tmp_path)


def test_statistics_equal_a_hand_computation():
    shape = (12, 10, 8)
    affine = np.diag([1.5, 2.0, 2.5, 1.0])
    affine[:3, 3] = (-20.0, 7.0, 3.5)
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1500, size=shape).astype(np.float32)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[1:4, 2:7, 0:3] = 1  # 3 x 5 x 3 = 45 voxels
    mask[6:11, 0:2, 4:8] = 3  # 5 x 2 x 4 = 40 voxels
    mask[0, 0, 7] = 3  # one more: 41
    names = {0: "background", 1: "liver", 2: "spleen", 3: "kidney_left"}
    rows = structure_statistics(nib.Nifti1Image(mask, affine), (hu, affine), names)
    # 1.5 x 2 x 2.5 mm = 7.5 mm^3 = 0.0075 mL per voxel; spleen (2) is absent.
    assert [(r["label"], r["name"], r["voxels"]) for r in rows] == [(1, "liver", 45), (2, "spleen", 0), (3, "kidney_left", 41)]
    assert [r["volume_ml"] for r in rows] == [45 * 7.5 / 1000, 0.0, 41 * 7.5 / 1000]
    assert rows[0]["mean_hu"] == float(hu[1:4, 2:7, 0:3].astype(np.float64).mean())
    assert rows[1]["mean_hu"] is None
    assert rows[2]["mean_hu"] == float(np.concatenate([hu[6:11, 0:2, 4:8].ravel(), [hu[0, 0, 7]]]).astype(np.float64).mean())
    same_rows(rows, hand_statistics(mask, hu, affine, names))

    # A label the table does not name is still counted; a rotated grid has the same voxel volume.
    mask[5, 5, 5] = 7
    theta = 0.3
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    rotated = affine.copy()
    rotated[:3, :3] = rotation @ affine[:3, :3]
    rows = structure_statistics(nib.Nifti1Image(mask, rotated), (hu, rotated), names)
    assert rows[-1] == {"label": 7, "name": "label_7", "voxels": 1, "volume_ml": pytest.approx(0.0075, rel=1e-12),
                        "mean_hu": float(hu[5, 5, 5])}
    assert voxel_volume_mm3(rotated) == pytest.approx(7.5, rel=1e-12) and voxel_volume_mm3(affine) == 7.5
    table = format_statistics(rows)
    assert table.splitlines()[0].split() == ["label", "name", "voxels", "volume_ml", "mean_hu"]
    assert table.splitlines()[2].split() == ["2", "spleen", "0", "0.000", "-"]


def test_statistics_files_and_bad_geometry(tmp_path):
    shape = (6, 5, 4)
    affine = np.diag([1.5, 2.0, 2.5, 1.0])
    hu = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) * 20.0 - 1000.0
    mask = np.zeros(shape, dtype=np.uint8)
    mask[:2] = 1
    mask_path = tmp_path / "mask.nii.gz"
    ct_path = write_nifti(tmp_path / "ct.nii.gz", hu, affine)
    nib.save(nib.Nifti1Image(mask, affine), str(mask_path))
    rows = structure_statistics(mask_path, read_volume(ct_path), {1: "liver", 2: "spleen"})
    liver_hu = float(hu[:2].astype(np.float64).mean())
    assert rows == [{"label": 1, "name": "liver", "voxels": 40, "volume_ml": 0.3, "mean_hu": liver_hu},
                    {"label": 2, "name": "spleen", "voxels": 0, "volume_ml": 0.0, "mean_hu": None}]
    json_path = write_statistics(rows, tmp_path / "s.json", info={"image": str(ct_path)})
    doc = json.loads(json_path.read_text())
    assert doc == {"note": NOTE, "image": str(ct_path), "structures": rows}
    csv_path = tmp_path / "s.csv"
    csv_path.write_text("an older file\n" * 500)
    write_statistics(rows, csv_path)
    assert csv_path.read_text() == f"label,name,voxels,volume_ml,mean_hu\n1,liver,40,0.3,{liver_hu!r}\n2,spleen,0,0.0,\n"
    with pytest.raises(InputError, match="must end with .json or .csv"):
        write_statistics(rows, tmp_path / "s.xlsx")
    no_temporaries(tmp_path)

    # Mask and CT on different grids: one line naming the mask.
    for other_shape, other_affine in (((6, 5, 3), affine), (shape, np.diag([1.5, 2.0, 3.0, 1.0]))):
        other = tmp_path / "other.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros(other_shape, dtype=np.uint8), other_affine), str(other))
        with pytest.raises(GeometryError) as err:
            structure_statistics(other, read_volume(ct_path), {1: "liver"})
        assert str(other) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(VolumeVLMError, match="label-name"):
        structure_statistics(mask_path, read_volume(ct_path), None)  # a plain NIfTI carries no names


# ---------------------------------------------------------------------- retrieve, report


def test_retrieve_equals_the_api(model, checkpoints, inputs, tmp_path, capsys):
    index = tmp_path / "index"
    build_index(model, index, reports=checkpoints["cohort"] / "manifest.jsonl", sections=True, images=[inputs["nifti"]])
    expected = model.retrieve(inputs["zip"], k=4, index=index, kind=None)
    out = tmp_path / "hits.json"
    status, _, _ = run_cli(capsys, "retrieve", "-m", checkpoints["full"], "-i", inputs["zip"], "--index", index,
                           "-k", "4", "--kind", "all", "-o", out)
    assert status == 0
    doc = json.loads(out.read_text())
    hits = doc["results"][inputs["zip"]]
    assert doc["note"] == NOTE and doc["kind"] == "all" and len(hits) == 4
    assert [(h["rank"], h["index"], h["kind"], h["id"]) for h in hits] == [(h["rank"], h["index"], h["kind"], h["id"]) for h in expected]
    assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in expected], abs=1e-6)
    # The default kind is "report", as in model.retrieve; a table without -o.
    reports = model.retrieve(inputs["nifti"], k=2, index=index)
    status, stdout, _ = run_cli(capsys, "retrieve", "-m", checkpoints["full"], "-i", inputs["nifti"], "--index", index, "-k", "2")
    assert status == 0 and all(h["kind"] == "report" and h["id"] in stdout for h in reports)


def test_report_equals_the_api_as_text_and_json(model, checkpoints, inputs, tmp_path, capsys):
    sources = [inputs["other"], inputs["zip"]]
    expected = model.generate_report(sources)
    out = tmp_path / "reports.json"
    assert run_cli(capsys, "report", "-m", checkpoints["full"], "-i", *sources, "-o", out)[0] == 0
    doc = json.loads(out.read_text())
    assert doc["note"] == NOTE
    for source, text in zip(sources, expected):
        assert doc["results"][source] == {"report": text, "sections": split_report(text)}
    text_out = tmp_path / "reports.txt"
    assert run_cli(capsys, "report", "-m", checkpoints["full"], "-i", *sources, "-o", text_out)[0] == 0
    written = text_out.read_text()
    assert written == f"{NOTE}\n\n== {sources[0]} ==\n{expected[0].strip()}\n\n== {sources[1]} ==\n{expected[1].strip()}\n"
    status, stdout, _ = run_cli(capsys, "report", "-m", checkpoints["full"], "-i", *sources)
    assert status == 0 and stdout == written
    # Decoding settings reach the head as the Python keywords do.
    settings = {"max_new_tokens": 6, "num_beams": 2, "consistent_candidates": 2}
    shorter = model.generate_report(sources, **settings)
    assert shorter != expected
    status, stdout, _ = run_cli(capsys, "report", "-m", checkpoints["full"], "-i", *sources, "--max-new-tokens", "6",
                                "--num-beams", "2", "--consistent-candidates", "2")
    assert status == 0 and stdout == report_text(dict(zip(sources, shorter)))
    no_temporaries(tmp_path)


def test_report_decoding_flags_of_a_findings_head_equal_the_api(checkpoints, inputs, tmp_path, capsys):
    from volumevlm.models.report import ReportGenerator

    # A findings-conditioned head with a section bank (untrained: its zero classifier calls
    # every finding at P = 0.5, and its decoder states none, so the bank shows).
    model = volumevlm.load(checkpoints["full"])
    bank = {"IMPRESSION": ["1. Splenomegaly.", "No acute abnormality."]}
    head = ReportGenerator.build({**TINY_REPORT_HEAD, "findings": ["splenomegaly"], "section_bank": bank,
                                  "bank_fallback": True, "consistent_candidates": 2}, model)
    model.attach_head("report", head.eval())
    folder = model.save_pretrained(tmp_path / "findings_head")
    model = volumevlm.load(folder)
    sources = [inputs["other"]]
    written = {value: model.generate_report(sources, bank_fallback=value, consistent_candidates=candidates)
               for value, candidates in ((True, 2), (False, 1))}
    assert written[True] != written[False] and written[True][0].endswith("IMPRESSION:\n1. Splenomegaly.\n")
    for flags, value in ((["--no-bank-fallback", "--consistent-candidates", "1"], False), (["--bank-fallback"], True), ([], True)):
        status, stdout, _ = run_cli(capsys, "report", "-m", folder, "-i", *sources, *flags)
        assert status == 0 and stdout == report_text(dict(zip(sources, written[value]))), flags


# ---------------------------------------------------------------------- errors and the real console script


def test_bad_input_exits_2_with_one_line_naming_the_file(checkpoints, inputs, tmp_path, capsys):
    full, plain = str(checkpoints["full"]), str(checkpoints["plain"])
    missing = tmp_path / "missing.nii.gz"
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image\n")
    cases = [
        (["embed", "-m", full, "-i", missing], missing),
        (["zero-shot", "-m", full, "-i", inputs["nifti"], missing], missing),
        (["phenotypes", "-m", full, "-i", text_file], text_file),
        (["segment", "-m", plain, "-i", inputs["nifti"], "-o", tmp_path / "m.nii.gz"], plain),
        (["report", "-m", plain, "-i", inputs["nifti"]], plain),
        (["embed", "-m", full, "-i", inputs["nifti"], "-o", tmp_path / "emb.png"], tmp_path / "emb.png"),
        (["zero-shot", "-m", full, "-i", inputs["nifti"], "-o", tmp_path / "zs.csv"], tmp_path / "zs.csv"),
        (["segment", "-m", full, "-i", inputs["nifti"], "-o", tmp_path / "mask.png"], tmp_path / "mask.png"),
        (["segment", "-m", full, "-i", inputs["nifti"], "-o", tmp_path / "m.nii.gz", "--statistics", tmp_path / "s.xlsx"],
         tmp_path / "s.xlsx"),
        (["segment", "-m", full, "-i", inputs["nifti"], inputs["zip"], "-o", tmp_path / "m.nii.gz"], tmp_path / "m.nii.gz"),
        (["segment", "-m", full, "-i", inputs["nifti"], "-o", inputs["nifti"]], inputs["nifti"]),
        (["embed", "-m", tmp_path / "no_checkpoint", "-i", inputs["nifti"]], tmp_path / "no_checkpoint"),
        (["retrieve", "-m", full, "-i", inputs["nifti"], "--index", tmp_path / "no_index"], tmp_path / "no_index"),
    ]
    for args, named in cases:
        status, stdout, stderr = run_cli(capsys, *args)
        assert status == 2, args
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(named) in lines[0], (args, stderr)
    assert "no segmentation head" in run_cli(capsys, *cases[3][0])[2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no output was written


def test_console_script_in_a_fresh_interpreter(checkpoints, inputs, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "mask.nii.gz"
    stats = tmp_path / "stats.csv"
    done = subprocess.run([sys.executable, "-m", "volumevlm.cli", "segment", "-m", str(checkpoints["full"]),
                           "-i", inputs["dicom"], "-o", str(out), "--statistics", str(stats), "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    volume = read_volume(inputs["dicom"])
    labels = np.asarray(nib.load(str(out)).dataobj)
    assert labels.shape == volume.shape
    names = read_label_names(out)
    table = list(csv.DictReader(io.StringIO(stats.read_text())))
    expected = hand_statistics(labels, volume.array, volume.affine, names)
    same_rows([{"label": int(r["label"]), "name": r["name"], "voxels": int(r["voxels"]), "volume_ml": float(r["volume_ml"]),
                "mean_hu": float(r["mean_hu"]) if r["mean_hu"] else None} for r in table], expected)
    # The installed `volumevlm` script: a missing input fails in one line, before torch is imported.
    script = shutil.which("volumevlm", path=str(Path(sys.executable).parent))
    assert script is not None, "the volumevlm console script is not installed next to this interpreter"
    missing = tmp_path / "missing_series"
    failed = subprocess.run([script, "report", "-m", str(checkpoints["full"]), "-i", inputs["zip"], str(missing),
                             "-o", str(tmp_path / "r.txt")], capture_output=True, text=True, env=env, timeout=600)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert failed.stderr.strip() == f"error: {missing}: no such file or folder"
    assert not (tmp_path / "r.txt").exists()
    no_temporaries(tmp_path)


# ---------------------------------------------------------------------- DICOM SEG output


def _mask_of_seg(path, volume) -> np.ndarray:
    """The label map a SEG holds, rebuilt by highdicom on the source images of ``volume``
    (its headers in k order; an enhanced CT's frames through its frame order)."""
    import highdicom as hd

    seg = hd.seg.segread(path)
    numbers = seg.get_segment_numbers()
    names = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    source = volume.meta["dicom"]
    if source.enhanced:
        frames = seg.get_pixels_by_source_frame(
            source_sop_instance_uid=source.datasets[0].SOPInstanceUID,
            source_frame_numbers=[f + 1 for f in source.frame_of_k], segment_numbers=numbers,
            combine_segments=True, relabel=False)
    else:
        frames = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[ds.SOPInstanceUID for ds in source.datasets], segment_numbers=numbers,
            combine_segments=True, relabel=False)
    index_of = {name: index for index, name in model_label_names().items()}
    lut = np.zeros(max(numbers) + 1, dtype=np.uint8)
    for number in numbers:
        lut[number] = index_of[names[number]]
    return lut[np.transpose(frames, (2, 1, 0))]


def model_label_names() -> dict[int, str]:
    from volumevlm.data.labels import LABELS

    return dict(LABELS)


def test_segment_as_dicom_seg_cli_equals_the_api_for_classic_zip_and_enhanced(model, checkpoints, inputs, tmp_path, capsys):
    from volumevlm.inference.pipeline import mask_to_dicom_seg
    from volumevlm.io import write_dicom_enhanced

    assert model.head("segmentation").label_names == model_label_names()
    volume = read_volume(inputs["dicom"])
    expected = np.asarray(model.segment(volume).dataobj)
    assert expected.any()  # the SEG must hold frames for the comparison to mean something
    api = tmp_path / "api.dcm"
    mask = model.segment(inputs["dicom"], out=api)
    np.testing.assert_array_equal(np.asarray(mask.dataobj), expected)
    served = tmp_path / "served.dcm"
    served.write_bytes(mask_to_dicom_seg(volume, mask))  # what the HTTP endpoint will send
    cli = tmp_path / "cli.dcm"
    status, stdout, _ = run_cli(capsys, "segment", "-m", checkpoints["full"], "-i", inputs["dicom"], "-o", cli)
    assert status == 0 and str(cli) in stdout
    status, _, _ = run_cli(capsys, "segment", "-m", checkpoints["full"], "-i", inputs["zip"], "--format", "dicom-seg",
                           "-o", tmp_path / "folder")
    assert status == 0
    from_zip = tmp_path / "folder" / "archive.dcm"
    content = seg_content(api)
    assert content["frames"] and content["series"] == volume.meta["series_uid"]
    for other in (served, cli, from_zip):
        assert seg_content(other) == content
    np.testing.assert_array_equal(_mask_of_seg(api, volume), expected)

    # An enhanced CT of the same volume, frames stored out of order: the same mask, its SEG
    # referencing the enhanced object's frames.
    order = np.random.default_rng(4).permutation(volume.shape[2])
    enhanced = write_dicom_enhanced(tmp_path / "enhanced.dcm", volume.array, volume.affine, patient_id="PHANTOM",
                                    frame_order=order)
    enhanced_volume = read_volume(enhanced)
    status, _, _ = run_cli(capsys, "segment", "-m", checkpoints["full"], "-i", enhanced, "-o", tmp_path / "enh_seg.dcm")
    assert status == 0
    np.testing.assert_array_equal(_mask_of_seg(tmp_path / "enh_seg.dcm", enhanced_volume), expected)
    assert seg_content(tmp_path / "enh_seg.dcm")["series"] == enhanced_volume.meta["series_uid"]
    no_temporaries(tmp_path)


def test_dicom_seg_for_an_input_that_was_not_dicom_is_a_one_line_error(model, checkpoints, inputs, tmp_path, capsys):
    full = checkpoints["full"]
    for args, named in (
        (["segment", "-m", full, "-i", inputs["nifti"], "-o", tmp_path / "seg.dcm"], inputs["nifti"]),
        (["segment", "-m", full, "-i", inputs["nifti"], "--format", "dicom-seg", "-o", tmp_path / "out"], inputs["nifti"]),
        (["segment", "-m", full, "-i", inputs["dicom"], "--format", "dicom-seg", "-o", tmp_path / "m.nii.gz"],
         tmp_path / "m.nii.gz"),
    ):
        status, _, stderr = run_cli(capsys, *args)
        lines = stderr.strip().splitlines()
        assert status == 2 and len(lines) == 1 and str(named) in lines[0], (args, stderr)
    assert "needs a DICOM CT input" in run_cli(capsys, "segment", "-m", full, "-i", inputs["nifti"], "-o", tmp_path / "s.dcm")[2]
    with pytest.raises(InputError, match="needs a DICOM CT input .*NIfTI"):
        model.segment(inputs["nifti"], out=tmp_path / "api.dcm")
    assert list(tmp_path.iterdir()) == []
