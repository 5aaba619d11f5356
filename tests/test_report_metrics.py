"""Report-generation figures (volumevlm.metrics.report) against hand-computed values."""

from __future__ import annotations

import math
import random

import pytest

from volumevlm.errors import VolumeVLMError
from volumevlm.metrics.report import (
    bleu_statistics,
    clinical_efficacy,
    corpus_bleu,
    distinct_ratio,
    lcs_length,
    report_metrics,
    rouge_l,
    rouge_l_scores,
    text_tokens,
)

# ---------------------------------------------------------------------- tokens


def test_tokens_are_lower_case_words_and_numbers_without_punctuation_or_headers():
    assert text_tokens("Splenomegaly, 14.5 cm. The liver is NORMAL.") == [
        "splenomegaly", "14.5", "cm", "the", "liver", "is", "normal"]
    assert text_tokens("FINDINGS:\nSPLEEN: Normal.\nLIVER AND BILIARY TREE: Fatty-infiltration.\n\nIMPRESSION:\n1. Normal.") == [
        "normal", "fatty", "infiltration", "1", "normal"]
    # An unknown header is text like any other.
    assert text_tokens("LIVER: normal.") == ["liver", "normal"]
    assert text_tokens("SPLEEN: normal.", headers=True) == ["spleen", "normal"]


# ---------------------------------------------------------------------- BLEU

# Case 1 matches exactly (4 tokens). Case 2, by hand, against its 6-token reference:
#   1-grams the spleen is enlarged            -> 3 of 4 match
#   2-grams the-spleen spleen-is is-enlarged  -> 2 of 3
#   3-grams the-spleen-is spleen-is-enlarged  -> 1 of 2
#   4-gram  the-spleen-is-enlarged            -> 0 of 1
# Pooled: p1 = 7/8, p2 = 5/6, p3 = 3/4, p4 = 1/2; c = 8, r = 4 + 6 = 10 -> BP = exp(1 - 10/8).
BLEU_CANDIDATES = ["The liver is normal.", "The spleen is enlarged."]
BLEU_REFERENCES = ["the liver is normal", "The spleen is normal in size."]


def test_corpus_bleu4_of_a_tiny_corpus_equals_the_hand_computation():
    stats = bleu_statistics(BLEU_CANDIDATES, BLEU_REFERENCES)
    assert stats["matches"] == [7, 5, 3, 1] and stats["totals"] == [8, 6, 4, 2]
    assert (stats["candidate_length"], stats["reference_length"]) == (8, 10)
    expected = math.exp(1 - 10 / 8) * (7 / 8 * 5 / 6 * 3 / 4 * 1 / 2) ** 0.25
    assert corpus_bleu(BLEU_CANDIDATES, BLEU_REFERENCES) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.5632, abs=1e-4)
    # Corpus BLEU pools counts: it is not the mean of the per-case scores.
    per_case = [corpus_bleu([c], [r]) for c, r in zip(BLEU_CANDIDATES, BLEU_REFERENCES)]
    assert per_case == [pytest.approx(1.0), 0.0]


def test_bleu_clips_repeated_ngrams_and_has_no_penalty_for_long_candidates():
    # "the" x4 against a reference with one "the": clipped to 1 of 4; c = 4 > r = 2 -> BP = 1.
    assert corpus_bleu(["the the the the"], ["the cat"], max_n=1) == pytest.approx(0.25)
    # No 4-gram in common anywhere -> BLEU-4 = 0 (no smoothing).
    assert corpus_bleu(["no ascites seen"], ["no ascites seen here"]) == 0.0
    assert corpus_bleu([""], ["no ascites"]) == 0.0


def test_bleu_with_several_references_uses_the_closest_length_and_the_best_counts():
    # Candidate of 5 tokens; references of 4 and 6 tokens are equally close: the shorter counts.
    stats = bleu_statistics(["a b c d e"], [["a b c d", "a b c d e f"]], max_n=2)
    assert stats["reference_length"] == 4 and stats["brevity_penalty"] == 1.0
    # Unigram "e" only appears in the second reference: clipping takes the maximum over references.
    assert stats["matches"] == [5, 4]
    assert corpus_bleu(["a b c d e"], [["a b c d", "a b c d e f"]], max_n=2) == pytest.approx(1.0)
    short = bleu_statistics(["a b"], ["a b c d"], max_n=1)
    assert short["brevity_penalty"] == pytest.approx(math.exp(1 - 4 / 2))


# ---------------------------------------------------------------------- ROUGE-L


def test_rouge_l_is_the_lcs_f_measure():
    # LCS("the liver is enlarged", "the liver is not enlarged today") = 4: P = 4/4, R = 4/6.
    scores = rouge_l_scores("The liver is enlarged.", "The liver is not enlarged today.", beta=1.0)
    assert scores["precision"] == pytest.approx(1.0) and scores["recall"] == pytest.approx(4 / 6)
    assert scores["f"] == pytest.approx(2 * 1.0 * (4 / 6) / (1.0 + 4 / 6))
    b2 = 1.2**2
    assert rouge_l_scores("The liver is enlarged.", "The liver is not enlarged today.")["f"] == pytest.approx(
        (1 + b2) * 1.0 * (4 / 6) / (4 / 6 + b2 * 1.0))
    # Lin's example: "police killed the gunman" vs "police kill the gunman": LCS = 3 of 4.
    assert rouge_l_scores("police killed the gunman", "police kill the gunman")["f"] == pytest.approx(0.75)
    # Order matters for a subsequence: reversed text shares only one token in order.
    assert lcs_length(list("abcd"), list("dcba")) == 1
    assert rouge_l(["a b c", "x y"], ["a b c", "p q"]) == pytest.approx(0.5)
    assert rouge_l_scores("", "text")["f"] == 0.0


def test_bit_parallel_lcs_equals_the_dynamic_programme():
    def table_lcs(a, b):
        row = [0] * (len(b) + 1)
        for x in a:
            prev_diag = 0
            for j, y in enumerate(b):
                prev_diag, row[j + 1] = row[j + 1], prev_diag + 1 if x == y else max(row[j + 1], row[j])
        return row[-1]

    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 90))]
        b = [rng.choice("abcdef") for _ in range(rng.randint(0, 130))]  # > 64 tokens: several machine words
        assert lcs_length(a, b) == table_lcs(a, b)


# ---------------------------------------------------------------------- clinical efficacy

CE_FINDINGS = ["splenomegaly", "ascites", "cardiomegaly", "hepatomegaly"]
CE_REFERENCES = [
    "Splenomegaly. No ascites.",
    "Moderate ascites. Splenomegaly.",
    "Possible mild splenomegaly.",
]
CE_GENERATED = [
    "Splenomegaly. Small volume ascites.",
    "No ascites. No splenomegaly.",
    "The spleen is normal in size. Cardiomegaly.",
]
# By hand (uncertain counts as present):
#   splenomegaly: case 1 TP, case 2 FN, case 3 FN (hedged reference = present)  -> F1 = 2/(2+0+2) = 0.5
#   ascites:      case 1 FP, case 2 FN                                           -> F1 = 0
#   cardiomegaly: case 3 FP                                                      -> F1 = 0
#   hepatomegaly: nowhere                                                        -> no F1, not averaged
# macro = (0.5 + 0 + 0) / 3; micro: TP 1, FP 2, FN 3 -> 2/(2+2+3) = 2/7.


def test_clinical_efficacy_counts_and_f1_by_hand():
    ce = clinical_efficacy(CE_GENERATED, CE_REFERENCES, CE_FINDINGS)
    spleen = ce["per_finding"]["splenomegaly"]
    assert (spleen["tp"], spleen["fp"], spleen["fn"], spleen["tn"]) == (1, 0, 2, 0)
    assert spleen["f1"] == pytest.approx(0.5) and spleen["precision"] == 1.0 and spleen["recall"] == pytest.approx(1 / 3)
    ascites = ce["per_finding"]["ascites"]
    assert (ascites["tp"], ascites["fp"], ascites["fn"], ascites["tn"]) == (0, 1, 1, 1) and ascites["f1"] == 0.0
    assert ce["per_finding"]["cardiomegaly"]["fp"] == 1 and ce["per_finding"]["cardiomegaly"]["f1"] == 0.0
    assert ce["per_finding"]["hepatomegaly"]["f1"] is None and ce["per_finding"]["hepatomegaly"]["tn"] == 3
    assert ce["findings_scored"] == 3
    assert ce["macro_f1"] == pytest.approx(0.5 / 3)
    assert ce["micro_f1"] == pytest.approx(2 / 7)
    assert ce["micro_precision"] == pytest.approx(1 / 3) and ce["micro_recall"] == pytest.approx(1 / 4)


def test_hedged_findings_can_count_as_absent():
    ce = clinical_efficacy(CE_GENERATED, CE_REFERENCES, CE_FINDINGS, uncertain="negative")
    spleen = ce["per_finding"]["splenomegaly"]
    assert (spleen["tp"], spleen["fn"], spleen["tn"]) == (1, 1, 1) and spleen["f1"] == pytest.approx(2 / 3)
    # A generated hedge on a true finding is a hit by default, a miss when hedges are absent.
    hedge = clinical_efficacy(["Possible small left pleural effusion."], ["Small left pleural effusion."], ["pleural_effusion"])
    assert hedge["macro_f1"] == 1.0
    strict = clinical_efficacy(["Possible small left pleural effusion."], ["Small left pleural effusion."], ["pleural_effusion"],
                               uncertain="negative")
    assert strict["macro_f1"] == 0.0
    with pytest.raises(VolumeVLMError):
        clinical_efficacy(["x"], ["y"], uncertain="maybe")


def test_perfect_and_empty_generations():
    refs = ["Splenomegaly.", "Cardiomegaly. No ascites.", "Unremarkable."]
    perfect = report_metrics(refs, refs, CE_FINDINGS)
    assert perfect["clinical_f1"] == 1.0 and perfect["clinical_f1_micro"] == 1.0
    assert perfect["bleu4"] == 0.0  # no reference here is 4 tokens long: BLEU-4 has nothing to count
    assert perfect["rouge_l"] == pytest.approx(1.0)
    silent = report_metrics(["", "", ""], refs, CE_FINDINGS)
    assert silent["clinical_f1"] == 0.0 and silent["clinical_f1_micro"] == 0.0
    assert math.isnan(silent["clinical_precision_micro"])  # nothing called present: precision undefined
    assert silent["distinct_ratio"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------------- diversity and the bundle


def test_distinct_ratio_counts_whitespace_normalised_texts():
    assert distinct_ratio(["No ascites.", "No  ascites.\n", "Splenomegaly.", " No ascites."]) == pytest.approx(2 / 4)
    assert distinct_ratio(["a", "b", "c"]) == 1.0
    assert distinct_ratio(["same"] * 5) == pytest.approx(1 / 5)


def test_report_metrics_bundle_and_one_line_errors():
    long_refs = ["The liver is normal in size and attenuation.", "The spleen is enlarged, measuring 15 cm."]
    metrics = report_metrics(long_refs, long_refs)
    assert set(metrics) == {"bleu4", "rouge_l", "clinical_f1", "clinical_f1_micro", "clinical_precision_micro",
                            "clinical_recall_micro", "findings_scored", "distinct_ratio", "cases"}
    assert metrics["bleu4"] == pytest.approx(1.0) and metrics["rouge_l"] == pytest.approx(1.0)
    assert metrics["cases"] == 2.0 and metrics["distinct_ratio"] == 1.0
    assert metrics["findings_scored"] == 1.0 and metrics["clinical_f1"] == 1.0  # splenomegaly only
    for bad_call in (
        lambda: report_metrics(["a"], ["a", "b"]),
        lambda: report_metrics("a", ["a"]),
        lambda: report_metrics([], []),
        lambda: report_metrics(["a"], [3]),
        lambda: corpus_bleu(["a"], ["a"], max_n=0),
        lambda: clinical_efficacy(["a"], ["a"], ["no_such_finding"]),
    ):
        with pytest.raises(VolumeVLMError) as err:
            bad_call()
        assert "\n" not in str(err.value)
