"""Batch inference (issue 6, section 3): ``volumevlm predict`` through Lightning's
Trainer.predict and a prediction writer; outputs against the model run case by case,
masks in each input's own geometry, resume after an interruption or a lost shard, two
DDP processes, and the errors a wrong checkpoint or output folder gives.

The model is a tiny checkpoint pretrained for one fast_dev_run step on a 12-case
synthetic cohort (NOT clinical data), with a randomly initialised segmentation head
attached: the values mean nothing, so every output is compared with a direct
computation by the same model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import volumevlm
from pretrain_helpers import make_cohort, shrunk_config
from volumevlm.errors import VolumeVLMError
from volumevlm.inference.batch import mask_name, predict, read_predictions

CLI = [sys.executable, "-m", "volumevlm.cli"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(cohort, checkpoint without a head, checkpoint with a segmentation head)."""
    from volumevlm.models.segmentation import SegmentationConfig, SegmentationNet
    from volumevlm.train.train import train

    root = tmp_path_factory.mktemp("predict")
    cohort = make_cohort(root / "cohort")
    _, objects = train(shrunk_config(cohort, root / "pre", "experiment=demo", "debug=fdr"))
    plain = Path(objects["model_dir"])
    model = volumevlm.load(plain)
    torch.manual_seed(0)
    config = SegmentationConfig(feature_size=4, roi_size=model.encoder_config.image_size)
    model.attach_head("segmentation", SegmentationNet.from_encoder(model.encoder, config))
    provenance = json.loads((plain / "config.json").read_text())["provenance"]  # says: synthetic, NOT clinical
    return cohort, plain, model.save_pretrained(root / "with_head", provenance=provenance)


@pytest.fixture(scope="module")
def reference(tiny):
    """What the model gives case by case: {id: (embedding [E], zero-shot [F])}, findings."""
    from volumevlm.text.prompts import load_prompt_set, zero_shot_probabilities

    cohort, plain, _ = tiny
    model = volumevlm.load(plain)
    prompts = load_prompt_set("synthetic")
    out = {}
    with torch.no_grad():
        for row in _rows(cohort):
            x = volumevlm.preprocess(cohort / row["image"], model.preprocess).as_tensor()[None]
            emb = model.encode_image(x)
            probs = zero_shot_probabilities(emb, model.encode_text, prompts, logit_scale=model.scale())
            out[row["id"]] = (emb[0], probs[0])
    return out, prompts.keys


def _rows(cohort: Path) -> list[dict]:
    return [json.loads(line) for line in (cohort / "manifest.jsonl").read_text().splitlines() if line.strip()]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=600)


def _by_id(predictions: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    ids = predictions["ids"]
    assert len(ids) == len(set(ids))  # no case twice
    return {case: (predictions["embeddings"][i], predictions["zero_shot"][i]) for i, case in enumerate(ids)}


def _assert_matches(predictions: dict, reference: dict) -> None:
    got = _by_id(predictions)
    assert sorted(got) == sorted(reference)
    for case, (emb, probs) in reference.items():
        assert torch.allclose(got[case][0], emb, atol=1e-5), case
        assert torch.allclose(got[case][1], probs, atol=1e-5), case


def _run(tiny, out: Path, **kwargs) -> dict:
    cohort, plain, _ = tiny
    settings = dict(num_workers=0, batch_size=2, shard_size=3, accelerator="cpu", devices=1, progress=False)
    return predict(plain, cohort / "manifest.jsonl", out, **{**settings, **kwargs})


# ---------------------------------------------------------------------- the command


def test_predict_writes_embeddings_scores_masks_and_failures(tiny, reference, tmp_path):
    cohort, _, with_head = tiny
    rows = _rows(cohort)
    # One case whose file is not a CT volume: recorded with its one-line error, not fatal.
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti file")
    manifest = tmp_path / "manifest.jsonl"
    extra = {"id": "broken", "image": str(tmp_path / "broken.nii.gz")}
    manifest.write_text("".join(json.dumps({**row, "image": str(cohort / row["image"]), "label": None}) + "\n"
                                for row in rows) + json.dumps(extra) + "\n")
    out = tmp_path / "out"
    summary = predict(with_head, manifest, out, outputs="embeddings,zero_shot,masks", num_workers=0, shard_size=5,
                      accelerator="cpu", devices=1, progress=False)
    assert summary == {"out": str(out.resolve()), "manifest_cases": 13, "already_done": 0, "processed": 13,
                       "rank": 0, "done": 13, "failed": 1}

    predictions = read_predictions(out)
    _assert_matches(predictions, reference[0])  # the head does not change embeddings
    assert predictions["findings"] == reference[1]
    assert predictions["run"]["outputs"] == ["embeddings", "zero_shot", "masks"]
    assert "NOT clinical" in predictions["run"]["data_note"]
    [failure] = predictions["failed"]
    assert failure["id"] == "broken" and str(tmp_path / "broken.nii.gz") in failure["error"] and "\n" not in failure["error"]
    assert len(list(out.glob("shard-r000-*.json"))) == 3  # 13 cases, a shard once it holds >= 5

    from volumevlm.models.segmentation import read_label_names, segment_to_input

    model = volumevlm.load(with_head)
    for row in rows[:4]:  # masks: the head's output, in the input's own voxel grid
        image = nib.load(str(cohort / row["image"]))
        mask = nib.load(predictions["masks"][row["id"]])
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
        expected, names = segment_to_input(model.head("segmentation"), cohort / row["image"], model.preprocess)
        assert np.array_equal(np.asarray(mask.dataobj), np.asarray(expected.dataobj))
        assert read_label_names(mask) == names
    assert sorted(predictions["masks"]) == sorted(row["id"] for row in rows)


def test_masks_without_a_segmentation_head_fail_before_any_work(tiny, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(VolumeVLMError) as err:
        _run(tiny, out, outputs="embeddings,masks")
    message = str(err.value)
    assert "\n" not in message and "no segmentation head" in message and "experiment=segment_demo" in message
    assert not out.exists()
    with pytest.raises(VolumeVLMError, match="subset of"):
        _run(tiny, out, outputs="embeddings,probabilities")


# ---------------------------------------------------------------------- resume


def test_interrupted_and_lost_shards_resume_to_the_same_outputs(tiny, reference, tmp_path):
    out = tmp_path / "out"
    first = _run(tiny, out, limit=5)  # stops after 5 cases, as a run cut short would
    assert (first["processed"], first["done"]) == (5, 5)
    shards = sorted(out.glob("shard-*.json"))
    assert [len(json.loads(p.read_text())["cases"]) for p in shards] == [4, 1]  # batches of 2, shard at >= 3

    second = _run(tiny, out)
    assert (second["already_done"], second["processed"], second["done"]) == (5, 7, 12)
    _assert_matches(read_predictions(out), reference[0])

    # A crash can lose the shard being written: only its cases are computed again.
    last = sorted(out.glob("shard-*.json"))[-1]
    lost = [case["id"] for case in json.loads(last.read_text())["cases"]]
    last.unlink()
    third = _run(tiny, out)
    assert (third["already_done"], third["processed"], third["done"]) == (12 - len(lost), len(lost), 12)
    predictions = read_predictions(out)
    _assert_matches(predictions, reference[0])
    assert predictions["findings"] == reference[1]
    assert _run(tiny, out)["processed"] == 0  # nothing left to do

    # Another model or other outputs must not be mixed into the same folder.
    with pytest.raises(VolumeVLMError, match="outputs") as err:
        _run(tiny, out, outputs="embeddings")
    assert "\n" not in str(err.value)
    cohort, _, with_head = tiny
    model = volumevlm.load(with_head)
    with torch.no_grad():
        next(model.image_projection.parameters()).view(-1)[0] += 0.01
    other = model.save_pretrained(tmp_path / "other")
    with pytest.raises(VolumeVLMError, match="fingerprint"):
        predict(other, cohort / "manifest.jsonl", out, num_workers=0, accelerator="cpu", devices=1, progress=False)

    # A shard someone broke: a one-line error naming it, not silently recomputed or mixed.
    shard = sorted(out.glob("shard-*.json"))[0]
    shard.write_text("{")
    with pytest.raises(VolumeVLMError) as err:
        read_predictions(out)
    assert shard.name in str(err.value) and "\n" not in str(err.value)


def test_cli_with_two_ddp_processes_splits_the_cases_without_duplicates(tiny, reference, tmp_path):
    """The console script in a fresh interpreter (Lightning's DDP launcher starts the
    second process by running the same command line again)."""
    cohort, plain, _ = tiny
    out = tmp_path / "ddp"
    done = _cli("predict", "--checkpoint", str(plain), "--manifest", str(cohort / "manifest.jsonl"), "--out", str(out),
                "--num-workers", "0", "--shard-size", "4", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
                "--no-progress")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"out": str(out.resolve()), "manifest_cases": 12, "already_done": 0,
                                       "processed": 12, "done": 12, "failed": 0}  # one summary, from rank 0
    ranks = {json.loads(p.read_text())["rank"] for p in out.glob("shard-*.json")}
    assert ranks == {0, 1}
    _assert_matches(read_predictions(out), reference[0])


def test_mask_names_are_safe_and_distinct():
    assert mask_name("case_00001") == "masks/case_00001.nii.gz"
    odd = [mask_name("a/b"), mask_name("a_b"), mask_name("a:b"), mask_name("../x"), mask_name(".hidden")]
    assert len(set(odd)) == len(odd)
    assert all(name.startswith("masks/") and "/" not in name[6:] and not name[6:].startswith(".") for name in odd)
