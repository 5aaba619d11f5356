"""Text side of VolumeVLM: WordPiece tokenizer, phecode vocabulary, text tower.

The report texts here are short made-up snippets in the style of the synthetic
cohort's reports (NOT clinical data).
"""

from __future__ import annotations

import json
import socket

import pytest
import torch

from volumevlm.errors import VolumeVLMError
from volumevlm.models.text import TextConfig, TextTower
from volumevlm.text.tokenizer import SPECIAL_TOKENS, build_wordpiece_tokenizer
from volumevlm.text.vocab import PhecodeVocabulary

REPORTS = [
    "FINDINGS:\nLIVER AND BILIARY TREE: The liver is enlarged, with a 2.3 cm hypodense lesion.",
    "KIDNEYS AND URETERS: Simple renal cyst in the left kidney. No hydronephrosis.",
    "GALLBLADDER: Cholelithiasis without cholecystitis.\nIMPRESSION: Gallstones.",
    "PANCREAS: Unremarkable. SPLEEN: Normal in size.",
    "LOWER THORAX: Small bilateral pleural effusions. VASCULATURE: Aortic calcification.",
    "No acute abnormality in the abdomen or pelvis.",
]
TINY = dict(dim=32, depth=2, heads=4, max_length=64)


@pytest.fixture(scope="module")
def tokenizer():
    return build_wordpiece_tokenizer(REPORTS, vocab_size=120)


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


@pytest.fixture
def no_network(monkeypatch):
    """HF offline mode plus a socket that refuses to connect: any download attempt fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("the test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------------- tokenizer


def test_tokenizer_specials_lowercase_and_cls_sep(tokenizer):
    vocab = tokenizer.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id) == (0, 1)
    assert (tokenizer.cls_token, tokenizer.sep_token, tokenizer.mask_token) == ("[CLS]", "[SEP]", "[MASK]")
    assert len(tokenizer) <= 120
    ids = tokenizer("The LIVER")["input_ids"]
    assert ids[0] == vocab["[CLS]"] and ids[-1] == vocab["[SEP]"]
    assert ids == tokenizer("the liver")["input_ids"]  # uncased
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "the", "liver", "[SEP]"]
    # A word made of seen characters splits into "##" pieces; unseen characters are [UNK].
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("reviver zebra€ ✓")["input_ids"])[1:-1]
    assert "[UNK]" in pieces and any(p.startswith("##") for p in pieces)
    assert tokenizer.decode(tokenizer("renal cyst")["input_ids"], skip_special_tokens=True) == "renal cyst"


def test_tokenizer_is_deterministic(tokenizer):
    # tokenizers' own trainer gives different vocabularies run to run on ties
    # (huggingface/tokenizers#1794); a vocabulary of 60 forces many ties.
    texts = REPORTS * 2
    first = build_wordpiece_tokenizer(texts, vocab_size=60).backend_tokenizer.to_str()
    for _ in range(5):
        assert build_wordpiece_tokenizer(texts, vocab_size=60).backend_tokenizer.to_str() == first
    assert build_wordpiece_tokenizer(REPORTS, vocab_size=120).get_vocab() == tokenizer.get_vocab()


def test_tokenizer_round_trips_through_save_pretrained(tokenizer, tmp_path, no_network):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(str(tmp_path / "tok"))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    probe = [*REPORTS, "Unknown words: xylophone, 42 mm, ÆØÅ."]
    assert loaded(probe, padding=True)["input_ids"] == tokenizer(probe, padding=True)["input_ids"]
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.pad_token_id, loaded.cls_token_id, loaded.sep_token_id) == (0, 2, 3)


@pytest.mark.parametrize("texts", [[], ["", "   \n"]])
def test_tokenizer_rejects_empty_input(texts):
    with pytest.raises(VolumeVLMError) as excinfo:
        build_wordpiece_tokenizer(texts)
    assert "no non-empty text" in _one_line(excinfo)


def test_tokenizer_rejects_non_strings():
    with pytest.raises(VolumeVLMError) as excinfo:
        build_wordpiece_tokenizer(["fine", None])
    assert "item 1" in _one_line(excinfo)


# ---------------------------------------------------------------------- phecode vocabulary

CASES = [
    ["594.1", "250.2"],
    ["250.2", "250.2", "070.3"],  # a code twice in one case counts once
    ["1000"],  # not in the bundled table
    ["594.1", " 1000 "],
    [],
]


def test_vocab_build_counts_and_numeric_order():
    vocab = PhecodeVocabulary.build(CASES)
    # Numeric order: 70.3 < 250.2 < 594.1 < 1000 (string order would put "1000" second).
    assert vocab.codes == ["070.3", "250.2", "594.1", "1000"]
    assert vocab.counts == {"070.3": 1, "250.2": 2, "594.1": 2, "1000": 2}
    assert len(vocab) == 4
    frequent = PhecodeVocabulary.build(CASES, min_count=2)
    assert frequent.codes == ["250.2", "594.1", "1000"]
    assert PhecodeVocabulary.build(CASES, min_count=3).codes == []


def test_vocab_prevalence_counts_coded_cases_only():
    vocab = PhecodeVocabulary.build([*CASES, None], min_count=2)  # None: a case without codes
    # 4 of the 6 cases carry a code: the empty list and None are not coded cases.
    assert vocab.cases == 4
    expected = {"250.2": 2.5 / 5, "594.1": 2.5 / 5, "1000": 2.5 / 5}
    assert vocab.prevalence() == pytest.approx([expected[c] for c in vocab.codes])
    rare = PhecodeVocabulary.build([["1"], ["2"], ["2"], ["2"]])
    assert rare.prevalence() == pytest.approx([1.5 / 5, 3.5 / 5])
    # Written before `cases` was recorded: no prevalence, and the head keeps zero biases.
    legacy = json.loads(vocab.to_json())
    del legacy["cases"]
    assert PhecodeVocabulary.from_json(json.dumps(legacy)).prevalence() is None
    assert PhecodeVocabulary.from_json(vocab.to_json()).cases == 4


def test_phenotype_head_starts_at_the_training_prevalence():
    from volumevlm.models.heads import PhenotypeHead

    share = [0.05, 0.5, 0.9]
    head = PhenotypeHead(8, 3, share)
    with torch.no_grad():
        head.fc.weight.zero_()  # what remains is the bias: the prior
        probs = torch.sigmoid(head(torch.randn(4, 8)))
    assert torch.allclose(probs, torch.tensor(share).expand(4, 3), atol=1e-6)
    assert torch.equal(PhenotypeHead(8, 3).fc.bias, torch.zeros(3))
    with pytest.raises(ValueError, match="prevalence"):
        PhenotypeHead(8, 3, [0.1, 1.0, 0.2])


def test_vocab_encode_decode_and_descriptions():
    vocab = PhecodeVocabulary.build(CASES, min_count=2)  # ["250.2", "594.1", "1000"]
    assert vocab.encode(["594.1", "999.9", "1000"]) == [0.0, 1.0, 1.0]
    assert vocab.encode([]) == [0.0, 0.0, 0.0]
    assert vocab.encode(["070.3"]) == [0.0, 0.0, 0.0]  # below min_count: ignored
    assert vocab.decode([0.2, 0.7, 0.5]) == ["594.1", "1000"]
    assert vocab.decode(torch.tensor([0.9, 0.1, 0.1]), threshold=0.95) == []
    assert vocab.description("594.1") == "Calculus of kidney"
    assert vocab.description("1000") == ""
    with pytest.raises(VolumeVLMError):
        vocab.decode([1.0])


def test_vocab_json_round_trip():
    vocab = PhecodeVocabulary.build(CASES, min_count=2)
    text = vocab.to_json()
    data = json.loads(text)
    assert data["codes"] == ["250.2", "594.1", "1000"]
    assert data["min_count"] == 2
    assert data["descriptions"]["594.1"] == "Calculus of kidney" and data["descriptions"]["1000"] == ""
    loaded = PhecodeVocabulary.from_json(text)
    assert loaded == vocab and loaded.codes == vocab.codes and loaded.counts == vocab.counts
    assert loaded.encode(["1000"]) == [0.0, 0.0, 1.0]
    # Column order is what was stored, never re-sorted.
    data["codes"] = ["1000", "250.2"]
    assert PhecodeVocabulary.from_json(json.dumps(data)).codes == ["1000", "250.2"]


def test_empty_vocab_works():
    vocab = PhecodeVocabulary.build([[], []])
    assert vocab.codes == [] and len(vocab) == 0
    assert vocab.encode(["594.1"]) == []
    assert vocab.decode([]) == []
    assert torch.as_tensor(vocab.encode(["594.1"]), dtype=torch.float32).shape == (0,)
    assert PhecodeVocabulary.from_json(vocab.to_json()).codes == []


@pytest.mark.parametrize(
    "text, needle",
    [
        ("{not json", "unreadable"),
        ("[1, 2]", "expected an object"),
        ('{"codes": "594.1"}', "'codes' must be a list"),
        ('{"codes": ["594.1"], "counts": {"594.1": "two"}}', "'counts'"),
        ('{"codes": ["594.1", "594.1"]}', "duplicate"),
        ('{"codes": ["594.1"], "cases": -1}', "'cases'"),
        ('{"codes": ["594.1"], "counts": {"594.1": 3}, "cases": 2}', "more cases"),
    ],
)
def test_vocab_malformed_json_is_one_line(text, needle):
    with pytest.raises(VolumeVLMError) as excinfo:
        PhecodeVocabulary.from_json(text)
    assert needle in _one_line(excinfo)


# ---------------------------------------------------------------------- text tower


def test_text_config_round_trips_through_asdict():
    from dataclasses import asdict

    config = TextConfig(pretrained="/some/dir", pooling="mean", sections=True, **TINY)
    assert TextConfig(**asdict(config)) == config
    assert json.loads(json.dumps(asdict(config)))["pooling"] == "mean"
    with pytest.raises(VolumeVLMError) as excinfo:
        TextConfig(pooling="max")
    assert "pooling" in _one_line(excinfo)
    with pytest.raises(VolumeVLMError) as excinfo:
        TextConfig(pooled_norm="layer")
    assert "pooled_norm" in _one_line(excinfo) and "'layer'" in _one_line(excinfo)


def test_tower_from_config_shapes(tokenizer):
    torch.manual_seed(0)
    tower = TextTower(TextConfig(**TINY), tokenizer).eval()
    bert = tower.model.config
    assert (bert.hidden_size, bert.num_hidden_layers, bert.num_attention_heads, bert.intermediate_size) == (32, 2, 4, 128)
    assert bert.vocab_size == len(tokenizer) != TextConfig().vocab_size  # the tokenizer's real size
    assert bert.pad_token_id == tokenizer.pad_token_id and bert.max_position_embeddings >= 64
    assert tower.embed_dim == 32 and tower.model.pooler is None
    tokens = tower.tokenize(REPORTS)
    assert set(tokens) == {"input_ids", "attention_mask"}
    assert tokens["input_ids"].dtype == torch.long and tokens["attention_mask"].dtype == torch.long
    assert tokens["input_ids"].shape == tokens["attention_mask"].shape and tokens["input_ids"].shape[0] == len(REPORTS)
    out = tower(tokens["input_ids"], tokens["attention_mask"])
    assert out.shape == (len(REPORTS), 32) and out.dtype == torch.float32
    # Truncation at max_length.
    long = tower.tokenize(["liver " * 500])
    assert long["input_ids"].shape == (1, 64) and long["input_ids"][0, -1].item() == tokenizer.sep_token_id
    # Every parameter gets a gradient (DDP needs no unused parameters).
    tower.train()
    tower(tokens["input_ids"], tokens["attention_mask"]).sum().backward()
    assert all(p.grad is not None for p in tower.parameters())


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_tower_padding_invariance(tokenizer, pooling):
    torch.manual_seed(1)
    tower = TextTower(TextConfig(pooling=pooling, **TINY), tokenizer).eval()
    short = "No acute abnormality."
    batch = tower.tokenize([REPORTS[0], short])
    assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]  # really padded
    with torch.no_grad():
        together = tower(**batch)[1]
        alone = tower(**tower.tokenize([short]))[0]
    assert torch.allclose(together, alone, atol=1e-5, rtol=0)
    if pooling == "mean":
        # Independent reference: average the hidden states of the real tokens by hand.
        alone_tokens = tower.tokenize([short])
        with torch.no_grad():
            hidden = tower.model(**alone_tokens).last_hidden_state[0]
        assert torch.allclose(alone, hidden.mean(dim=0), atol=1e-6)


def test_tower_pooled_batch_norm_standardizes_over_the_batch_and_keeps_its_statistics(tokenizer, tmp_path, no_network):
    torch.manual_seed(4)
    plain = TextTower(TextConfig(pooling="mean", **TINY), tokenizer)
    normed = TextTower(TextConfig(pooling="mean", pooled_norm="batch", **TINY), tokenizer)
    assert isinstance(plain.pooled_norm, torch.nn.Identity)
    normed.model.load_state_dict(plain.model.state_dict())  # the same encoder, with and without the norm
    tokens = plain.tokenize(REPORTS)
    plain.eval()
    with torch.no_grad():
        pooled = plain(**tokens)
    # Training: each feature standardized with the batch's own mean and (biased) variance.
    normed.train()
    normed.model.eval()  # no dropout, so the pooled vectors are exactly `pooled`
    out = normed(**tokens)
    expected = (pooled - pooled.mean(0)) / torch.sqrt(pooled.var(0, unbiased=False) + normed.pooled_norm.eps)
    assert torch.allclose(out, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(out, pooled, atol=1e-2)
    out.sum().backward()
    assert normed.pooled_norm.weight.grad is not None  # learnable affine, in the graph
    # Evaluation uses the running statistics, which a rebuilt tower gets from the state dict.
    normed.eval()
    with torch.no_grad():
        evaluated = normed(**tokens)
    stats = normed.pooled_norm
    assert torch.allclose(evaluated, (pooled - stats.running_mean) / torch.sqrt(stats.running_var + stats.eps), atol=1e-4)
    normed.save(tmp_path / "text")
    assert json.loads((tmp_path / "text" / "tower.json").read_text())["text_config"]["pooled_norm"] == "batch"
    rebuilt = TextTower.load(tmp_path / "text", tokenizer).eval()
    rebuilt.load_state_dict(normed.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(**tokens), evaluated)


def test_tower_save_load_rebuilds_the_same_model(tokenizer, tmp_path, no_network):
    torch.manual_seed(2)
    tower = TextTower(TextConfig(pooling="mean", **TINY), tokenizer).eval()
    tower.save(tmp_path / "text")
    saved = json.loads((tmp_path / "text" / "tower.json").read_text())
    assert saved["text_config"]["pooling"] == "mean"
    assert not list((tmp_path / "text").glob("*.safetensors")) and not list((tmp_path / "text").glob("*.bin"))
    rebuilt = TextTower.load(tmp_path / "text", tokenizer).eval()
    assert rebuilt.config == tower.config
    tokens = tower.tokenize(REPORTS)
    with torch.no_grad():
        before = rebuilt(**tokens)
        assert not torch.allclose(before, tower(**tokens))  # fresh weights until the state dict comes
        result = rebuilt.load_state_dict(tower.state_dict(), strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        assert torch.equal(rebuilt(**tokens), tower(**tokens))


def test_tower_load_rejects_a_folder_without_description(tokenizer, tmp_path):
    with pytest.raises(VolumeVLMError) as excinfo:
        TextTower.load(tmp_path, tokenizer)
    assert "tower.json" in _one_line(excinfo)


def _save_local_hf_encoder(folder):
    """A tiny random BERT plus its tokenizer, saved the way Hugging Face models are shipped."""
    from transformers import BertConfig, BertModel

    tok = build_wordpiece_tokenizer(REPORTS, vocab_size=100)
    torch.manual_seed(3)
    config = BertConfig(
        vocab_size=len(tok) + 7,  # shipped embeddings may have spare rows
        hidden_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=40,
        pad_token_id=tok.pad_token_id,
    )
    model = BertModel(config).eval()  # with its pooler, as released checkpoints have
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return model


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_tower_from_local_pretrained_directory(tmp_path, no_network, pooling):
    from transformers import AutoTokenizer

    folder = tmp_path / "tiny-bert"
    reference = _save_local_hf_encoder(folder)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    tower = TextTower(TextConfig(pretrained=str(folder), pooling=pooling, max_length=256), tok).eval()
    assert tower.embed_dim == 24
    assert tower.max_length == 40  # limited by the model's position table
    tokens = tower.tokenize(REPORTS)
    with torch.no_grad():
        hidden = reference(**tokens).last_hidden_state
        expected = hidden[:, 0] if pooling == "cls" else (
            (hidden * tokens["attention_mask"][..., None]).sum(1) / tokens["attention_mask"].sum(1, keepdim=True)
        )
        assert torch.allclose(tower(**tokens), expected, atol=1e-6, rtol=0)
    for name, param in reference.named_parameters():
        if not name.startswith("pooler."):
            assert torch.equal(tower.model.get_parameter(name), param), name

    # A checkpoint of such a tower rebuilds without the original directory.
    tower.save(tmp_path / "text")
    rebuilt = TextTower.load(tmp_path / "text", tok).eval()
    rebuilt.load_state_dict(tower.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(**tokens), tower(**tokens))


def test_missing_pretrained_directory_is_one_line(tokenizer, tmp_path, no_network):
    with pytest.raises(VolumeVLMError) as excinfo:
        TextTower(TextConfig(pretrained=str(tmp_path / "nowhere")), tokenizer)
    assert "nowhere" in _one_line(excinfo) and "not found" in str(excinfo.value)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(VolumeVLMError) as excinfo:
        TextTower(TextConfig(pretrained=str(tmp_path / "broken")), tokenizer)
    assert "broken" in _one_line(excinfo)


def test_tokenizer_larger_than_model_is_refused(tmp_path, no_network):
    folder = tmp_path / "tiny-bert"
    _save_local_hf_encoder(folder)
    big = build_wordpiece_tokenizer(REPORTS * 3 + ["zebra quagga okapi narwhal"], vocab_size=400)
    with pytest.raises(VolumeVLMError) as excinfo:
        TextTower(TextConfig(pretrained=str(folder)), big)
    assert "tokenizer" in _one_line(excinfo)
