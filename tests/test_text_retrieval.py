"""Text -> report-section retrieval: the metric (volumevlm.metrics.text_retrieval_precision)
against hand-computed examples, and the bundled free-phrased queries
(volumevlm/text/data/queries/) against the labeler, the prompts and the report writer.

The evaluate section that wires both to a checkpoint is checked against a hand
computation in tests/test_evaluate.py.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from volumevlm.errors import InputError, VolumeVLMError
from volumevlm.metrics import text_retrieval_precision
from volumevlm.text.findings import FINDING_SETS
from volumevlm.text.labeler import label_findings
from volumevlm.text.queries import QuerySet, available_query_sets, load_query_set, query_set_for

# ------------------------------------------------------------------ the metric, by hand

# One-dimensional embeddings: the query [1] ranks the corpus by its value, [-1] reverses it.
# Corpus rows 0..14 hold 15, 14, ..., 1, so [1] ranks them 0, 1, ..., 14.
CORPUS = np.arange(15, 0, -1, dtype=float)[:, None]
FINDINGS = ["a", "b", "c"]
POSITIVE = np.zeros((15, 3), dtype=bool)
POSITIVE[[0, 1, 2, 9, 10, 11, 12], 0] = True  # "a": 7 positives
POSITIVE[14, 1] = True  # "b": 1 positive, ranked last by [1], first by [-1]
# "c": no positive section at all


def test_precision_over_min_k_positives_and_the_negated_share_match_a_hand_computation():
    queries = np.array([[1.0], [-1.0], [-1.0], [1.0], [1.0]])
    result = text_retrieval_precision(queries, CORPUS, ["a", "a", "b", "b", "c"], [False, True, False, False, False],
                                      POSITIVE, FINDINGS, k=10)
    a, b = result["per_finding"]["a"], result["per_finding"]["b"]
    # "a" has 7 positives < 10: precision over the top 7 (rows 0..6 hold 0, 1, 2): 3/7. Over
    # the top 10 it would be 4/10, and 4 hits divided by min(10, 7) would be 4/7.
    assert a["precision_at_10"] == pytest.approx(3 / 7)
    # Negated "a" ([-1]: rows 14, 13, ..., 5): positives 12, 11, 10, 9 among the top 10.
    assert a["negated_positive_rate_at_10"] == pytest.approx(4 / 10)
    # "b": [-1] puts its one positive first (1.0), [1] puts it last (0.0): mean 0.5.
    assert b["precision_at_10"] == pytest.approx(0.5) and b["negated_positive_rate_at_10"] is None
    values = [q["value"] for q in result["per_query"]]
    assert values[:4] == pytest.approx([3 / 7, 0.4, 1.0, 0.0]) and values[4] is None
    assert [q["k"] for q in result["per_query"]] == [7, 10, 1, 1, 0]
    assert result["per_query"][0]["top"] == list(range(10)) and result["per_query"][1]["top"] == list(range(14, 4, -1))
    # "c" has no positive section: asked but not scored, and left out of the means.
    assert result["per_finding"]["c"]["precision_at_10"] is None and result["per_finding"]["c"]["positives"] == 0
    assert result["findings_scored"] == 2
    assert result["precision_at_10"] == pytest.approx((3 / 7 + 0.5) / 2)
    assert result["negated_positive_rate_at_10"] == pytest.approx(0.4)
    assert (a["queries"], a["negated_queries"], b["queries"], b["negated_queries"]) == (1, 1, 2, 0)
    # Chance: a random ranking's expectation, positives / corpus size.
    assert a["chance"] == pytest.approx(7 / 15) and b["chance"] == pytest.approx(1 / 15)
    assert result["chance"]["precision_at_10"] == pytest.approx((7 / 15 + 1 / 15) / 2)
    assert result["chance"]["negated_positive_rate_at_10"] == pytest.approx(7 / 15)


def test_a_perfect_and_a_negation_blind_model():
    """Two constructed text towers on one corpus: one that separates stated from denied
    findings, one that sees only the finding's word (the failure the metric is for)."""
    # Sections: 4 state "a" present, 12 deny it. Dimension 0 is "mentions a", dimension 1
    # "affirms it". The blind model drops dimension 1.
    stated = np.array([[1.0, 1.0]] * 4)
    denied = np.array([[1.0, -1.0]] * 12)
    corpus = np.concatenate([stated, denied])
    positive = np.array([[True]] * 4 + [[False]] * 12)
    queries, negated = np.array([[1.0, 1.0], [1.0, -1.0]]), [False, True]
    perfect = text_retrieval_precision(queries, corpus, ["a", "a"], negated, positive, ["a"])
    assert perfect["precision_at_10"] == 1.0 and perfect["negated_positive_rate_at_10"] == 0.0
    blind = text_retrieval_precision(queries * [1, 0], corpus * [1, 0], ["a", "a"], negated, positive, ["a"])
    # Every section scores the same for the blind model: ties count against it, both ways.
    assert blind["precision_at_10"] == 0.0
    assert blind["negated_positive_rate_at_10"] == pytest.approx(4 / 10)


def test_bad_shapes_and_unknown_findings_fail_in_one_line():
    good = dict(query_emb=np.ones((1, 1)), corpus_emb=CORPUS, query_findings=["a"], query_negated=[False],
                corpus_positive=POSITIVE, findings=FINDINGS)
    for change in ({"corpus_positive": POSITIVE[:, :2]}, {"query_findings": ["z"]}, {"query_negated": []},
                   {"corpus_emb": np.ones((15, 2))}, {"k": 0}, {"query_emb": np.full((1, 1), np.nan)}):
        with pytest.raises(VolumeVLMError) as err:
            text_retrieval_precision(**{**good, **change})
        assert "\n" not in str(err.value) and "text_retrieval_precision" in str(err.value)


# ------------------------------------------------------------------ the bundled queries


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def test_the_synthetic_queries_cover_every_finding_with_negated_counterparts():
    assert "synthetic" in available_query_sets()
    queries = load_query_set("synthetic")
    assert queries.keys == list(FINDING_SETS["synthetic"])
    for key, lists in queries.findings.items():
        assert len(lists["positive"]) >= 3 and len(lists["negated"]) == len(lists["positive"]), key
    assert query_set_for(FINDING_SETS["synthetic"]).name == "synthetic"
    assert query_set_for(["no_such_finding"]) is None


def test_the_labeler_reads_every_query_as_meaning_what_it_says():
    """A positive query states its finding, a negated one denies it, and neither speaks of
    another synthetic finding: otherwise the judge and the query would disagree."""
    queries = load_query_set("synthetic")
    synthetic = FINDING_SETS["synthetic"]
    for polarity, status in (("positive", "positive"), ("negated", "negative")):
        for key, text in queries.queries(polarity):
            assert label_findings(text, synthetic) == {key: status}, (polarity, text)


def test_the_queries_are_held_out_from_the_prompts_and_the_report_writer():
    from volumevlm.data.synthetic.cohort import sample_cohort
    from volumevlm.text.labeler import report_sentences
    from volumevlm.text.prompts import load_prompt_set
    from volumevlm.text.sections import report_sections

    prompts = load_prompt_set("synthetic")
    seen = {_normal(t) for key in prompts.keys for polarity in prompts.texts(key) for t in polarity}
    for case in sample_cohort(seed=0, n=400):
        seen.update(_normal(sentence) for sentence, _ in report_sentences(case["report"]))
        seen.update(_normal(section.split(":", 1)[1]) for section in report_sections(case["report"]))
    assert len(seen) > 200  # the writer's phrasings were really collected
    queries = load_query_set("synthetic")
    copied = [text for polarity in ("positive", "negated") for _, text in queries.queries(polarity)
              if _normal(text) in seen]
    assert not copied


def test_a_bad_query_file_fails_in_one_line_naming_it(tmp_path):
    cases = {
        "unknown_finding.yaml": "name: x\nfindings:\n  not_a_finding:\n    positive: [Q.]\n",
        "no_positive.yaml": "name: x\nfindings:\n  ascites:\n    negated: [No ascites.]\n",
        "bad_key.yaml": "name: x\nfindings:\n  ascites:\n    positive: [Ascites.]\n    negative: [No.]\n",
        "duplicate.yaml": "name: x\nfindings:\n  ascites:\n    positive: [A.]\n  ascites:\n    positive: [B.]\n",
        "not_yaml.yaml": "name: [unclosed\n",
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(InputError) as err:
            load_query_set(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value), name
    with pytest.raises(InputError):
        load_query_set(tmp_path / "missing.yaml")
    with pytest.raises(VolumeVLMError, match="no bundled query set"):
        load_query_set("merlin31")
    good = QuerySet.from_dict({"name": "mine", "findings": {"ascites": {"positive": ["Belly  fluid."]}}})
    assert good.queries("positive") == [("ascites", "Belly fluid.")] and good.queries("negated") == []
