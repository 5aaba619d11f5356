"""Figures of generated reports against reference reports.

Natural-language figures (how close the wording is)
    :func:`corpus_bleu`: corpus BLEU (Papineni et al., 2002): modified n-gram precisions
    pooled over the whole corpus, their geometric mean with uniform weights, times the
    brevity penalty ``exp(1 - r / c)`` when the candidates' total length ``c`` is below the
    effective reference length ``r`` (per case, the reference length closest to the
    candidate's; a tie takes the shorter). No smoothing: a corpus with no matching
    4-gram has BLEU-4 = 0.
    :func:`rouge_l`: ROUGE-L (Lin, 2004): longest common subsequence (LCS) of candidate
    and reference tokens, precision ``LCS / len(candidate)``, recall ``LCS /
    len(reference)``, F-measure ``(1 + b^2) P R / (R + b^2 P)``. ``beta`` defaults to 1.2,
    the value of the COCO caption evaluation that report-generation papers use; the
    corpus figure is the mean over cases.

    Both compare :func:`text_tokens`: lower-cased words and numbers ("4.2" stays one
    token), punctuation dropped (as the COCO caption tokenizer does), after removing the
    section headers of the synthetic reports (``LIVER AND BILIARY TREE:``, ``FINDINGS:``,
    ``IMPRESSION:``): a sectioned generator is prompted with those headers, so counting
    them would credit it for text it did not write.

Clinical efficacy (whether the findings are right)
    :func:`clinical_efficacy` labels generated and reference reports with the rule-based
    labeler (:func:`volumevlm.text.labeler.label_findings`) and scores each finding as a
    binary "present" call per case:

    * ``"positive"`` -> present;
    * ``"uncertain"`` (hedged: "possible splenomegaly", "... cannot be excluded") ->
      present by default (``uncertain="positive"``): in the synthetic cohort a hedged
      finding IS present (the labels say 1), and a generator that hedges on a true
      finding has still raised it; ``uncertain="negative"`` counts hedges as absent;
    * ``"negative"`` or not mentioned -> absent.

    Per finding: true positives (present in both), false positives (generated only),
    false negatives (reference only), precision, recall and F1 = 2 TP / (2 TP + FP + FN).
    A finding present in no reference and no generated report has no F1 (None) and is
    left out of the macro average; one present somewhere but never matched has F1 = 0.
    Macro F1 is the mean of the defined per-finding F1s; micro F1 pools TP, FP and FN over
    all findings first, so frequent findings weigh more.

:func:`distinct_ratio`: distinct generated reports / cases (whitespace-normalised): 1.0
when every case gets its own text, 1 / n when a collapsed generator writes one report
for all n cases.

:func:`report_metrics` returns all of them in one flat dict. Every function raises a
one-line :class:`~volumevlm.errors.VolumeVLMError` on bad input.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from volumevlm.errors import VolumeVLMError
from volumevlm.text.sections import FINDINGS_HEADER, IMPRESSION_HEADER, SECTIONS

__all__ = [
    "UNCERTAIN_CHOICES", "bleu_statistics", "clinical_efficacy", "corpus_bleu", "distinct_ratio",
    "f1_from_counts", "findings_efficacy", "format_report_metrics", "lcs_length", "present_findings", "report_metrics",
    "rouge_l", "rouge_l_scores", "strip_headers", "text_tokens",
]

UNCERTAIN_CHOICES = ("positive", "negative")

# Words and numbers; a decimal number ("4.2") is one token, a sentence-final "." is not part of it.
_TOKEN = re.compile(r"\d+(?:\.\d+)?|[^\W\d_]+(?:'[^\W\d_]+)?")
_HEADERS = re.compile(
    r"^[ \t]*(?:" + "|".join(re.escape(h) for h in (FINDINGS_HEADER, IMPRESSION_HEADER, *SECTIONS)) + r")[ \t]*:",
    re.MULTILINE | re.IGNORECASE,
)


# --------------------------------------------------------------------------- inputs


def _texts(values: Any, what: str) -> list[str]:
    if isinstance(values, str):
        raise VolumeVLMError(f"{what}: expected a list of report texts, got one str")
    try:
        values = list(values)
    except TypeError:
        raise VolumeVLMError(f"{what}: expected a list of report texts, got {type(values).__name__}") from None
    for i, text in enumerate(values):
        if not isinstance(text, str):
            raise VolumeVLMError(f"{what}[{i}]: expected a str, got {type(text).__name__}")
    return values


def _reference_sets(references: Any, n: int, what: str = "references") -> list[list[str]]:
    """references: one str per case, or one non-empty list of str per case -> [[str, ...], ...]."""
    if isinstance(references, str):
        raise VolumeVLMError(f"{what}: expected one reference (or a list of references) per case, got one str")
    try:
        references = list(references)
    except TypeError:
        raise VolumeVLMError(f"{what}: expected a list, got {type(references).__name__}") from None
    if len(references) != n:
        raise VolumeVLMError(f"{what}: {len(references)} references for {n} generated reports")
    out = []
    for i, ref in enumerate(references):
        group = [ref] if isinstance(ref, str) else _texts(ref, f"{what}[{i}]")
        if not group:
            raise VolumeVLMError(f"{what}[{i}]: no reference text")
        out.append(group)
    return out


def strip_headers(text: str) -> str:
    """The text without the synthetic reports' section headers ("SPLEEN:", "FINDINGS:", "IMPRESSION:")."""
    return _HEADERS.sub(" ", text)


def text_tokens(text: str, headers: bool = False) -> list[str]:
    """Lower-cased word and number tokens of ``text``, punctuation dropped; section headers
    are removed first unless ``headers``. "Splenomegaly, 14.5 cm." -> ["splenomegaly", "14.5", "cm"]."""
    if not isinstance(text, str):
        raise VolumeVLMError(f"text_tokens: expected a str, got {type(text).__name__}")
    return _TOKEN.findall((text if headers else strip_headers(text)).lower())


# --------------------------------------------------------------------------- BLEU


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu_statistics(candidates: Sequence[str], references: Sequence, max_n: int = 4) -> dict[str, Any]:
    """The counts corpus BLEU is made of.

    Returns {"matches": [clipped n-gram matches for n = 1..max_n], "totals": [candidate
    n-grams], "candidate_length" c, "reference_length" r (effective), "precisions" [p_n],
    "brevity_penalty"}.
    """
    candidates = _texts(candidates, "candidates")
    refs = _reference_sets(references, len(candidates))
    if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 1:
        raise VolumeVLMError(f"bleu: max_n must be a positive integer, got {max_n!r}")
    matches, totals = [0] * max_n, [0] * max_n
    c_len = r_len = 0
    for cand, group in zip(candidates, refs):
        cand_tokens = text_tokens(cand)
        ref_tokens = [text_tokens(r) for r in group]
        c = len(cand_tokens)
        c_len += c
        # Effective reference length: the reference length closest to c, the shorter on a tie.
        r_len += min((abs(len(t) - c), len(t)) for t in ref_tokens)[1]
        for n in range(1, max_n + 1):
            cand_counts = _ngrams(cand_tokens, n)
            if not cand_counts:
                continue
            most = Counter()
            for tokens in ref_tokens:
                most |= _ngrams(tokens, n)  # | keeps the per-n-gram maximum over references
            matches[n - 1] += sum(min(count, most[gram]) for gram, count in cand_counts.items())
            totals[n - 1] += sum(cand_counts.values())
    precisions = [m / t if t else 0.0 for m, t in zip(matches, totals)]
    if c_len == 0:
        penalty = 0.0
    elif c_len >= r_len:
        penalty = 1.0
    else:
        penalty = math.exp(1.0 - r_len / c_len)
    return {"matches": matches, "totals": totals, "candidate_length": c_len, "reference_length": r_len,
            "precisions": precisions, "brevity_penalty": penalty}


def corpus_bleu(candidates: Sequence[str], references: Sequence, max_n: int = 4) -> float:
    """Corpus BLEU-``max_n`` in [0, 1] (see the module docstring).

    candidates: N generated texts. references: N reference texts, or N lists of
    alternative references. Returns BP * exp(mean_n log p_n); 0.0 when any p_n is 0.
    """
    stats = bleu_statistics(candidates, references, max_n)
    if stats["brevity_penalty"] == 0.0 or min(stats["precisions"]) == 0.0:
        return 0.0
    return stats["brevity_penalty"] * math.exp(sum(math.log(p) for p in stats["precisions"]) / max_n)


# --------------------------------------------------------------------------- ROUGE-L


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences.

    Bit-parallel (Hyyro, 2004): one machine word per 64 tokens of ``b`` instead of a
    len(a) x len(b) table, so whole reports compare in microseconds.
    """
    if not a or not b:
        return 0
    positions: dict[str, int] = {}
    for j, token in enumerate(b):
        positions[token] = positions.get(token, 0) | (1 << j)
    full = (1 << len(b)) - 1
    v = full  # zero bits of v mark the columns where the LCS has grown
    for token in a:
        u = v & positions.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(b) - bin(v).count("1")


def rouge_l_scores(candidate: str, reference: str, beta: float = 1.2) -> dict[str, float]:
    """{"precision", "recall", "f"} of ROUGE-L for one candidate and one reference (0 when either is empty)."""
    if not (isinstance(beta, (int, float)) and beta > 0):
        raise VolumeVLMError(f"rouge_l: beta must be a positive number, got {beta!r}")
    cand, ref = text_tokens(candidate), text_tokens(reference)
    lcs = lcs_length(cand, ref)
    if lcs == 0:
        return {"precision": 0.0, "recall": 0.0, "f": 0.0}
    precision, recall = lcs / len(cand), lcs / len(ref)
    b2 = float(beta) ** 2
    return {"precision": precision, "recall": recall, "f": (1 + b2) * precision * recall / (recall + b2 * precision)}


def rouge_l(candidates: Sequence[str], references: Sequence, beta: float = 1.2) -> float:
    """Mean ROUGE-L F-measure over cases (the best reference of each case when it has several)."""
    candidates = _texts(candidates, "candidates")
    refs = _reference_sets(references, len(candidates))
    if not candidates:
        raise VolumeVLMError("rouge_l: no generated reports")
    scores = [max(rouge_l_scores(c, r, beta)["f"] for r in group) for c, group in zip(candidates, refs)]
    return sum(scores) / len(scores)


# --------------------------------------------------------------------------- clinical efficacy


def present_findings(report: str, findings: Sequence[str] | None = None, uncertain: str = "positive") -> set[str]:
    """The findings a report calls present (see the module docstring for hedges)."""
    from volumevlm.text.labeler import label_findings

    if uncertain not in UNCERTAIN_CHOICES:
        raise VolumeVLMError(f"clinical efficacy: uncertain must be one of {UNCERTAIN_CHOICES}, got {uncertain!r}")
    present = {"positive", "uncertain"} if uncertain == "positive" else {"positive"}
    return {key for key, status in label_findings(report, findings).items() if status in present}


def f1_from_counts(tp: int, fp: int, fn: int) -> float | None:
    """2 TP / (2 TP + FP + FN); None when all three are 0 (the finding occurs nowhere)."""
    denominator = 2 * tp + fp + fn
    return None if denominator == 0 else 2 * tp / denominator


def _ratio(numerator: int, denominator: int) -> float | None:
    return None if denominator == 0 else numerator / denominator


def clinical_efficacy(generated: Sequence[str], references: Sequence[str], findings: Sequence[str] | None = None,
                      uncertain: str = "positive") -> dict[str, Any]:
    """Per-finding and averaged F1 of the findings generated reports call present.

    generated, references: N report texts each (one reference per case).
    findings: finding keys or names to score (None: every finding the labeler knows,
    :data:`volumevlm.text.labeler.KNOWN_FINDINGS`). uncertain: "positive" (a hedged
    finding counts as present, the default) or "negative".

    Returns {"per_finding": {key: {"tp", "fp", "fn", "tn", "support" (reference
    positives), "precision", "recall", "f1"}} (None where undefined), "macro_f1" (mean
    of the defined per-finding F1s; None when none is defined), "micro_precision",
    "micro_recall", "micro_f1", "findings_scored" (how many findings the macro averages)}.
    """
    from volumevlm.text.labeler import resolve_findings

    generated = _texts(generated, "generated")
    references = _texts(references, "references")
    if len(generated) != len(references):
        raise VolumeVLMError(f"clinical efficacy: {len(generated)} generated reports for {len(references)} references")
    if uncertain not in UNCERTAIN_CHOICES:
        raise VolumeVLMError(f"clinical efficacy: uncertain must be one of {UNCERTAIN_CHOICES}, got {uncertain!r}")
    keys = resolve_findings(findings)
    said = [present_findings(gen, keys, uncertain) for gen in generated]
    truth = [present_findings(ref, keys, uncertain) for ref in references]
    return findings_efficacy(said, truth, keys)


def findings_efficacy(said: Sequence[set[str]], truth: Sequence[set[str]], keys: Sequence[str]) -> dict[str, Any]:
    """:func:`clinical_efficacy` of findings already read: per case the set of finding keys
    called present (``said``) and the set truly present (``truth``), scored over ``keys``
    (a key outside ``keys`` is ignored). Same return value."""
    if len(said) != len(truth):
        raise VolumeVLMError(f"findings efficacy: {len(said)} cases called, {len(truth)} with their truth")
    counts = {key: {"tp": 0, "fp": 0, "fn": 0, "tn": 0} for key in keys}
    for case_said, case_truth in zip(said, truth):
        for key in keys:
            cell = ("tp" if key in case_truth else "fp") if key in case_said else ("fn" if key in case_truth else "tn")
            counts[key][cell] += 1
    per_finding: dict[str, dict[str, Any]] = {}
    for key, c in counts.items():
        per_finding[key] = {
            **c,
            "support": c["tp"] + c["fn"],
            "precision": _ratio(c["tp"], c["tp"] + c["fp"]),
            "recall": _ratio(c["tp"], c["tp"] + c["fn"]),
            "f1": f1_from_counts(c["tp"], c["fp"], c["fn"]),
        }
    defined = [v["f1"] for v in per_finding.values() if v["f1"] is not None]
    tp = sum(c["tp"] for c in counts.values())
    fp = sum(c["fp"] for c in counts.values())
    fn = sum(c["fn"] for c in counts.values())
    return {
        "per_finding": per_finding,
        "macro_f1": sum(defined) / len(defined) if defined else None,
        "micro_precision": _ratio(tp, tp + fp),
        "micro_recall": _ratio(tp, tp + fn),
        "micro_f1": f1_from_counts(tp, fp, fn),
        "findings_scored": len(defined),
    }


# --------------------------------------------------------------------------- diversity


def distinct_ratio(generated: Sequence[str]) -> float:
    """Distinct generated reports / cases, comparing whitespace-normalised texts."""
    generated = _texts(generated, "generated")
    if not generated:
        raise VolumeVLMError("distinct_ratio: no generated reports")
    return len({" ".join(text.split()) for text in generated}) / len(generated)


# --------------------------------------------------------------------------- all together


def report_metrics(generated: Sequence[str], references: Sequence[str], findings: Sequence[str] | None = None,
                   uncertain: str = "positive", beta: float = 1.2) -> dict[str, float]:
    """Every figure at once, as a flat {name: float} dict (NaN where undefined).

    Keys: "bleu4", "rouge_l", "clinical_f1" (macro F1 over the scored findings),
    "clinical_f1_micro", "clinical_precision_micro", "clinical_recall_micro",
    "findings_scored", "distinct_ratio", "cases". Arguments as in
    :func:`clinical_efficacy` and :func:`rouge_l`; one reference text per case.
    """
    generated = _texts(generated, "generated")
    references = _texts(references, "references")
    if not generated:
        raise VolumeVLMError("report_metrics: no generated reports")
    if len(generated) != len(references):
        raise VolumeVLMError(f"report_metrics: {len(generated)} generated reports for {len(references)} references")
    clinical = clinical_efficacy(generated, references, findings, uncertain)

    def number(value: float | None) -> float:
        return math.nan if value is None else float(value)

    return {
        "bleu4": corpus_bleu(generated, references, 4),
        "rouge_l": rouge_l(generated, references, beta),
        "clinical_f1": number(clinical["macro_f1"]),
        "clinical_f1_micro": number(clinical["micro_f1"]),
        "clinical_precision_micro": number(clinical["micro_precision"]),
        "clinical_recall_micro": number(clinical["micro_recall"]),
        "findings_scored": float(clinical["findings_scored"]),
        "distinct_ratio": distinct_ratio(generated),
        "cases": float(len(generated)),
    }


def format_report_metrics(metrics: Mapping[str, float]) -> str:
    """The figures of :func:`report_metrics` as aligned lines."""
    order = ("clinical_f1", "clinical_f1_micro", "bleu4", "rouge_l", "distinct_ratio", "cases")
    lines = []
    for key in order:
        if key in metrics:
            value = metrics[key]
            lines.append(f"{key:<22}{'n/a' if isinstance(value, float) and math.isnan(value) else format(value, '.3f'):>8}")
    return "\n".join(lines)


__all__ = [
    "bleu_statistics",
    "clinical_efficacy",
    "corpus_bleu",
    "distinct_ratio",
    "f1_from_counts",
    "format_report_metrics",
    "lcs_length",
    "present_findings",
    "report_metrics",
    "rouge_l",
    "rouge_l_scores",
    "strip_headers",
    "text_tokens",
]
