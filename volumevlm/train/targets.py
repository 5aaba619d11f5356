"""What pretraining reads in each case's report and codes, computed once per case.

The rule-based labeler (:mod:`volumevlm.text.labeler`), the report's sentences and
sections, their token ids and the phecode targets do not change from one epoch to the
next, so the datamodule computes them once (:func:`read_case`) and batches carry the
result (``batch["reading"]``, one :class:`CaseReading` per case). The pretraining module
reads them from there, or (a batch without readings, e.g. from a plain
:class:`~volumevlm.data.datasets.PretrainDataset`) computes the same thing with the same
functions here: one definition either way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from volumevlm.text.sections import report_sections


class CaseReading:
    """One case's report and codes as the objective uses them (read-only by convention).

    findings: float32 [F] the labeler's reading of the report over the objective's finding
        keys (1 present or hedged, 0 negative or not mentioned); None without a report.
    statuses: {finding key: True (present or hedged) / False (negative)} for the findings
        the report mentions; None without a report.
    sentences: (sentence, {key: present?}, token ids) for the report's sentences that state
        at least one finding.
    sections: (section text "HEADER: text", findings float32 [F], token ids), or the whole
        report as its one section when it has none.
    negations: (text, findings float32 [F], token ids) of :func:`negated_section` of every
        section that states a finding present (where the labeler confirms the denial).
    affirmations: the same for :func:`affirmed_section` (the denials' affirmed twins).
    report_tokens: token ids of the whole report (truncated at ``token_length``), or None.
    phenotype_targets: float32 [V] multi-hot phecodes over the vocabulary; None when not
        computed.
    token_length: the truncation length the token ids were made with (0: no token ids).
    keys: the finding keys of ``findings`` and ``statuses``.

    A plain object, not a dataclass: Lightning's batch transfer rebuilds dataclasses field
    by field, and these hold no tensors to move.
    """

    __slots__ = ("findings", "statuses", "sentences", "sections", "negations", "affirmations", "report_tokens",
                 "phenotype_targets", "token_length", "keys")

    def __init__(self, findings=None, statuses=None, sentences=(), sections=(), report_tokens=None,
                 phenotype_targets=None, token_length: int = 0, keys: tuple[str, ...] = (), negations=(),
                 affirmations=()):
        self.findings = findings
        self.statuses = statuses
        self.sentences = sentences
        self.sections = sections
        self.negations = negations
        self.affirmations = affirmations
        self.report_tokens = report_tokens
        self.phenotype_targets = phenotype_targets
        self.token_length = int(token_length)
        self.keys = tuple(keys)


def present_or_absent(labels: Mapping[str, str]) -> dict[str, bool]:
    """The labeler's statuses as True (positive or hedged) / False (negative)."""
    return {key: status != "negative" for key, status in labels.items()}


def findings_vector(text: str, keys: Sequence[str]) -> np.ndarray:
    """float32 [F]: the labeler's reading of ``text`` over ``keys`` (hedged counts as present)."""
    from volumevlm.text.labeler import findings_matrix, label_findings

    return findings_matrix([label_findings(text, keys)], keys)[0].astype(np.float32)


def finding_sentence_candidates(report: str, keys: Sequence[str]) -> list[tuple[str, dict[str, bool]]]:
    """The report's sentences that state a finding, each with what it states."""
    from volumevlm.text.labeler import label_findings, report_sentences

    candidates = [(text, present_or_absent(label_findings(context, keys))) for text, context in report_sentences(report)]
    return [(text, labels) for text, labels in candidates if labels]


_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")
# How a stated sentence is denied. Radiologists write the negation before the finding ("No
# splenomegaly.") and after it ("Splenomegaly is not seen.", "... is absent."); the
# synthetic reports nearly always put it first, so a text tower trained on them alone reads
# only that form. Each sentence gets one form, fixed by a checksum of its text (the same
# every epoch and every run).
NEGATION_FORMS: tuple[str, ...] = ("No {lower}", "{bare} is not seen.", "{bare} is absent.")
# The same words without the negation, form for form. A denial worded after the finding
# brings words ("seen", "absent") the reports never use otherwise; on their own they would
# teach the tower that "seen" means "not there" (on the 2026-12-07 demo model, "Splenomegaly
# is seen." retrieved "SPLEEN: No splenomegaly." first). Each such denial therefore gets its
# affirmed twin, and the two differ by the negation alone. "{sentence}" keeps the sentence.
AFFIRMATION_FORMS: tuple[str, ...] = ("{sentence}", "{bare} is seen.", "{bare} is present.")


def _restated(sentence: str, form: str) -> str:
    """``sentence`` put into ``form`` (one of NEGATION_FORMS or AFFIRMATION_FORMS)."""
    bare = sentence.rstrip(" .")
    return form.format(lower=sentence[:1].lower() + sentence[1:], bare=bare, sentence=sentence)


def _denial_form(prefix: str, sentence: str, keys: Sequence[str]) -> int:
    """Index into NEGATION_FORMS of the denial :func:`negated_section` gives ``sentence``:
    the one fixed by a checksum of its text, or 0 ("No ...") where the labeler does not
    read that form as a denial."""
    import zlib

    from volumevlm.text.labeler import POSITIVE, label_findings

    index = zlib.crc32(sentence.encode("utf-8")) % len(NEGATION_FORMS)
    if index and POSITIVE in label_findings(prefix + _restated(sentence, NEGATION_FORMS[index]), keys).values():
        return 0
    return index


def _restate_section(section: str, keys: Sequence[str], restate) -> tuple[str, dict] | None:
    """``section`` with every sentence that states a finding present replaced by
    ``restate(prefix, sentence)`` (prefix: "HEADER: " or ""), and the labeler's reading of
    the original; None when it states nothing present."""
    from volumevlm.text.labeler import POSITIVE, label_findings

    header, colon, body = section.partition(": ")
    if not colon:
        header, body = "", section
    prefix = f"{header}: " if header else ""
    before = label_findings(section, keys)
    if POSITIVE not in before.values():
        return None
    sentences = [restate(prefix, sentence) if POSITIVE in label_findings(prefix + sentence, keys).values() else sentence
                 for sentence in _SENTENCE_BREAK.split(body)]
    return prefix + " ".join(sentences), before


def affirmed_section(section: str, keys: Sequence[str]) -> str | None:
    """The affirmed twin of :func:`negated_section`: every sentence that states a finding
    present restated with the affirmation paired with its denial's form
    (:data:`AFFIRMATION_FORMS`: "SPLEEN: Splenomegaly, 15 cm is seen." where the denial is
    "... is not seen."). None when no sentence changes (every denial is "No ...", whose twin
    is the section itself), or when the labeler does not read the same findings in the
    result (per sentence and over the section)."""
    from volumevlm.text.labeler import label_findings

    changed = []

    def affirm(prefix: str, sentence: str) -> str:
        affirmed = _restated(sentence, AFFIRMATION_FORMS[_denial_form(prefix, sentence, keys)])
        if affirmed == sentence or label_findings(prefix + affirmed, keys) != label_findings(prefix + sentence, keys):
            return sentence
        changed.append(sentence)
        return affirmed

    restated = _restate_section(section, keys, affirm)
    if restated is None or not changed:
        return None
    text, before = restated
    return text if label_findings(text, keys) == before else None


def negated_section(section: str, keys: Sequence[str]) -> str | None:
    """The section with every sentence that states a finding present turned into its
    denial ("SPLEEN: Splenomegaly, 15 cm." -> "SPLEEN: No splenomegaly, 15 cm." or
    "SPLEEN: Splenomegaly, 15 cm is not seen.", :data:`NEGATION_FORMS`): a hard negative
    that differs from the section by negation only. A form the labeler does not read as a
    denial of that sentence falls back to "No ...". None when the section states nothing
    present, or when the labeler still reads one of its findings as present after the
    change (the denial did not take)."""
    from volumevlm.text.labeler import POSITIVE, label_findings

    restated = _restate_section(
        section, keys, lambda prefix, sentence: _restated(sentence, NEGATION_FORMS[_denial_form(prefix, sentence, keys)]))
    if restated is None:
        return None
    text, before = restated
    after = label_findings(text, keys)
    if any(after.get(key) == POSITIVE for key, status in before.items() if status == POSITIVE):
        return None
    return text


def read_case(report: str | None, phecodes: Sequence[str] | None, keys: Sequence[str],
              tokenize: Callable[[str], list[int]] | None = None, token_length: int = 0,
              phecode_vocab=None) -> CaseReading:
    """Everything the objective reads in one case (see :class:`CaseReading`).

    keys: the labeler's finding keys; tokenize: text -> token ids already truncated at
    ``token_length`` (None: no token ids); phecode_vocab: a PhecodeVocabulary (None: no
    phenotype targets)."""
    from volumevlm.text.labeler import label_findings

    keys = tuple(keys)
    phenotype = (np.asarray(phecode_vocab.encode(list(phecodes or [])), dtype=np.float32)
                 if phecode_vocab is not None else None)
    if report is None:
        return CaseReading(phenotype_targets=phenotype, keys=keys, token_length=token_length if tokenize else 0)
    ids = (lambda text: tuple(tokenize(text))) if tokenize else (lambda text: None)
    return CaseReading(
        findings=findings_vector(report, keys) if keys else None,
        statuses=present_or_absent(label_findings(report, keys)) if keys else None,
        sentences=tuple((text, labels, ids(text)) for text, labels in finding_sentence_candidates(report, keys))
        if keys else (),
        sections=tuple((text, findings_vector(text, keys) if keys else None, ids(text))
                       for text in report_sections(report)),
        negations=tuple((text, findings_vector(text, keys), ids(text))
                        for text in (negated_section(section, keys) for section in report_sections(report))
                        if text is not None) if keys else (),
        affirmations=tuple((text, findings_vector(text, keys), ids(text))
                           for text in (affirmed_section(section, keys) for section in report_sections(report))
                           if text is not None) if keys else (),
        report_tokens=ids(report),
        phenotype_targets=phenotype,
        token_length=token_length if tokenize else 0,
        keys=keys,
    )
