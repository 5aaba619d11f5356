"""Report generation head (volumevlm.models.report) and its training task (volumevlm.train.report).

Everything runs on a tiny VolumeVLM exported by a fast_dev_run pretraining over a
12-case synthetic cohort (NOT clinical data; 32x32x16 volumes), so the encoder is
untrained: the checks are about plumbing, determinism, checkpoints and the ability of
the head to learn, not about report quality.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import volumevlm
from pretrain_helpers import make_cohort, shrunk_config
from volumevlm.errors import VolumeVLMError
from volumevlm.models.anatomy import organ_statistics_width
from volumevlm.models.report import (
    IGNORE_INDEX,
    ReportConfig,
    ReportGenerator,
    VisualResampler,
    encoder_features,
    generate_reports,
    section_pairs,
    tidy_wordpiece_text,
)
from volumevlm.text import label_findings
from volumevlm.text.labeler import SYNTHETIC_FINDINGS
from volumevlm.text.sections import IMPRESSION_HEADER, SECTIONS, split_report

# Small enough for a few seconds of CPU; dropout off so the overfit check is quick and exact.
TINY_HEAD = {
    "num_visual_tokens": 8,
    "resampler_depth": 1,
    "resampler_heads": 2,
    "resampler_dropout": 0.0,
    "n_layer": 2,
    "n_embd": 64,
    "n_head": 2,
    "n_positions": 128,
    "dropout": 0.0,
    "max_target_tokens": 48,
    "max_new_tokens": 48,
}
OVERFIT_STEPS = 150
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return make_cohort(tmp_path_factory.mktemp("cohort"))


@pytest.fixture(scope="module")
def pretrained(cohort, tmp_path_factory) -> Path:
    """A loadable (untrained) VolumeVLM checkpoint directory from a fast_dev_run."""
    from volumevlm.train.train import train

    out = tmp_path_factory.mktemp("pretrain")
    train(shrunk_config(cohort, out, "experiment=demo", "debug=fdr"))
    return out / "model"


@pytest.fixture(scope="module")
def train_cases(pretrained, cohort):
    """Three training cases: preprocessed images [3, 1, 32, 32, 16], reports, encoder tokens."""
    from volumevlm.data.datasets import PretrainDataset
    from volumevlm.data.manifest import read_manifest

    model = volumevlm.load(pretrained)
    rows = [row for row in read_manifest(cohort / "manifest.jsonl").rows if row["split"] == "train"][:3]
    data = PretrainDataset(rows, model.preprocess)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    with torch.no_grad():
        tokens, grid = encoder_features(model.encoder(images))
    return {"images": images, "reports": [row["report"] for row in rows], "tokens": tokens, "grid": grid}


def batch_of(generator, cases):
    from volumevlm.train.report import ReportCollate

    items = [{"tokens": t, "grid": cases["grid"], "report": r, "id": str(i)}
             for i, (t, r) in enumerate(zip(cases["tokens"], cases["reports"]))]
    return ReportCollate(generator)(items)


def loss_of(generator, batch) -> torch.Tensor:
    return generator(batch["tokens"], batch["input_ids"], batch["attention_mask"], batch["labels"],
                     grid=batch["grid"], case_index=batch["case_index"])


@pytest.fixture(scope="module")
def overfit(pretrained, train_cases):
    """A head trained for OVERFIT_STEPS full-batch steps on the three cases."""
    torch.manual_seed(0)
    model = volumevlm.load(pretrained)
    generator = ReportGenerator.build(TINY_HEAD, model)
    batch = batch_of(generator, train_cases)
    optimizer = torch.optim.AdamW(generator.parameters(), lr=3e-3)
    losses = []
    generator.train()
    for _ in range(OVERFIT_STEPS):
        loss = loss_of(generator, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    generator.eval()
    texts = generator.generate(train_cases["tokens"], grid=train_cases["grid"])
    return {"model": model, "generator": generator, "losses": losses, "texts": texts}


def present(report: str) -> set[str]:
    return {k for k, v in label_findings(report, SYNTHETIC_FINDINGS).items() if v != "negative"}


# ---------------------------------------------------------------------- the head


def test_targets_mask_prompt_and_padding(pretrained):
    generator = ReportGenerator.build(TINY_HEAD, volumevlm.load(pretrained))
    enc = generator.encode_targets(["No ascites.", "Splenomegaly, measuring 15 cm."], ["PERITONEUM:", "SPLEEN:"])
    ids, mask, labels = enc["input_ids"], enc["attention_mask"], enc["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 2
    prompt = generator._encode("PERITONEUM:")
    body = generator._encode("No ascites.")
    row = [generator.bos_id, *prompt, *body, generator.eos_id]
    assert ids[0, : len(row)].tolist() == row and mask[0].sum() == len(row)
    # Loss only on the report tokens and EOS: BOS, the prompt and the padding are ignored.
    assert labels[0, : 1 + len(prompt)].tolist() == [IGNORE_INDEX] * (1 + len(prompt))
    assert labels[0, 1 + len(prompt) : len(row)].tolist() == [*body, generator.eos_id]
    assert (labels[0, len(row) :] == IGNORE_INDEX).all() and (ids[0, len(row) :] == generator.pad_id).all()
    assert generator.decode([*body, generator.eos_id, *body]) == "No ascites."
    # The VLM's own WordPiece tokenizer: [CLS] begins, [SEP] ends, [PAD] pads.
    vocab = generator.tokenizer.get_vocab()
    assert (generator.bos_id, generator.eos_id, generator.pad_id) == (vocab["[CLS]"], vocab["[SEP]"], vocab["[PAD]"])


def test_forward_loss_is_finite_and_starts_near_uniform(pretrained, train_cases):
    torch.manual_seed(0)
    generator = ReportGenerator.build(TINY_HEAD, volumevlm.load(pretrained))
    batch = batch_of(generator, train_cases)
    # One text row per (case, section present), each pointing at its case.
    assert batch["case_index"].tolist() == sorted(batch["case_index"].tolist())
    assert set(batch["case_index"].tolist()) == {0, 1, 2}
    assert len(batch["case_index"]) == sum(len(generator.training_texts(r)) for r in train_cases["reports"])
    loss = loss_of(generator, batch)
    assert torch.isfinite(loss)
    # A fresh decoder predicts close to uniformly over its vocabulary.
    assert abs(float(loss.detach()) - math.log(len(generator.tokenizer))) < 1.0
    loss.backward()
    assert generator.resampler.queries.grad.abs().sum() > 0
    assert generator.decoder.get_input_embeddings().weight.grad.abs().sum() > 0


def test_resampler_gives_a_fixed_budget_of_visual_tokens():
    resampler = VisualResampler(in_dim=32, out_dim=48, num_queries=5, depth=1, heads=2)
    for grid in ((4, 4, 4), (6, 5, 3)):
        n = math.prod(grid) + 4  # grid tokens + 4 registers
        assert resampler(torch.randn(2, n, 32), grid).shape == (2, 5, 48)
    assert resampler(torch.randn(1, 7, 32)).shape == (1, 5, 48)  # no grid: no position encoding
    with pytest.raises(VolumeVLMError):
        resampler(torch.randn(1, 10, 32), (4, 4, 4))
    with pytest.raises(VolumeVLMError):
        resampler(torch.randn(1, 10, 31))


def test_generation_writes_every_organ_section_and_is_deterministic(pretrained, train_cases):
    torch.manual_seed(1)
    generator = ReportGenerator.build({**TINY_HEAD, "max_new_tokens": 6}, volumevlm.load(pretrained))
    tokens, grid = train_cases["tokens"], train_cases["grid"]
    first = generator.generate(tokens, grid=grid)
    assert len(first) == 3 and all(isinstance(t, str) for t in first)
    for text in first:
        lines = text.splitlines()
        assert lines[0] == "FINDINGS:"
        assert [line.split(":")[0] for line in lines[1 : 1 + len(SECTIONS)]] == list(SECTIONS)
        assert "IMPRESSION:" in lines
        assert set(split_report(text)) == {*SECTIONS, IMPRESSION_HEADER}
    generator.train()
    assert generator.generate(tokens, grid=grid) == first  # greedy, dropout off: same input, same text
    assert generator.training  # generate runs in eval mode and restores the mode it found
    continued = generator.generate(tokens, prompts=["SPLEEN:"] * 3, grid=grid, max_new_tokens=3)
    assert len(continued) == 3 and all("SPLEEN" not in t for t in continued)
    with pytest.raises(VolumeVLMError):
        generator.generate(tokens, grid=grid, top_k=5)
    with pytest.raises(VolumeVLMError):
        generator.generate(tokens, prompts=["SPLEEN:"], grid=grid)


def test_overfit_reproduces_the_training_reports_findings(overfit, train_cases):
    losses = overfit["losses"]
    assert losses[0] > 4.0 and max(losses[-10:]) < 0.25, (losses[0], losses[-10:])
    wanted = [present(r) for r in train_cases["reports"]]
    assert sum(len(w) for w in wanted) >= 3  # the cases do have findings to get right
    got = [present(t) for t in overfit["texts"]]
    assert got == wanted
    # The three cases differ, so the texts must too: the visual prefix drives the decoder.
    assert len(set(overfit["texts"])) == 3


def test_save_with_the_model_then_load_generates_the_same_text(overfit, train_cases, tmp_path):
    model, generator = overfit["model"], overfit["generator"]
    model.attach_head("report", generator)
    folder = model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    assert config["heads"]["report"]["type"] == "report"
    assert config["heads"]["report"]["config"]["tokenizer"] == "vlm"
    loaded = volumevlm.load(folder)
    assert loaded.has_head("report")
    head = loaded.head("report")
    for (name, a), (_, b) in zip(generator.state_dict().items(), head.state_dict().items()):
        assert torch.equal(a, b), name
    texts = generate_reports(loaded, train_cases["images"])
    assert texts == overfit["texts"] == generate_reports(model, train_cases["images"])


# ---------------------------------------------------------------------- findings conditioning


@pytest.fixture(scope="module", params=[False, True], ids=["findings-tokens", "findings-in-prompt"])
def conditioned(pretrained, train_cases, request):
    """A findings-conditioned head overfitted on the three cases (teacher forcing with the
    labeler's readings, no flips), its findings classifier fitted on their image features;
    with the findings as prefix tokens only, or also as words in the section prompts."""
    from volumevlm.models.report import finding_features, section_findings_of
    from volumevlm.train.report import ReportModule, fit_findings_classifier

    torch.manual_seed(0)
    model = volumevlm.load(pretrained)
    settings = {**TINY_HEAD, "findings": list(SYNTHETIC_FINDINGS), "findings_noise": 0.0}
    if request.param:
        sections = section_findings_of(train_cases["reports"], SYNTHETIC_FINDINGS, (*SECTIONS, IMPRESSION_HEADER))
        settings.update(findings_in_prompt=True, section_findings=sections)
    generator = ReportGenerator.build(settings, model)
    batch = batch_of(generator, train_cases)
    module = ReportModule(generator)
    optimizer = torch.optim.AdamW(generator.parameters(), lr=3e-3)
    generator.train()
    for _ in range(OVERFIT_STEPS):
        loss = module.batch_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    generator.eval()
    # Three cases are too few to cross-validate a probe: each case's features are
    # repeated with a little noise (20 rows per case), as if scanned several times.
    features = finding_features(train_cases["tokens"], train_cases["grid"])
    generator_rows = torch.Generator().manual_seed(0)
    noisy = features.repeat(20, 1) + 0.01 * features.std() * torch.randn(60, features.shape[1], generator=generator_rows)
    readings = generator.findings_readings(train_cases["reports"])
    probe = fit_findings_classifier(generator, noisy, readings.repeat(20, 1))
    return {"model": model, "generator": generator, "readings": readings, "probe": probe}


def test_cases_with_different_findings_get_reports_stating_their_own(conditioned, train_cases):
    generator = conditioned["generator"]
    wanted = [present(r) for r in train_cases["reports"]]
    assert len({frozenset(w) for w in wanted}) == 3 and sum(map(bool, wanted)) >= 2  # three different sets of findings
    # From the images alone: the probe calls each case's findings, the decoder writes them.
    calls = generator.findings_calls(generator.predict_findings(train_cases["tokens"], train_cases["grid"]))
    assert torch.equal(calls, conditioned["readings"])
    model = conditioned["model"]
    model.attach_head("report", generator)
    texts = generate_reports(model, train_cases["images"])
    assert len(set(texts)) == 3
    assert [present(t) for t in texts] == wanted
    # The findings tokens drive the text: case 0's image written from case 1's findings
    # states case 1's findings.
    swapped = generator.generate(train_cases["tokens"][:1], grid=train_cases["grid"], findings=conditioned["readings"][1:2])
    assert present(swapped[0]) == wanted[1]
    names = [sorted(w) for w in wanted]
    assert generator.generate(train_cases["tokens"], grid=train_cases["grid"], findings=names) == texts


def test_consistent_choice_keeps_the_candidate_that_states_the_findings(pretrained):
    model = volumevlm.load(pretrained)
    sections = {"SPLEEN": ["splenomegaly"], "PERITONEUM": ["ascites"]}
    generator = ReportGenerator.build({**TINY_HEAD, "findings": list(SYNTHETIC_FINDINGS), "findings_in_prompt": True,
                                       "section_findings": sections}, model)
    normal, enlarged = "The spleen is normal in size.", "Splenomegaly."
    assert generator.consistent_choice("SPLEEN", [normal, enlarged], ["splenomegaly"]) == enlarged
    assert generator.consistent_choice("SPLEEN", [enlarged, normal], []) == normal
    # A finding outside the section's scope may be stated only when present; ties keep
    # the decoder's order.
    spill = "Splenomegaly. Moderate ascites."
    assert generator.consistent_choice("SPLEEN", [spill, enlarged], ["splenomegaly"]) == enlarged
    assert generator.consistent_choice("SPLEEN", [spill, enlarged], ["splenomegaly", "ascites"]) == spill
    # The impression (and a whole report) must state exactly the present findings.
    both, one = "1. Splenomegaly. 2. Ascites.", "1. Splenomegaly."
    assert generator.consistent_choice(IMPRESSION_HEADER, [both, one], ["splenomegaly"]) == one
    assert generator.consistent_choice(IMPRESSION_HEADER, [one, both], ["ascites", "splenomegaly"]) == both
    assert generator.consistent_choice(None, [both, one], ["splenomegaly"]) == one
    # A section the mapping does not name may not state an absent finding.
    assert generator.consistent_choice("PANCREAS", ["Moderate ascites.", "Unremarkable pancreas."], []) == "Unremarkable pancreas."
    assert generator.consistent_choice("SPLEEN", [normal], ["splenomegaly"]) == normal  # one candidate: as it is


def test_generation_with_consistent_candidates_picks_among_the_best_beams(conditioned, train_cases, monkeypatch):
    generator = conditioned["generator"]
    tokens, grid = train_cases["tokens"], train_cases["grid"]
    findings = conditioned["readings"]
    assert generator.generate(tokens, grid=grid, findings=findings, consistent_candidates=1) == \
        generator.generate(tokens, grid=grid, findings=findings)
    # With the labeler's choice, each overfit case's report states its own findings.
    chosen = generator.generate(tokens, grid=grid, findings=findings, consistent_candidates=3, num_beams=1)
    assert [present(t) for t in chosen] == [present(r) for r in train_cases["reports"]]
    # Each section is picked among the decoder's own 3 best beams, by consistent_choice: a
    # choice that always takes the last beam shows up in every section of every report.
    present_of = generator.present_findings(findings)
    prefix = generator.visual_prefix(tokens, grid, findings)
    settings = {**generator.config.generation(), "num_beams": 1}
    settings.pop("consistent_candidates")
    in_prompt = present_of if generator.config.findings_in_prompt else [[] for _ in present_of]
    asked = []

    def last(section, candidates, case_present):
        asked.append((section, list(candidates), list(case_present)))
        return candidates[-1]

    monkeypatch.setattr(generator, "consistent_choice", last)
    lasts = generator.generate(tokens, grid=grid, findings=findings, consistent_candidates=3, num_beams=1)
    differ = 0
    for name in generator.config.section_names:
        beams = generator._continue(prefix, [generator.prompt_text(name, p) for p in in_prompt], settings, 3)
        for i, texts in enumerate(beams):
            assert len(texts) == 3 and (name, texts, present_of[i]) in asked
            differ += texts[-1] != texts[0]
            if name == IMPRESSION_HEADER:
                assert lasts[i].endswith(f"IMPRESSION:\n{texts[-1]}\n")
            else:
                assert f"\n{name}: {texts[-1] or 'Unremarkable.'}\n" in lasts[i]
    assert differ > 0 and lasts != chosen  # the beams differ, so the choice shows
    monkeypatch.undo()
    for bad in (0, 1.5, True):
        with pytest.raises(VolumeVLMError, match="consistent_candidates must be a positive integer"):
            generator.generate(tokens, grid=grid, findings=findings, consistent_candidates=bad)


def test_section_bank_keeps_a_few_texts_per_labeler_reading():
    from volumevlm.models.report import section_bank_of

    def report(spleen, impression):
        return f"FINDINGS:\nSPLEEN: {spleen}\nPERITONEUM: No ascites.\n\nIMPRESSION:\n{impression}\n"

    reports = [
        report("The spleen is enlarged.", "1. Splenomegaly."),
        report("The spleen is normal in size.", "No acute abnormality."),
        report("Splenomegaly.", "1. Splenomegaly."),
        report("Unremarkable spleen.", "No acute abnormality."),
        report("Splenomegaly.", "1. Splenomegaly."),
        report("Unremarkable  spleen.", "No acute abnormality."),  # the same text once spaces are tidied
        report("Moderate splenomegaly.", "1. Splenomegaly."),
    ]
    bank = section_bank_of(reports, SYNTHETIC_FINDINGS, (*SECTIONS, IMPRESSION_HEADER), per_reading=2)
    # Per reading (first seen first), the most frequent texts, first seen first on ties.
    assert bank == {
        "SPLEEN": ["Splenomegaly.", "The spleen is enlarged.", "Unremarkable spleen.", "The spleen is normal in size."],
        "PERITONEUM": ["No ascites."],
        IMPRESSION_HEADER: ["1. Splenomegaly.", "No acute abnormality."],
    }
    config = ReportConfig.from_dict({"findings": ["splenomegaly"], "section_bank": bank})
    assert ReportConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad in ({"SPLEEN": "Splenomegaly."}, {"SPLEEN": [1]}, {"SPLEEN": 5}, ["Splenomegaly."]):
        with pytest.raises(VolumeVLMError, match="section_bank must map section names to lists of texts"):
            ReportConfig.from_dict({"findings": ["splenomegaly"], "section_bank": bad})
    with pytest.raises(VolumeVLMError, match="bank_fallback replaces sections, so it needs sections: true"):
        ReportConfig.from_dict({"findings": ["splenomegaly"], "bank_fallback": True, "sections": False})
    with pytest.raises(VolumeVLMError, match="bank_fallback must be true or false"):
        ReportConfig.from_dict({"findings": ["splenomegaly"], "bank_fallback": "yes"})


def test_text_log_likelihood_is_the_decoder_loss(conditioned, train_cases):
    generator = conditioned["generator"]
    tokens, grid, findings = train_cases["tokens"][:1], train_cases["grid"], conditioned["readings"][:1]
    prefix = generator.visual_prefix(tokens, grid, findings)[0]
    prompt = generator.prompt_text("SPLEEN", generator.present_findings(findings)[0])
    texts = ["Splenomegaly.", "The spleen is normal in size. No splenic lesion."]
    scores = generator.text_log_likelihood(prefix, prompt, texts)
    for text, score in zip(texts, scores):
        batch = generator.encode_targets([text], [prompt])
        with torch.no_grad():
            loss = generator(tokens, batch["input_ids"], batch["attention_mask"], batch["labels"], grid=grid,
                             findings=findings)
        assert score == pytest.approx(-float(loss), abs=1e-4)


def test_bank_choice_takes_the_bank_text_the_decoder_finds_likeliest(pretrained, monkeypatch):
    model = volumevlm.load(pretrained)
    bank = {"SPLEEN": ["Unremarkable spleen.", "Splenomegaly.", "The spleen is enlarged."]}
    generator = ReportGenerator.build({**TINY_HEAD, "findings": list(SYNTHETIC_FINDINGS), "findings_in_prompt": True,
                                       "section_findings": {"SPLEEN": ["splenomegaly"]}, "section_bank": bank}, model)
    prefix = torch.zeros(4, generator.hidden_size)
    scores = {}
    monkeypatch.setattr(generator, "text_log_likelihood", lambda prefix, prompt, texts: np.array([scores[t] for t in texts]))
    scores.update({"Splenomegaly.": -1.0, "The spleen is enlarged.": -2.0})
    assert generator.bank_choice("SPLEEN", "Unremarkable spleen.", ["splenomegaly"], prefix, "SPLEEN:") == "Splenomegaly."
    scores.update({"Splenomegaly.": -3.0})
    assert generator.bank_choice("SPLEEN", "Unremarkable spleen.", ["splenomegaly"], prefix, "SPLEEN:") == \
        "The spleen is enlarged."
    # Text that already states the findings is kept; one consistent bank text needs no scoring.
    assert generator.bank_choice("SPLEEN", "Moderate splenomegaly.", ["splenomegaly"], prefix, "SPLEEN:") is None
    scores.clear()
    assert generator.bank_choice("SPLEEN", "Splenomegaly.", [], prefix, "SPLEEN:") == "Unremarkable spleen."
    # A section the bank lacks stays as written.
    assert generator.bank_choice("PANCREAS", "Moderate ascites.", [], prefix, "PANCREAS:") is None


def test_calls_no_bank_text_combines_are_written_by_splicing_bank_sentences(pretrained, monkeypatch):
    """A renal cyst with hydronephrosis and no stone: the bank has each apart, never together.
    The decoder's text keeps its cyst, loses its denial of hydronephrosis and gains the bank's
    sentence stating it; the impression is renumbered; nothing is spliced when no bank
    sentence helps."""
    from volumevlm.text.labeler import label_reports

    model = volumevlm.load(pretrained)
    kidneys = "KIDNEYS AND URETERS"
    bank = {kidneys: ["Simple right renal cyst. No hydronephrosis.", "Left kidney stone, 6 mm. Mild left hydronephrosis.",
                      "No renal calculi or hydronephrosis. The ureters are unremarkable."],
            "IMPRESSION": ["1. Renal cyst.", "1. Left hydronephrosis. 2. Left kidney stone."]}
    generator = ReportGenerator.build({**TINY_HEAD, "findings": list(SYNTHETIC_FINDINGS), "findings_in_prompt": True,
                                       "section_findings": {kidneys: ["renal_cyst", "kidney_stone", "hydronephrosis"]},
                                       "section_bank": bank}, model)
    present = ["renal_cyst", "hydronephrosis"]
    written = "Right renal cyst, 2 cm. No hydronephrosis. The ureters are unremarkable."
    assert all(e > 0 for e in generator.reading_errors(kidneys, [written, *bank[kidneys]], present))  # no whole text fits
    spliced = generator.spliced_text(kidneys, written, present)
    assert spliced == "Right renal cyst, 2 cm. The ureters are unremarkable. Mild left hydronephrosis."
    assert generator.reading_errors(kidneys, [spliced], present)[0] == 0
    assert label_reports([f"{kidneys}: {spliced}"], ["renal_cyst", "kidney_stone", "hydronephrosis"])[0] == \
        {"renal_cyst": "positive", "hydronephrosis": "positive"}
    # bank_choice takes the spliced text (no bank text has fewer errors), whatever the likelihoods.
    monkeypatch.setattr(generator, "text_log_likelihood", lambda prefix, prompt, texts: np.zeros(len(texts)))
    prefix = torch.zeros(4, generator.hidden_size)
    assert generator.bank_choice(kidneys, written, present, prefix, f"{kidneys}:") == spliced
    # The impression: two items to add, renumbered.
    impression = generator.spliced_text("IMPRESSION", "1. Aortoiliac atherosclerosis.", ["atherosclerosis", *present])
    assert impression == "1. Aortoiliac atherosclerosis. 2. Renal cyst. 3. Left hydronephrosis."  # ties: bank order
    # Nothing to gain: None (a correct text, or no bank sentence states the missing finding).
    assert generator.spliced_text(kidneys, "Right renal cyst. Mild hydronephrosis.", present) is None
    assert generator.spliced_text(kidneys, written, ["renal_cyst", "hydronephrosis", "ascites"]) is not None
    assert generator.spliced_text("SPLEEN", "Unremarkable spleen.", ["splenomegaly"]) is None


def test_bank_fallback_replaces_exactly_the_sections_the_decoder_wrote_wrongly(conditioned, train_cases, monkeypatch):
    from volumevlm.models.report import section_bank_of

    generator = conditioned["generator"]
    tokens, grid = train_cases["tokens"], train_cases["grid"]
    seen = set().union(*(present(r) for r in train_cases["reports"]))
    # A finding none of the three training reports states: the overfit decoder cannot write it.
    unseen = next(f for f in ("splenomegaly", "ascites", "pleural_effusion", "cardiomegaly") if f not in seen)
    bank = section_bank_of(train_cases["reports"], generator.config.findings, generator.config.section_names)
    words = {"splenomegaly": "Splenomegaly.", "ascites": "Moderate ascites.", "pleural_effusion": "Small right pleural "
             "effusion.", "cardiomegaly": "Cardiomegaly."}[unseen]
    bank[IMPRESSION_HEADER] = [*bank.get(IMPRESSION_HEADER, []), f"1. {words}", "No acute abnormality."]
    monkeypatch.setattr(generator.config, "section_bank", {k: tuple(v) for k, v in bank.items()})
    asked = [[unseen], *(sorted(present(r)) for r in train_cases["reports"][1:])]
    plain = generator.generate(tokens, grid=grid, findings=asked, consistent_candidates=2, bank_fallback=False)
    sourced = generator.generate(tokens, grid=grid, findings=asked, consistent_candidates=2, bank_fallback=True,
                                 return_sources=True)
    assert present(plain[0]) != {unseen}
    assert present(sourced[0][0]) == {unseen}  # the impression now states it
    for (text, banked), before, case_present in zip(sourced, plain, asked):
        ours, theirs = split_report(text), split_report(before)
        for name in generator.config.section_names:
            if name in banked:
                # Replaced by a bank text that states the findings better than what was written.
                assert ours[name] in bank[name] and ours[name] != theirs[name]
                errors = generator.reading_errors(name, [theirs[name], ours[name]], case_present)
                assert errors[1] < errors[0]
            else:
                assert ours[name] == theirs[name]
    assert IMPRESSION_HEADER in sourced[0][1]
    assert [text for text, _ in sourced] == generator.generate(tokens, grid=grid, findings=asked, consistent_candidates=2,
                                                             bank_fallback=True)
    monkeypatch.setattr(generator.config, "section_bank", None)
    with pytest.raises(VolumeVLMError, match="bank_fallback needs the head's section bank"):
        generator.generate(tokens, grid=grid, findings=asked, bank_fallback=True)
    with pytest.raises(VolumeVLMError, match="bank_fallback must be True or False"):
        generator.generate(tokens, grid=grid, findings=asked, bank_fallback="yes")
    with pytest.raises(VolumeVLMError, match="return_sources applies to whole reports"):
        generator.generate(tokens, prompts=["SPLEEN:"] * 3, grid=grid, findings=asked, return_sources=True)


def test_section_findings_are_read_from_the_reports_sections():
    from volumevlm.models.report import section_findings_of

    reports = [
        "FINDINGS:\nLIVER AND BILIARY TREE: The liver is enlarged. Diffuse hepatic steatosis.\nSPLEEN: Splenomegaly.\n"
        "PERITONEUM: No ascites.\n\nIMPRESSION:\n1. Hepatomegaly.\n2. Splenomegaly.\n",
        "FINDINGS:\nLIVER AND BILIARY TREE: Unremarkable.\nSPLEEN: Unremarkable spleen.\nPERITONEUM: Moderate ascites.\n"
        "\nIMPRESSION:\n1. Ascites.\n",
    ]
    names = (*SECTIONS, IMPRESSION_HEADER)
    mapping = section_findings_of(reports, SYNTHETIC_FINDINGS, names)
    assert mapping["SPLEEN"] == ["splenomegaly"]
    assert mapping["LIVER AND BILIARY TREE"] == ["hepatic_steatosis", "hepatomegaly"]
    assert mapping["PERITONEUM"] == ["ascites"]
    assert IMPRESSION_HEADER not in mapping  # it restates them all
    # A finding stated in more than 127 reports is still counted (the labeler's matrix is
    # int8; summed as int8 the count wrapped to a negative and the finding was mapped nowhere).
    many = ["FINDINGS:\nVASCULATURE: Aortoiliac atherosclerosis.\nSPLEEN: Splenomegaly.\n"] * 130 + \
        ["FINDINGS:\nVASCULATURE: No aortic atherosclerosis.\nSPLEEN: Splenomegaly.\n"] * 20
    mapping = section_findings_of(many, SYNTHETIC_FINDINGS, names)
    assert mapping["VASCULATURE"] == ["atherosclerosis"] and mapping["SPLEEN"] == ["splenomegaly"]


def test_prompts_name_the_present_findings_of_each_section(pretrained, train_cases):
    from volumevlm.train.report import ReportCollate

    model = volumevlm.load(pretrained)
    sections = {"SPLEEN": ["splenomegaly"], "LIVER AND BILIARY TREE": ["hepatic_steatosis", "hepatomegaly"]}
    generator = ReportGenerator.build({**TINY_HEAD, "findings": list(SYNTHETIC_FINDINGS), "findings_in_prompt": True,
                                       "section_findings": sections}, model)
    present = ["splenomegaly", "hepatomegaly", "ascites", "hepatic_steatosis"]
    assert generator.prompt_text("SPLEEN", present) == "splenomegaly. SPLEEN:"
    # In the head's finding order, whatever order they are given in.
    assert generator.prompt_text("LIVER AND BILIARY TREE", present) == "hepatic steatosis, hepatomegaly. LIVER AND BILIARY TREE:"
    assert generator.prompt_text("PANCREAS", []) == "PANCREAS:"
    # A section the mapping does not list, and the impression, name every present finding.
    assert generator.prompt_text("PERITONEUM", ["ascites"]) == "ascites. PERITONEUM:"
    assert generator.prompt_text(IMPRESSION_HEADER, present) == "hepatic steatosis, hepatomegaly, splenomegaly, ascites. IMPRESSION:"
    # Without the option the prompt is the header alone.
    plain = ReportGenerator.build({**TINY_HEAD, "findings": list(SYNTHETIC_FINDINGS)}, model)
    assert plain.prompt_text("SPLEEN", present) == "SPLEEN:"
    # Training prompts carry the (flipped) findings the batch also carries as tokens.
    items = [{"tokens": t, "grid": train_cases["grid"], "report": r, "id": str(i)}
             for i, (t, r) in enumerate(zip(train_cases["tokens"], train_cases["reports"]))]
    torch.manual_seed(0)
    noisy = ReportCollate(generator, noise=0.45)(items)
    clean = ReportCollate(generator)(items)
    assert torch.equal(clean["findings"], generator.findings_readings(train_cases["reports"]))
    assert not torch.equal(noisy["findings"], clean["findings"])  # 54 values at 0.45: some flipped
    for batch in (clean, noisy):
        rows = 0
        for i, report in enumerate(train_cases["reports"]):
            case_present = generator.present_findings(batch["findings"][i:i + 1])[0]
            for name, _ in section_pairs(report, generator.config.section_names):
                prompt = generator._encode(generator.prompt_text(name, case_present))
                assert batch["input_ids"][rows, 1:1 + len(prompt)].tolist() == prompt
                assert int(batch["case_index"][rows]) == i
                rows += 1
        assert rows == len(batch["case_index"])
    # Training may keep only a share of the normal sections (bare header prompts); every
    # section whose prompt names a finding stays.
    torch.manual_seed(0)
    thinned = ReportCollate(generator, normal_rate=0.2)(items)
    def prompts_of(batch):
        return [generator.decode(row[1:].tolist()).split(":")[0] for row in batch["input_ids"]]
    named = [i for i, p in enumerate(prompts_of(clean)) if ". " in p]
    assert named and sum(". " in p for p in prompts_of(thinned)) == len(named)
    normal = len(clean["case_index"]) - len(named)
    assert 0 < len(thinned["case_index"]) - len(named) < 0.6 * normal
    assert set(thinned["case_index"].tolist()) == {0, 1, 2}
    with pytest.raises(VolumeVLMError, match="normal_section_rate"):
        ReportCollate(generator, normal_rate=0.0)
    with pytest.raises(VolumeVLMError, match="section_findings names findings"):
        ReportGenerator.build({**TINY_HEAD, "findings": ["ascites"], "findings_in_prompt": True,
                               "section_findings": {"SPLEEN": ["splenomegaly"]}}, model)
    with pytest.raises(VolumeVLMError, match="findings_in_prompt needs findings"):
        ReportGenerator.build({**TINY_HEAD, "findings_in_prompt": True}, model)


class _FindingsHolder(torch.nn.Module):
    """The two attributes fit_findings_classifier fills, for ascites and splenomegaly read
    from ``width`` features."""

    def __init__(self, width: int):
        super().__init__()
        self.config = ReportConfig.from_dict({"findings": ["ascites", "splenomegaly"]})
        self.findings_classifier = torch.nn.Linear(width, 2)
        self.register_buffer("finding_thresholds", torch.full((2,), 0.5))


def test_findings_classifier_matches_scikit_learn_and_thresholds_out_of_fold():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from volumevlm.models.report import finding_features
    from volumevlm.train.report import fit_findings_classifier

    rng = torch.Generator().manual_seed(0)
    readings = torch.zeros(80, 2)
    readings[:40, 0] = 1
    readings[:3, 1] = 1  # too rare to cross-validate: a constant at its prevalence
    features = torch.randn(80, 6, generator=rng) * torch.tensor([1.0, 5.0, 1.0, 1.0, 1.0, 1.0]) + 3.0
    features[:, 0] += 2.5 * readings[:, 0]
    holder = _FindingsHolder(6)
    info = fit_findings_classifier(holder, features, readings, seed=0)
    probs = torch.sigmoid(holder.findings_classifier(features))
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000))
    reference.fit(features.double().numpy(), readings[:, 0].numpy().astype(int))
    expected = torch.from_numpy(reference.predict_proba(features.double().numpy())[:, 1]).float()
    assert torch.allclose(probs[:, 0], expected, atol=1e-4)  # standardisation folded into the layer
    assert torch.allclose(probs[:, 1], torch.full((80,), 3 / 80), atol=1e-5)
    assert info["oof_f1"]["splenomegaly"] is None and info["oof_f1"]["ascites"] > 0.8
    assert 0.0 < info["thresholds"][0] < 1.0 and info["thresholds"][1] == 0.5
    accuracy = ((probs[:, 0] >= holder.finding_thresholds[0]).float() == readings[:, 0]).float().mean()
    assert accuracy > 0.85
    # The out-of-fold probabilities (what the anatomy head's phenotypes are fitted on):
    # scikit-learn's cross_val_predict over the same folds; the prevalence for the rare one.
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    again, out_of_fold = fit_findings_classifier(_FindingsHolder(6), features, readings, seed=0, return_out_of_fold=True)
    assert again == info
    held_out = cross_val_predict(reference, features.double().numpy(), readings[:, 0].numpy().astype(int),
                                 cv=StratifiedKFold(5, shuffle=True, random_state=0), method="predict_proba")[:, 1]
    np.testing.assert_allclose(out_of_fold[:, 0], held_out, atol=1e-12)
    assert not np.allclose(out_of_fold[:, 0], expected.numpy(), atol=1e-3)  # not the in-sample fit
    np.testing.assert_allclose(out_of_fold[:, 1], 3 / 80)
    # Each finding's out-of-fold AUROC is scikit-learn's on those probabilities; below
    # min_auroc a finding is never called (and only then).
    from sklearn.metrics import roc_auc_score

    auroc = roc_auc_score(readings[:, 0].numpy(), held_out)
    assert info["oof_auroc"] == {"ascites": round(auroc, 4), "splenomegaly": None} and info["not_called"] == []
    noise = readings.clone()
    noise[:, 1] = torch.arange(80) % 2  # a finding the features do not read
    for floor, dropped in ((0.0, []), (0.6, ["splenomegaly"]), (auroc + 0.01, ["ascites", "splenomegaly"])):
        guarded = _FindingsHolder(6)
        got = fit_findings_classifier(guarded, features, noise, seed=0, min_auroc=floor)
        assert got["not_called"] == dropped and got["oof_auroc"]["splenomegaly"] < 0.6, floor
        never = [j for j, name in enumerate(got["findings"]) if name in dropped]
        assert [t for j, t in enumerate(got["thresholds"]) if j in never] == [2.0] * len(never)
        calls = (torch.sigmoid(guarded.findings_classifier(features)) >= guarded.finding_thresholds).float()
        assert all(calls[:, j].sum() == 0 for j in never)
        assert [t for j, t in enumerate(got["thresholds"]) if j not in never] == \
            [t for j, t in enumerate(fit_findings_classifier(_FindingsHolder(6), features, noise, seed=0)["thresholds"]) if j not in never]
    # What the probe reads: mean and max over the grid tokens, registers left out.
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    got = finding_features(tokens, grid=(2, 2, 1))
    assert torch.equal(got, torch.cat([tokens[:, :4].mean(1), tokens[:, :4].amax(1)], dim=-1))


def test_findings_read_from_the_feature_set_that_reads_them_best_out_of_fold():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from volumevlm.train.report import fit_findings_classifier

    rng = torch.Generator().manual_seed(1)
    readings = torch.zeros(90, 2)
    readings[:30, 0] = 1
    readings[::3, 1] = 1
    features = torch.randn(90, 40, generator=rng)
    features[:, 0] += 1.2 * readings[:, 0]  # ascites is read in column 0 (among 39 of noise)
    features[:, 30] += 1.2 * readings[:, 1]  # splenomegaly only outside the columns it is given
    columns = {"ascites": {"organs": list(range(12)), "organ_statistics": [3, 0, 1, 2]},
               "splenomegaly": {"organs": [4, 5, 6, 7]}}
    x, y = features.double().numpy(), readings.numpy().astype(int)

    def reference(cols, j):
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000))
        oof = cross_val_predict(probe, x[:, cols], y[:, j], cv=StratifiedKFold(5, shuffle=True, random_state=0),
                                method="predict_proba")[:, 1]
        return probe.fit(x[:, cols], y[:, j]), oof, round(roc_auc_score(y[:, j], oof), 4)

    holder = _FindingsHolder(40)
    info, out_of_fold = fit_findings_classifier(holder, features, readings, seed=0, return_out_of_fold=True,
                                                columns=columns)
    sets = {"all": list(range(40)), "organs": list(range(12)), "organ_statistics": [0, 1, 2, 3]}
    fits = {key: reference(cols, 0) for key, cols in sets.items()}
    assert info["oof_auroc_by_features"]["ascites"] == {key: fit[2] for key, fit in fits.items()}
    assert fits["organ_statistics"][2] > max(fits["organs"][2], fits["all"][2])  # the case this test builds
    assert info["features"] == {"ascites": "organ_statistics", "splenomegaly": "all"}
    assert info["oof_auroc"]["ascites"] == fits["organ_statistics"][2]
    np.testing.assert_allclose(out_of_fold[:, 0], fits["organ_statistics"][1], atol=1e-12)
    weight = holder.findings_classifier.weight.detach()
    assert torch.count_nonzero(weight[0, 4:]) == 0 and torch.count_nonzero(weight[0, :4]) == 4
    probs = torch.sigmoid(holder.findings_classifier(features)).double().numpy()
    np.testing.assert_allclose(probs[:, 0], fits["organ_statistics"][0].predict_proba(x[:, :4])[:, 1], atol=1e-5)
    # splenomegaly reads better from all the features: it keeps the fit on all of them.
    spleen = reference(sets["all"], 1)
    assert info["oof_auroc_by_features"]["splenomegaly"]["all"] == spleen[2] == info["oof_auroc"]["splenomegaly"]
    assert info["oof_auroc_by_features"]["splenomegaly"]["organs"] < spleen[2]
    np.testing.assert_allclose(probs[:, 1], spleen[0].predict_proba(x)[:, 1], atol=1e-5)
    assert torch.count_nonzero(weight[1]) == 40
    # Without column sets: every finding from every feature, as before.
    plain = fit_findings_classifier(_FindingsHolder(40), features, readings, seed=0)
    assert plain["features"] == {"ascites": "all", "splenomegaly": "all"} and plain["oof_auroc_by_features"] == {}
    assert plain["oof_auroc"]["ascites"] == fits["all"][2]
    for bad in ({"ascites": {"organs": []}}, {"ascites": {"organs": [0, 40]}}, {"ascites": {"organs": [-1]}},
                {"ascites": {"all": [0]}}):
        with pytest.raises(VolumeVLMError, match="ascites") as err:
            fit_findings_classifier(_FindingsHolder(40), features, readings, columns=bad)
        assert "\n" not in str(err.value)


def test_finding_organs_name_the_columns_of_their_organs():
    from volumevlm.data.labels import LABEL_INDEX, LABELS
    from volumevlm.train.report import finding_organ_columns

    findings = ["kidney_stone", "ascites", "cardiomegaly", "cirrhosis"]
    # Organ k of the features is label k + 1 of the segmentation head, `width` columns each,
    # the last `statistics_width` of them its statistics.
    got = finding_organ_columns("registry", findings, LABELS, 3, 2)
    assert got == {"kidney_stone": {"organs": [6, 7, 8, 9, 10, 11], "organ_statistics": [7, 8, 10, 11]},
                   "cardiomegaly": {"organs": [36, 37, 38], "organ_statistics": [37, 38]},
                   "cirrhosis": {"organs": [0, 1, 2, 3, 4, 5], "organ_statistics": [1, 2, 4, 5]}}
    # A segmentation head without the registry's organs reads those findings from all of them.
    few = {0: "background", 1: "heart", 2: "kidney_right"}
    assert finding_organ_columns("registry", findings, few, 2) == {"kidney_stone": {"organs": [2, 3]},
                                                                  "cardiomegaly": {"organs": [0, 1]}}
    mapping = {"ascites": ["spleen", "liver", "liver"]}
    assert finding_organ_columns(mapping, findings, LABELS, 2) == {"ascites": {"organs": [0, 1, 2, 3]}}
    assert finding_organ_columns(None, findings, LABELS, 2) == {}
    assert LABEL_INDEX["kidney_left"] == 3 and LABEL_INDEX["heart"] == 13  # what the figures above assume
    for bad, what in (({"gallstones": ["liver"]}, "not findings of the head"),
                      ({"ascites": ["brain"]}, "not structures of the segmentation head")):
        with pytest.raises(VolumeVLMError, match=what) as err:
            finding_organ_columns(bad, findings, LABELS, 2)
        assert "\n" not in str(err.value)


def test_old_report_heads_load_and_mismatched_ones_are_refused_in_one_line(overfit, train_cases, tmp_path):
    """A head saved before findings conditioning (no findings / sampling keys in its config)
    loads and writes as before; a config that asks for findings its weights lack is refused."""
    model, generator = overfit["model"], overfit["generator"]
    model.attach_head("report", generator)
    folder = model.save_pretrained(tmp_path / "old")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    head_config = config["heads"]["report"]["config"]["config"]
    for key in ("findings", "findings_noise", "do_sample", "top_p", "temperature"):
        del head_config[key]
    config_path.write_text(json.dumps(config))
    loaded = volumevlm.load(folder)
    assert loaded.head("report").config.findings == ()
    assert generate_reports(loaded, train_cases["images"]) == overfit["texts"]
    with pytest.raises(VolumeVLMError) as err:
        loaded.head("report").generate(train_cases["tokens"], grid=train_cases["grid"], findings=[["ascites"]] * 3)
    assert "not conditioned on findings" in str(err.value) and "\n" not in str(err.value)
    head_config["findings"] = ["ascites", "splenomegaly"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(VolumeVLMError) as err:
        volumevlm.load(folder)
    assert "weights do not match" in str(err.value) and "\n" not in str(err.value)
    head_config["findings"] = ["no such finding"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(VolumeVLMError) as err:
        volumevlm.load(folder)
    assert "no such finding" in str(err.value) and "\n" not in str(err.value)


def test_organs_heads_saved_before_the_statistics_setting_load_with_the_legacy_histograms(pretrained, tmp_path):
    """A report head whose saved config names no organ_statistics read 16-bin histograms
    (the only recipe then): it loads as "hu16" with its classifier's width; a head saved
    with the setting keeps it, and a new config without it takes the current recipe."""
    from pretrain_helpers import TINY_REPORT_HEAD
    from volumevlm.models.anatomy import ORGAN_HU_BINS

    model = volumevlm.load(pretrained)
    organs = {**TINY_REPORT_HEAD, "findings": ["ascites", "splenomegaly"], "findings_features": "organs",
              "organ_classes": 5}
    assert ReportConfig.from_dict(organs).organ_statistics == "hu_fine_dilated"
    for statistics, width in (("hu16", 1 + ORGAN_HU_BINS), ("hu_fine_dilated", organ_statistics_width())):
        model.attach_head("report", ReportGenerator.build({**organs, "organ_statistics": statistics}, model))
        folder = model.save_pretrained(tmp_path / statistics)
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text())
        if statistics == "hu16":
            del config["heads"]["report"]["config"]["config"]["organ_statistics"]
            config_path.write_text(json.dumps(config))
        head = volumevlm.load(folder).head("report")
        assert head.config.organ_statistics == statistics
        assert head.findings_classifier.weight.shape[1] == 4 * (model.encoder.config.dim + width)


def _tiny_local_causal_lm(folder: Path, reports) -> Path:
    """A tiny GPT-2 with its own byte-level BPE tokenizer, saved with save_pretrained (no download)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(reports, vocab_size=320, min_frequency=1, special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=160, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_local_pretrained_causal_lm_as_the_decoder(pretrained, train_cases, tmp_path):
    hf_dir = _tiny_local_causal_lm(tmp_path / "tiny-gpt2", train_cases["reports"])
    model = volumevlm.load(pretrained)
    head = {**TINY_HEAD, "pretrained": str(hf_dir), "max_new_tokens": 4}
    for key in ("n_layer", "n_embd", "n_head", "n_positions"):
        head.pop(key)
    generator = ReportGenerator.build(head, model)
    assert generator.tokenizer_source == "own" and generator.hidden_size == 32
    eos = generator.tokenizer.eos_token_id
    assert (generator.bos_id, generator.eos_id, generator.pad_id) == (eos, eos, eos)
    # Its own tokenizer round-trips text with case and punctuation (no WordPiece tidying).
    assert generator.decode(generator._encode("Splenomegaly, 14.5 cm.")) == "Splenomegaly, 14.5 cm."
    batch = batch_of(generator, train_cases)
    loss = loss_of(generator, batch)
    assert torch.isfinite(loss)
    optimizer = torch.optim.AdamW(generator.parameters(), lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        loss_of(generator, batch).backward()
        optimizer.step()
    assert float(loss_of(generator, batch)) < float(loss)
    texts = generator.generate(train_cases["tokens"], grid=train_cases["grid"])
    assert len(texts) == 3 and all(text.startswith("FINDINGS:") for text in texts)
    model.attach_head("report", generator)
    folder = model.save_pretrained(tmp_path / "ckpt")
    assert (folder / "heads" / "report" / "tokenizer" / "tokenizer.json").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["heads"]["report"]["config"]["tokenizer"] == "own"
    assert "_name_or_path" not in config["heads"]["report"]["config"]["decoder_config"]  # no path of this machine
    loaded = volumevlm.load(folder)
    assert generate_reports(loaded, train_cases["images"]) == texts
    # The folder is read with local_files_only: a missing one is a one-line error naming it.
    with pytest.raises(VolumeVLMError) as err:
        ReportGenerator.build({**head, "pretrained": str(tmp_path / "missing")}, model)
    assert "missing" in str(err.value) and "\n" not in str(err.value)


def _pyproject_lists_peft() -> bool:
    """Whether pyproject.toml names peft as a (possibly optional) requirement: "peft", "peft>=0.11", ..."""
    return re.search(r"""["']peft(?![\w-])""", (REPO / "pyproject.toml").read_text()) is not None


def test_lora_needs_peft_and_says_so(pretrained, train_cases, tmp_path, monkeypatch):
    """LoRA runs through peft, which volumevlm does not depend on: without it the config
    fails in one line saying how to install it. peft is exercised only where pyproject lists it."""
    hf_dir = _tiny_local_causal_lm(tmp_path / "tiny-gpt2", train_cases["reports"])
    model = volumevlm.load(pretrained)
    head = {"pretrained": str(hf_dir), "lora": True, "lora_r": 2, "lora_target_modules": ["c_attn"],
            "num_visual_tokens": 4, "resampler_depth": 1, "resampler_heads": 2, "max_new_tokens": 4}
    with pytest.raises(VolumeVLMError) as err:
        ReportConfig.from_dict({"lora": True})  # LoRA adapts a pretrained decoder only
    assert "pretrained" in str(err.value)
    if not _pyproject_lists_peft():
        monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed (it is not, here)
        with pytest.raises(VolumeVLMError) as err:
            ReportGenerator.build(head, model)
        message = str(err.value)
        assert "\n" not in message and "pip install peft" in message
        return
    assert importlib.util.find_spec("peft") is not None, "pyproject lists peft but it is not installed"
    generator = ReportGenerator.build(head, model)
    assert generator.has_unmerged_lora()
    batch = batch_of(generator, train_cases)
    optimizer = torch.optim.AdamW([p for p in generator.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        loss_of(generator, batch).backward()
        optimizer.step()
    texts = generator.generate(train_cases["tokens"], grid=train_cases["grid"])
    generator.merge_lora()
    assert not generator.has_unmerged_lora()
    assert generator.generate(train_cases["tokens"], grid=train_cases["grid"]) == texts
    model.attach_head("report", generator)
    loaded = volumevlm.load(model.save_pretrained(tmp_path / "ckpt"))
    assert generate_reports(loaded, train_cases["images"]) == texts


def test_bad_configs_and_missing_head_fail_in_one_line(pretrained):
    from volumevlm.train.report import _settings

    model = volumevlm.load(pretrained)
    assert _settings({"findings_min_auroc": 0.55})["findings_min_auroc"] == 0.55
    assert _settings({"findings_organs": "registry"})["findings_organs"] == "registry"
    assert _settings({"findings_organs": {"ascites": ("liver",)}})["findings_organs"] == {"ascites": ["liver"]}
    assert _settings({})["findings_organs"] is None
    bad = [
        lambda: ReportConfig.from_dict({"no_such_key": 1}),
        lambda: ReportConfig.from_dict({"n_embd": 30, "n_head": 4}),
        lambda: ReportConfig.from_dict({"num_visual_tokens": 0}),
        lambda: ReportConfig.from_dict({"section_names": "SPLEEN"}),
        *(lambda floor=floor: _settings({"findings_min_auroc": floor}) for floor in ("high", -0.1, 1.5, True)),
        *(lambda organs=organs: _settings({"findings_organs": organs})
          for organs in ("organs", 3, {"ascites": "liver"}, {"ascites": []}, {"ascites": [1]})),
        lambda: model.head("report"),
        lambda: generate_reports(model, torch.rand(1, 32, 32, 16)),
    ]
    for call in bad:
        with pytest.raises(VolumeVLMError) as err:
            call()
        assert "\n" not in str(err.value)
    with pytest.raises(VolumeVLMError) as err:
        model.head("report")
    assert "experiment=report_demo" in str(err.value)


def test_wordpiece_text_is_tidied():
    assert tidy_wordpiece_text("splenomegaly , measuring 14 . 5 cm . no ascites .") == "Splenomegaly, measuring 14.5 cm. No ascites."
    assert tidy_wordpiece_text("fluid - filled loops ( small )") == "Fluid-filled loops (small)"


# ---------------------------------------------------------------------- the training task


def test_report_task_from_the_real_configs_leaves_the_head_in_model_dir(pretrained, cohort, tmp_path):
    from volumevlm.models.segmentation import SegmentationConfig, SegmentationNet
    from volumevlm.train.cli import run_task

    def config(init_from):
        return shrunk_config(
            cohort, tmp_path / "out", "experiment=report_demo", f"init_from={init_from}",
            "trainer.max_steps=3", "trainer.check_val_every_n_epoch=1", "data.batch_size=4",
            *(f"report.head.{key}={value}" for key, value in {**TINY_HEAD, "max_new_tokens": 8}.items()),
        )

    # report_demo's findings classifier reads the organs of the model's own segmentation head.
    with pytest.raises(VolumeVLMError, match="experiment=segment_demo") as err:
        run_task(config(pretrained))
    assert "\n" not in str(err.value)
    with_organs = volumevlm.load(pretrained)
    torch.manual_seed(0)
    seg = SegmentationNet.from_encoder(with_organs.encoder,
                                       SegmentationConfig(feature_size=4, roi_size=with_organs.preprocess.spatial_size))
    with_organs.attach_head("segmentation", seg.eval())
    pretrained = with_organs.save_pretrained(tmp_path / "with_organs")
    out = tmp_path / "out"
    cfg = config(pretrained)
    assert cfg.task == "report"
    metrics, objects = run_task(cfg)
    assert objects["trainer"].global_step == 3
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    for key in ("val/clinical_f1_micro", "val/bleu4", "val/rouge_l", "val/distinct_ratio"):
        assert 0.0 <= metrics[key] <= 1.0, key
    model_dir = Path(objects["model_dir"])
    assert model_dir == (out / "model").resolve()
    loaded = volumevlm.load(model_dir)
    assert loaded.has_head("report") and loaded.has_head("segmentation")
    assert loaded.head("report").config.max_new_tokens == 8
    assert loaded.head("report").config.findings_features == "organs"
    assert loaded.head("report").config.organ_classes == seg.config.num_classes
    config = json.loads((model_dir / "config.json").read_text())
    report_provenance = config["provenance"]["heads"]["report"]
    assert report_provenance["global_step"] == 3 and config["provenance"]["synthetic"] is True
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["task"] == "report" and summary["data"]["val_cases"] >= 1
    samples = [json.loads(line) for line in (out / "report_samples.jsonl").read_text().splitlines()]
    assert len(samples) == summary["data"]["val_cases"]  # the final validation generates every case
    assert all(s["reference"].startswith("FINDINGS:") and "TECHNIQUE" not in s["reference"] for s in samples)
    # report_demo conditions the head on the checkpoint's findings and fits its probe.
    head = loaded.head("report")
    assert head.config.findings == tuple(SYNTHETIC_FINDINGS)
    assert summary["findings_classifier"]["findings"] == list(SYNTHETIC_FINDINGS)
    assert head.config.num_beams == 4 and head.config.consistent_candidates == 4 and head.config.repetition_penalty == 1.2
    # ... and keeps a section bank read from the training reports, on for generation.
    from volumevlm.data.manifest import read_manifest
    from volumevlm.models.report import section_bank_of

    train_reports = [row["report"] for row in read_manifest(cohort / "manifest.jsonl").rows
                     if row.get("split") == "train" and row.get("report")]
    assert head.config.bank_fallback is True and head.config.organ_statistics == "hu_fine_dilated_sqrt"
    assert head.config.section_bank == {k: tuple(v) for k, v in section_bank_of(
        train_reports, head.config.findings, head.config.section_names).items()}
    assert all(s["generated_from_true_findings"].startswith("FINDINGS:") for s in samples)
    # ... and fits each finding the registry places in organs on those organs' features as
    # well, keeping that fit where it reads better out of fold (zero weight elsewhere).
    # (This cohort is too small for any finding to be cross-validated: the fits themselves
    # are tested on their own above.) A structure the segmentation head lacks fails at once.
    fitted = summary["findings_classifier"]
    assert fitted["features"] == {} and fitted["oof_auroc_by_features"] == {}
    assert cfg.report.findings_organs == "registry"
    misspelt = copy.deepcopy(cfg)
    misspelt.report.findings_organs = {"kidney_stone": ["kidneys"]}
    with pytest.raises(VolumeVLMError, match="'kidneys'.* not structures of the segmentation head") as err:
        run_task(misspelt)
    assert "\n" not in str(err.value)
    # The encoder and the other weights of the pretrained checkpoint are unchanged.
    before = volumevlm.load(pretrained).state_dict()
    after = loaded.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    texts = generate_reports(loaded, torch.rand(1, 1, 32, 32, 16))
    assert len(texts) == 1 and texts[0].startswith("FINDINGS:")
    # An organs head asked for calls without organ features says how to get them.
    tokens = torch.zeros(1, 8 * 8 * 4, loaded.encoder.config.dim)
    with pytest.raises(VolumeVLMError, match="image_finding_features"):
        loaded.head("report").generate(tokens, grid=(8, 8, 4))
