"""The inference verbs on any input (volumevlm.inference.pipeline, VolumeVLM.embed /
zero_shot / phenotypes / similarity_map / segment / generate_report).

One tiny checkpoint per module: a fast_dev_run pretraining on a 12-case synthetic cohort
(NOT clinical data), with a segmentation head and a report head built directly on it and
saved with it. The weights are untrained: the checks are about inputs, geometry,
agreement with hand-computed references and errors, not about quality.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import volumevlm
from ct_files import write_itk, zip_series
from pretrain_helpers import make_checkpoints
from volumevlm.data.transforms import preprocess
from volumevlm.errors import InputError, VolumeVLMError
from volumevlm.io import read_volume
from volumevlm.io.writers import write_dicom_series, write_nifti
from volumevlm.models.report import generate_reports
from volumevlm.models.segmentation import read_label_names, sliding_window_segment
from volumevlm.models.vlm import DEFAULT_PROMPTS, finding_text
from volumevlm.text.prompts import load_prompt_set, zero_shot_probabilities

# name: (spacing per stored axis mm, shape per stored axis, stored axis codes)
GEOMETRIES = {
    "RAS": ((10.0, 12.0, 16.0), (30, 26, 16), "RAS"),
    "LPS": ((10.0, 12.0, 16.0), (30, 26, 16), "LPS"),
    "PSL permuted": ((12.0, 16.0, 10.0), (26, 16, 30), "PSL"),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{"plain": checkpoint without heads, "full": the same with both heads, "root": tmp}."""
    return make_checkpoints(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="module")
def model(checkpoints):
    return volumevlm.load(checkpoints["full"])


def grid_affine(spacing, shape, axcodes: str, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Axis-aligned voxel -> RAS mm affine with the given stored axis codes, centred on ``centre``."""
    axis_of = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for stored, code in enumerate(axcodes):
        affine[axis_of[code], stored] = (1.0 if code in "RAS" else -1.0) * spacing[stored]
    half = affine[:3, :3] @ ((np.asarray(shape, dtype=float) - 1.0) / 2.0)
    affine[:3, 3] = np.asarray(centre) - half
    return affine


def phantom(affine: np.ndarray, shape) -> np.ndarray:
    """HU float32: air with a soft-tissue ellipsoid and a bone blob off every symmetry plane."""
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), axis=-1)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[(((xyz - (0, 0, 0)) / (120.0, 90.0, 100.0)) ** 2).sum(-1) <= 1.0] = 40.0
    hu[(((xyz - (50.0, -30.0, 40.0)) / 25.0) ** 2).sum(-1) <= 1.0] = 700.0
    return hu


@pytest.fixture(scope="module")
def inputs(checkpoints):
    """One phantom stored as every supported input kind (same voxels, same world)."""
    folder = checkpoints["root"] / "inputs"
    folder.mkdir()
    spacing, shape, axcodes = GEOMETRIES["LPS"]
    affine = grid_affine(spacing, shape, axcodes)
    hu = phantom(affine, shape)
    nifti = write_nifti(folder / "ct.nii.gz", hu, affine)
    dicom = write_dicom_series(folder / "series", hu, affine, patient_id="PHANTOM")
    archive = zip_series(dicom, folder / "series.zip")
    return {
        "nifti path": nifti,
        "nibabel image": nib.load(str(nifti)),
        "(array, affine)": (hu, affine),
        "DICOM folder": dicom,
        "DICOM zip": archive,
        "NRRD": write_itk(folder / "ct.nrrd", hu, affine),
        "MHA": write_itk(folder / "ct.mha", hu, affine),
    }


def on_model_grid(model) -> tuple[np.ndarray, np.ndarray]:
    """A phantom stored exactly on the model's preprocessed grid (RAS, target spacing,
    spatial size): the preprocessing and its inverse are identities on it."""
    spacing, shape = model.preprocess.target_spacing, model.preprocess.spatial_size
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -np.asarray(spacing) * (np.asarray(shape) / 2.0)  # ResizeWithPadOrCrop keeps this centre
    return phantom(affine, shape), affine


# ---------------------------------------------------------------------- inputs


def test_every_input_kind_gives_the_same_embedding(model, inputs):
    reference = model.embed(inputs["nifti path"])
    assert reference.shape == (model.embed_dim,)
    assert abs(float(reference.norm()) - 1.0) < 1e-5
    for kind, x in inputs.items():
        emb = model.embed(x)
        # DICOM stores integer HU (the phantom's values are integers): the same voxels.
        torch.testing.assert_close(emb, reference, atol=1e-5, rtol=0, msg=kind)
    x = preprocess(inputs["nifti path"], model.preprocess)
    torch.testing.assert_close(model.embed(x), reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.embed(x.as_tensor()), reference, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x[None].as_tensor())[0], reference, atol=1e-6, rtol=0)
    # A list (and a [B, 1, X, Y, Z] batch) gives one row per input.
    both = model.embed([inputs["DICOM folder"], x])
    assert both.shape == (2, model.embed_dim)
    torch.testing.assert_close(both[1], reference, atol=1e-6, rtol=0)
    batch = torch.stack([x.as_tensor(), x.as_tensor()])
    assert model.embed(batch).shape == (2, model.embed_dim)


def test_zero_shot_equals_the_prompt_set_scorer_by_hand(model, inputs, checkpoints, tmp_path):
    x = preprocess(inputs["nifti path"], model.preprocess)
    prompt_set = load_prompt_set("synthetic")
    with torch.no_grad():
        expected = zero_shot_probabilities(model.encode_image(x[None].as_tensor()), model.encode_text, prompt_set,
                                           logit_scale=model.scale())[0]
    result = model.zero_shot(inputs["nifti path"])
    assert list(result) == prompt_set.keys
    np.testing.assert_allclose(list(result.values()), expected.numpy(), atol=1e-6)
    # Chosen findings, a bundled set by name, and the one-pair templates of zero_shot_scores.
    chosen = model.zero_shot(inputs["nifti path"], findings=["splenomegaly", "gallstones"])
    assert chosen == pytest.approx({k: result[k] for k in ("splenomegaly", "gallstones")}, abs=1e-6)
    pair = model.zero_shot(x, prompts=DEFAULT_PROMPTS)
    with torch.no_grad():
        image_emb = model.encode_image(x[None].as_tensor())
        by_hand = torch.stack([
            torch.sigmoid(model.scale() * (image_emb[0] @ model.encode_text([DEFAULT_PROMPTS[0].format(finding=finding_text(k))])[0]
                                           - image_emb[0] @ model.encode_text([DEFAULT_PROMPTS[1].format(finding=finding_text(k))])[0]))
            for k in model.findings])
        from_model = model.zero_shot_scores(x[None].as_tensor(), prompts=DEFAULT_PROMPTS)[0]
        # The model's own default is the same rule and prompt set as the pipeline's.
        model_default = model.zero_shot_scores(x[None].as_tensor())[0]
    np.testing.assert_allclose([pair[k] for k in model.findings], by_hand.numpy(), atol=1e-5)
    np.testing.assert_allclose(from_model.numpy(), by_hand.numpy(), atol=1e-5)
    np.testing.assert_allclose(model_default.numpy(), [result[k] for k in model.findings], atol=1e-6)
    # A set's finding may be named in plain English; one outside the set is scored with
    # the generic templates only.
    spelled = model.zero_shot(x, findings=["pleural effusion"])
    assert spelled["pleural effusion"] == pytest.approx(result["pleural_effusion"], abs=1e-6)
    free = model.zero_shot(x, findings=["pneumoperitoneum"])
    texts = [t.format(finding="pneumoperitoneum") for t in prompt_set.templates["positive"] + prompt_set.templates["negative"]]
    with torch.no_grad():
        emb = F.normalize(model.encode_text([t[:1].upper() + t[1:] for t in texts]), dim=-1)
        image = model.encode_image(x[None].as_tensor())[0]
        n = len(prompt_set.templates["positive"])
        pos, neg = F.normalize(emb[:n].mean(0), dim=-1), F.normalize(emb[n:].mean(0), dim=-1)
        by_hand = torch.sigmoid(model.scale() * (image @ pos - image @ neg))
    assert free["pneumoperitoneum"] == pytest.approx(float(by_hand), abs=1e-5)
    # A prompt set saved with the checkpoint is the default.
    saved = tmp_path / "ckpt"
    shutil.copytree(checkpoints["full"], saved)
    config = json.loads((saved / "config.json").read_text())
    config["prompt_set"] = "merlin30"
    (saved / "config.json").write_text(json.dumps(config))
    assert list(volumevlm.load(saved).zero_shot(x)) == load_prompt_set("merlin30").keys


def test_phenotypes_are_sorted_sigmoid_logits_with_descriptions(model, inputs):
    x = preprocess(inputs["nifti path"], model.preprocess)
    with torch.no_grad():
        probs = torch.sigmoid(model.phenotype_logits(x[None].as_tensor())[0])
    top = model.phenotypes(inputs["nifti path"], top_k=3)
    assert len(top) == 3
    order = torch.argsort(probs, descending=True).tolist()[:3]
    assert [code for code, _, _ in top] == [model.phecode_vocab.codes[i] for i in order]
    for code, description, p in top:
        assert p == pytest.approx(float(probs[model.phecode_vocab.index(code)]), abs=1e-6)
        assert description == model.phecode_vocab.description(code) and description
    everything = model.phenotypes(x, top_k=None)
    assert len(everything) == len(model.phecode_vocab.codes)
    assert [p for _, _, p in everything] == sorted((p for _, _, p in everything), reverse=True)
    assert len(model.phenotypes([x, x], top_k=2)) == 2


# ---------------------------------------------------------------------- geometry


def _write(kind: str, folder: Path, hu: np.ndarray, affine: np.ndarray):
    if kind == "DICOM series":
        return write_dicom_series(folder / "series", hu, affine, patient_id="PHANTOM")
    return write_nifti(folder / f"{kind.replace(' ', '_')}.nii.gz", hu, affine)


@pytest.mark.parametrize("stored_as", [*GEOMETRIES, "DICOM series"])
def test_maps_come_back_in_the_inputs_own_geometry(model, stored_as, tmp_path):
    spacing, shape, axcodes = GEOMETRIES.get(stored_as, GEOMETRIES["PSL permuted"])
    affine = grid_affine(spacing, shape, axcodes, centre=(7.0, -5.0, 3.0))
    path = _write(stored_as, tmp_path, phantom(affine, shape), affine)
    volume = read_volume(path)
    sim = model.similarity_map(path, "splenomegaly", out=tmp_path / "sim.nii.gz")
    mask = model.segment(path, out=tmp_path / "mask.nii.gz")
    for image in (sim, mask):
        assert image.shape == volume.shape
        np.testing.assert_allclose(image.affine, volume.affine, atol=1e-4)
    values = sim.get_fdata()
    assert sim.get_data_dtype() == np.float32 and np.isfinite(values).all()
    assert -1.0 - 1e-6 <= values.min() and values.max() <= 1.0 + 1e-6 and np.abs(values).max() > 0
    labels = np.asarray(mask.dataobj)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= set(model.head("segmentation").label_names)
    assert read_label_names(mask) == model.head("segmentation").label_names
    # Written atomically, nothing left behind, and they read back unchanged.
    np.testing.assert_array_equal(nib.load(str(tmp_path / "sim.nii.gz")).get_fdata(), values)
    assert read_label_names(tmp_path / "mask.nii.gz") == model.head("segmentation").label_names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_similarity_map_is_the_token_cosine_with_the_text_direction(model, tmp_path):
    """On an input stored exactly on the model's grid, every voxel of a patch holds the
    cosine of that patch's projected token with the finding's (positive - negative)
    prompt direction, computed here by hand."""
    hu, affine = on_model_grid(model)
    path = write_nifti(tmp_path / "grid.nii.gz", hu, affine)
    x = preprocess(path, model.preprocess)
    np.testing.assert_allclose(x.affine.numpy(), affine, atol=1e-4)
    positives, negatives = load_prompt_set("synthetic").texts("hepatomegaly")
    with torch.no_grad():
        out = model.encoder(x[None].as_tensor())
        tokens = F.normalize(model.image_projection(out.tokens)[0], dim=-1)
        text = F.normalize(model.encode_text(positives + negatives), dim=-1)
    direction = F.normalize(text[: len(positives)].mean(0), dim=-1) - F.normalize(text[len(positives):].mean(0), dim=-1)
    cosine = (tokens @ F.normalize(direction, dim=-1)).reshape(out.grid).numpy()
    patch = model.encoder_config.patch_size
    expected = cosine.repeat(patch[0], 0).repeat(patch[1], 1).repeat(patch[2], 2)[: hu.shape[0], : hu.shape[1], : hu.shape[2]]
    nearest = model.similarity_map(path, "hepatomegaly", upsample="nearest").get_fdata()
    np.testing.assert_allclose(nearest, expected, atol=1e-5)
    # One token by hand: the patch at grid (1, 2, 3).
    i, j, k = 1, 2, 3
    block = nearest[i * patch[0]:(i + 1) * patch[0], j * patch[1]:(j + 1) * patch[1], k * patch[2]:(k + 1) * patch[2]]
    assert np.allclose(block, cosine[i, j, k], atol=1e-5)
    # Trilinear upsampling stays within the token values and follows them.
    linear = model.similarity_map(path, "hepatomegaly").get_fdata()
    assert cosine.min() - 1e-5 <= linear.min() and linear.max() <= cosine.max() + 1e-5
    assert np.corrcoef(linear.ravel(), nearest.ravel())[0, 1] > 0.8
    # A preprocessed tensor gives the map on its own grid (its MetaTensor affine).
    from_tensor = model.similarity_map(x, "hepatomegaly", upsample="nearest")
    np.testing.assert_allclose(from_tensor.affine, affine, atol=1e-4)
    np.testing.assert_allclose(from_tensor.get_fdata(), expected, atol=1e-5)


def test_segment_is_the_heads_sliding_window_mask(model, tmp_path):
    hu, affine = on_model_grid(model)
    path = write_nifti(tmp_path / "grid.nii.gz", hu, affine)
    x = preprocess(path, model.preprocess)
    with torch.no_grad():
        by_hand = sliding_window_segment(model.head("segmentation").eval(), x.as_tensor())[0].numpy()
    mask = model.segment(path)
    np.testing.assert_array_equal(np.asarray(mask.dataobj), by_hand)
    from_tensor = model.segment(x)
    np.testing.assert_array_equal(np.asarray(from_tensor.dataobj), by_hand)
    np.testing.assert_allclose(from_tensor.affine, affine, atol=1e-4)
    assert read_label_names(from_tensor) == model.head("segmentation").label_names
    masks = model.segment([path, x], out=tmp_path / "masks")
    assert len(masks) == 2 and len(list((tmp_path / "masks").glob("*.nii.gz"))) == 2


def test_generate_report_writes_organ_sections_deterministically(model, inputs):
    text = model.generate_report(inputs["nifti path"])
    assert isinstance(text, str) and text.startswith("FINDINGS:")
    x = preprocess(inputs["nifti path"], model.preprocess)
    assert generate_reports(model, x[None].as_tensor()) == [text]
    assert model.generate_report([inputs["DICOM zip"], x]) == [text, text]


# ---------------------------------------------------------------------- errors


def _one_line(call) -> str:
    with pytest.raises(VolumeVLMError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and message
    return message


def test_bad_inputs_and_missing_heads_fail_in_one_line(model, checkpoints, tmp_path):
    missing = tmp_path / "nope.nii.gz"
    assert str(missing) in _one_line(lambda: model.embed(missing))
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not an image")
    assert str(garbage) in _one_line(lambda: model.zero_shot(garbage))
    assert str(missing) in _one_line(lambda: model.embed([torch.rand(1, 8, 8, 8), missing]))
    assert "bare array" in _one_line(lambda: model.embed(np.zeros((8, 8, 8), dtype=np.float32)))
    assert "HU" in _one_line(lambda: model.embed(torch.full((1, 8, 8, 8), -1000.0)))
    assert "[1, X, Y, Z]" in _one_line(lambda: model.embed(torch.rand(8, 8, 8)))
    assert "floating point" in _one_line(lambda: model.embed(torch.ones(1, 8, 8, 8, dtype=torch.int64)))
    assert "unsupported input type" in _one_line(lambda: model.embed(42))
    assert "top_k" in _one_line(lambda: model.phenotypes(torch.rand(1, 8, 8, 8), top_k=0))
    assert "not found" in _one_line(lambda: model.zero_shot(torch.rand(1, 8, 8, 8), prompts="no_such_set"))
    assert isinstance(pytest.raises(InputError, model.embed, missing).value, InputError)
    plain = volumevlm.load(checkpoints["plain"])
    x = torch.rand(1, 8, 8, 8)
    message = _one_line(lambda: plain.segment(x))
    assert "no segmentation head" in message and "segment_demo" in message
    assert "no report head" in _one_line(lambda: plain.generate_report(x))
