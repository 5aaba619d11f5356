"""The checkpoint directory: save_pretrained -> volumevlm.load, no network, no pickle,
one-line errors for missing or corrupt directories. Synthetic data, not clinical data."""

from __future__ import annotations

import json
import pickle
import socket
from pathlib import Path

import pytest
import torch

import volumevlm
from pretrain_helpers import make_cohort, shrunk_config
from volumevlm.errors import VolumeVLMError
from volumevlm.models.vlm import VolumeVLM
from volumevlm.train.train import build

REPORTS = ["LIVER AND BILIARY TREE: Moderate hepatic steatosis. IMPRESSION: Steatosis.", "No acute abnormality."]
# Files a checkpoint may hold: weights as safetensors, everything else as text.
ALLOWED_SUFFIXES = {".safetensors", ".json", ".txt", ".yaml", ".model"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model in eval mode, its saved directory): tiny shrunk model with random weights."""
    root = tmp_path_factory.mktemp("ckpt")
    cohort = make_cohort(root / "cohort")
    _, module = build(shrunk_config(cohort, root / "out", "data.cache=false"))
    model = module.model.eval()
    with torch.no_grad():  # make the temperature differ from its initial value
        model.logit_scale.fill_(2.5)
    directory = model.save_pretrained(root / "model", provenance={"data_note": "synthetic-data test"})
    return model, directory


def _images() -> torch.Tensor:
    return torch.rand(2, 1, 32, 32, 16, generator=torch.Generator().manual_seed(0))


def test_save_load_gives_identical_embeddings(saved):
    model, directory = saved
    loaded = volumevlm.load(directory)
    assert isinstance(loaded, VolumeVLM) and not loaded.training
    x = _images()
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), loaded.encode_image(x))
        assert torch.equal(model.encode_text(REPORTS), loaded.encode_text(REPORTS))
        assert torch.equal(model.phenotype_logits(x), loaded.phenotype_logits(x))
        assert torch.equal(model.zero_shot_scores(x), loaded.zero_shot_scores(x))
    assert float(loaded.logit_scale.detach()) == 2.5
    assert loaded.phecode_vocab.codes == model.phecode_vocab.codes
    assert loaded.preprocess == model.preprocess and loaded.findings == model.findings
    assert model.tokenizer(REPORTS[0])["input_ids"] == loaded.tokenizer(REPORTS[0])["input_ids"]


def test_directory_holds_no_pickle_and_describes_itself(saved):
    _, directory = saved
    files = [p for p in Path(directory).rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "config.json", "phecodes.json"}
    assert all(p.suffix in ALLOWED_SUFFIXES for p in files), sorted(p.name for p in files)
    for p in files:
        assert not p.read_bytes().startswith(b"\x80"), f"{p} looks like a pickle"
    config = json.loads((Path(directory) / "config.json").read_text())
    assert config["format"] == "volumevlm-checkpoint"
    assert config["versions"]["volumevlm"] == volumevlm.__version__ and config["versions"]["torch"]
    assert config["preprocess"]["spatial_size"] == [32, 32, 16]
    assert config["provenance"]["data_note"] == "synthetic-data test"
    assert not [p.name for p in Path(directory).parent.iterdir() if p.name.startswith(".model")]  # no temp dirs


def test_load_uses_no_pickle_and_no_network(saved, monkeypatch):
    _, directory = saved

    def refuse(*args, **kwargs):
        raise AssertionError("loading a checkpoint must not unpickle or reach the network")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = volumevlm.load(directory)
    assert model.encode_image(_images()).shape[0] == 2


def test_saving_again_replaces_the_directory_atomically(saved, tmp_path):
    model, _ = saved
    target = tmp_path / "model"
    model.save_pretrained(target)
    (target / "stale.txt").write_text("from an older save")
    model.save_pretrained(target)
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp folders left


def _one_line_error(path) -> str:
    with pytest.raises(VolumeVLMError) as err:
        volumevlm.load(path)
    message = str(err.value)
    assert "\n" not in message and str(Path(path).name) in message
    return message


def test_missing_or_corrupt_directories_fail_in_one_line(saved, tmp_path):
    import shutil

    _, directory = saved
    assert "not found" in _one_line_error(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "config.json" in _one_line_error(empty)

    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(directory, target)
        return target

    truncated = copy("truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "model.safetensors" in _one_line_error(truncated)

    bad_json = copy("bad_json")
    (bad_json / "config.json").write_text("{not json")
    assert "config.json" in _one_line_error(bad_json)

    no_tokenizer = copy("no_tokenizer")
    shutil.rmtree(no_tokenizer / "tokenizer")
    assert "tokenizer" in _one_line_error(no_tokenizer)

    mismatched = copy("mismatched")
    config = json.loads((mismatched / "config.json").read_text())
    config["embed_dim"] = config["embed_dim"] * 2
    (mismatched / "config.json").write_text(json.dumps(config))
    assert "model.safetensors" in _one_line_error(mismatched)
