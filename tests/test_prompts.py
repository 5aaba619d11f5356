"""Zero-shot prompt sets (conf/prompts/*.yaml) and the embedding-level zero-shot scorer,
checked against hand computations with a fake, deterministic text encoder."""

from __future__ import annotations

import json
import math

import pytest
import torch

from volumevlm.data.adapters import CT_RATE_FINDINGS
from volumevlm.data.synthetic.findings import FINDING_NAMES, FINDINGS
from volumevlm.data.synthetic.reports import finding_mentions
from volumevlm.errors import VolumeVLMError
from volumevlm.text.prompts import PromptSet, available_prompt_sets, load_prompt_set, prompts_dir, zero_shot_probabilities

MERLIN_30 = (
    "biliary ductal dilation, hepatomegaly, hepatic steatosis, surgically absent gallbladder, gallstones, "
    "pancreatic atrophy, splenomegaly, renal cyst, renal hypodensity, hydronephrosis, prostatomegaly, hiatal hernia, "
    "submucosal edema, bowel obstruction, appendicitis, free air, ascites, anasarca, atherosclerosis, thrombosis, "
    "abdominal aortic aneurysm, coronary calcification, aortic valve calcification, fracture, osteopenia, "
    "lymphadenopathy, metastatic disease, atelectasis, pleural effusion, cardiomegaly"
)


def _snake(text: str) -> str:
    return "_".join(text.lower().replace("-", " ").split())


# --------------------------------------------------------------------------- bundled sets

def test_bundled_sets_cover_their_datasets():
    assert set(available_prompt_sets()) >= {"synthetic", "merlin30", "ctrate18"}
    synthetic = load_prompt_set("synthetic")
    assert synthetic.keys == list(FINDINGS)
    assert {k: synthetic.findings[k].name for k in FINDINGS} == FINDING_NAMES
    assert "not clinical" in synthetic.description.lower()

    merlin = load_prompt_set("merlin30")
    assert merlin.keys == [_snake(x) for x in MERLIN_30.split(", ")]
    assert len(merlin.keys) == 30

    ctrate = load_prompt_set("ctrate18")
    assert ctrate.keys == [_snake(x) for x in CT_RATE_FINDINGS]
    assert len(ctrate.keys) == 18
    assert "ct-rate" in ctrate.description.lower() and "merlin" in merlin.description.lower()


def test_shared_keys_name_the_same_finding():
    sets = [load_prompt_set(n) for n in ("synthetic", "merlin30", "ctrate18")]
    shared = 0
    for i, a in enumerate(sets):
        for b in sets[i + 1:]:
            for key in set(a.keys) & set(b.keys):
                shared += 1
                assert a.findings[key].name == b.findings[key].name, key
    # pleural_effusion, cardiomegaly, lymphadenopathy, hepatic_steatosis, splenomegaly, ... are shared
    assert shared >= 15
    merlin, synthetic = sets[1], sets[0]
    for key in ("pleural_effusion", "cardiomegaly", "hepatic_steatosis", "splenomegaly", "abdominal_aortic_aneurysm"):
        assert key in merlin.keys and key in synthetic.keys


def test_every_finding_has_several_prompts_each_way():
    for name in ("synthetic", "merlin30", "ctrate18"):
        ps = load_prompt_set(name)
        for key in ps.keys:
            pos, neg = ps.texts(key)
            assert len(pos) >= 3 and len(neg) >= 3, (name, key)
            assert not set(pos) & set(neg)
            assert all(t[0].isupper() and "{" not in t for t in pos + neg)


def test_synthetic_phrasings_read_back_like_the_reports_say_them():
    """The report reader of the synthetic cohort must read every finding-specific positive
    prompt as affirming that finding (and no other), and no negative as affirming anything."""
    ps = load_prompt_set("synthetic")
    for key in ps.keys:
        entry = ps.findings[key]
        assert entry.positive and entry.negative, key
        for text in entry.positive:
            seen = finding_mentions(text)
            assert seen.get(key, {}).get("status") == "affirmed", (key, text, seen)
            others = {k for k, v in seen.items() if k != key and v["status"] != "negated"}
            assert not others, (key, text, others)
        for text in entry.negative:
            seen = finding_mentions(text)
            assert all(v["status"] == "negated" for v in seen.values()), (key, text, seen)


def test_texts_fill_capitalise_and_deduplicate():
    ps = PromptSet.from_dict({
        "name": "t", "description": "test set",
        "templates": {"positive": ["{finding} is present.", "There is {finding}."], "negative": ["No {finding}."]},
        "findings": {"renal_cyst": {"name": "renal cyst", "positive": ["there is renal cyst.", "A {finding} in the kidney."],
                                    "negative": ["The kidneys are normal."]}},
    })
    pos, neg = ps.texts("renal_cyst")
    assert pos == ["Renal cyst is present.", "There is renal cyst.", "A renal cyst in the kidney."]
    assert neg == ["No renal cyst.", "The kidneys are normal."]
    with pytest.raises(VolumeVLMError, match="unknown finding 'liver'"):
        ps.texts("liver")


def test_dict_round_trip_through_json_and_file(tmp_path):
    ps = load_prompt_set("merlin30")
    again = PromptSet.from_dict(json.loads(json.dumps(ps.to_dict())))
    assert again == ps
    assert [again.texts(k) for k in again.keys] == [ps.texts(k) for k in ps.keys]
    path = tmp_path / "copy.yaml"
    path.write_text((prompts_dir() / "merlin30.yaml").read_text())
    assert load_prompt_set(path) == ps
    assert load_prompt_set(str(path)) == ps


GOOD = """\
name: t
description: a test set
templates:
  positive: ["{finding} is present."]
  negative: ["No {finding}."]
findings:
  ascites:
    name: ascites
    positive: ["Free fluid."]
"""


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ('["{finding} is present."]', '["{organ} is present."]', r"templates\.positive\[0\]: unknown template field \{organ\}"),
        ('["{finding} is present."]', '[]', r"templates\.positive: empty list"),
        ('["No {finding}."]', '["Nothing."]', r"templates\.negative\[0\]: .*lacks the \{finding\} placeholder"),
        ('["Free fluid."]', '["Free {finding!r}."]', r"findings\.ascites\.positive\[0\]: .*placeholder plainly"),
        ('["Free fluid."]', '["Free {fluid."]', r"findings\.ascites\.positive\[0\]: bad braces"),
        ('["Free fluid."]', '["No ascites."]', r"findings\.ascites: prompt 'No ascites\.' is both positive and negative"),
        ("positive: [\"Free fluid.\"]", "positve: [\"Free fluid.\"]", r"findings\.ascites: unknown key\(s\) \['positve'\]"),
        ("    name: ascites\n", "", r"findings\.ascites\.name: must be a non-empty string"),
        ("  ascites:\n", "  Ascites:\n", r"findings\.Ascites: keys must be snake_case"),
        ("name: t\n", "name: t\nname: u\n", r"invalid YAML .*duplicate key 'name'"),
        ("description: a test set\n", "", r"missing key\(s\) \['description'\]"),
        ("name: t\n", "name: t\nprompts: 3\n", r"unknown top-level key\(s\) \['prompts'\]"),
        ('  negative: ["No {finding}."]\n', "", r"templates\.negative: missing"),
        ("findings:\n  ascites:", "findings: [ascites]\nx:\n  ascites:", r"unknown top-level key\(s\) \['x'\]"),
        ("    name: ascites\n", "    name: ascites\n    negative: \"none\"\n", r"findings\.ascites\.negative: must be a list"),
    ],
)
def test_bad_files_give_one_line_errors_naming_file_and_key(tmp_path, old, new, expected):
    assert old in GOOD
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(VolumeVLMError, match=expected) as info:
        load_prompt_set(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message


def test_good_file_loads_and_unknown_names_are_refused(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    ps = load_prompt_set(path)
    assert ps.texts("ascites") == (["Ascites is present.", "Free fluid."], ["No ascites."])
    with pytest.raises(VolumeVLMError, match="not found .*available: .*synthetic"):
        load_prompt_set("no_such_set")
    with pytest.raises(VolumeVLMError, match="no such prompt-set file"):
        load_prompt_set(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- zero-shot scoring

TOY = {
    "name": "toy", "description": "toy set for tests",
    "templates": {"positive": ["{finding} is present.", "There is {finding}."], "negative": ["No {finding}."]},
    "findings": {
        "alpha": {"name": "alpha", "positive": ["Alpha seen."]},
        "beta": {"name": "beta", "negative": ["No alpha."]},
    },
}
# Unit vectors in 2-D for every text the toy set produces.
VECTORS = {
    "Alpha is present.": (1.0, 0.0),
    "There is alpha.": (0.0, 1.0),
    "Alpha seen.": (1.0, 0.0),
    "No alpha.": (-1.0, 0.0),
    "Beta is present.": (0.6, 0.8),
    "There is beta.": (0.6, -0.8),
    "No beta.": (0.0, -1.0),
}


class FakeEncoder:
    def __init__(self):
        self.calls = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        return torch.tensor([VECTORS[t] for t in texts], dtype=torch.float64)


def _hand_probability(image, positives, negatives, scale):
    def centroid(vectors):
        m = [sum(v[i] for v in vectors) / len(vectors) for i in range(2)]
        norm = math.hypot(*m)
        return [x / norm for x in m]

    p, n = centroid(positives), centroid(negatives)
    s_pos = scale * (image[0] * p[0] + image[1] * p[1])
    s_neg = scale * (image[0] * n[0] + image[1] * n[1])
    return math.exp(s_pos) / (math.exp(s_pos) + math.exp(s_neg))


def test_zero_shot_matches_hand_computation():
    ps = PromptSet.from_dict(TOY)
    enc = FakeEncoder()
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, -0.8]])
    probs = zero_shot_probabilities(images, enc, ps, logit_scale=10.0)
    assert probs.shape == (3, 2) and probs.dtype == torch.float32
    # One call, every distinct text once ("No alpha." is both alpha's and beta's negative).
    assert len(enc.calls) == 1
    assert sorted(enc.calls[0]) == sorted(VECTORS) and len(enc.calls[0]) == len(VECTORS)
    for b, image in enumerate(images.tolist()):
        alpha = _hand_probability(image, [VECTORS["Alpha is present."], VECTORS["There is alpha."], VECTORS["Alpha seen."]],
                                  [VECTORS["No alpha."]], 10.0)
        beta = _hand_probability(image, [VECTORS["Beta is present."], VECTORS["There is beta."]],
                                 [VECTORS["No beta."], VECTORS["No alpha."]], 10.0)
        assert probs[b, 0].item() == pytest.approx(alpha, rel=1e-5)
        assert probs[b, 1].item() == pytest.approx(beta, rel=1e-5)
    # Image (1, 0): alpha's averaged positive is (2/3, 1/3) -> renormalised (2, 1)/sqrt(5), so
    # P = sigmoid(10 * (2/sqrt(5) + 1)); the un-renormalised mean would give sigmoid(10 * 5/3).
    assert probs[0, 0].item() == pytest.approx(1 / (1 + math.exp(-10 * (2 / math.sqrt(5) + 1))), rel=1e-6)


def test_zero_shot_finding_subset_and_order():
    ps = PromptSet.from_dict(TOY)
    images = torch.tensor([[0.6, 0.8], [0.0, -1.0]])
    full = zero_shot_probabilities(images, FakeEncoder(), ps, logit_scale=5.0)
    enc = FakeEncoder()
    swapped = zero_shot_probabilities(images, enc, ps, ["beta", "alpha"], logit_scale=torch.tensor(5.0))
    assert torch.allclose(swapped, full.flip(1))
    only = zero_shot_probabilities(images, enc, ps, ["beta"], logit_scale=5.0)
    assert torch.allclose(only[:, 0], full[:, 1])
    assert "Alpha seen." not in enc.calls[-1]


def test_zero_shot_refuses_bad_input():
    ps = PromptSet.from_dict(TOY)
    images = torch.tensor([[1.0, 0.0]])
    with pytest.raises(VolumeVLMError, match="unknown finding 'gamma'"):
        zero_shot_probabilities(images, FakeEncoder(), ps, ["gamma"], logit_scale=1.0)
    with pytest.raises(VolumeVLMError, match="logit_scale"):
        zero_shot_probabilities(images, FakeEncoder(), ps, logit_scale=0.0)
    with pytest.raises(VolumeVLMError, match=r"image_emb: must be a \[B, E\]"):
        zero_shot_probabilities(torch.ones(2), FakeEncoder(), ps, logit_scale=1.0)
    with pytest.raises(VolumeVLMError, match="embedding size 2 differs from image_emb's 3"):
        zero_shot_probabilities(torch.ones(1, 3), FakeEncoder(), ps, logit_scale=1.0)
    with pytest.raises(VolumeVLMError, match=r"encode_text: must return a \[7, E\]"):
        zero_shot_probabilities(images, lambda texts: torch.ones(2, 2), ps, logit_scale=1.0)


def test_prompt_set_validates_direct_construction():
    with pytest.raises(VolumeVLMError, match="templates.negative: missing"):
        PromptSet(name="x", description="d", templates={"positive": ["{finding}."]}, findings={"a": {"name": "a"}})
    with pytest.raises(VolumeVLMError, match="findings: must be a non-empty mapping"):
        PromptSet(name="x", description="d", templates={"positive": ["{finding}."], "negative": ["No {finding}."]}, findings={})
