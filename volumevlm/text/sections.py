"""Organ-system sections of an abdominal CT report, in reading order.

The synthetic report writer (``volumevlm.data.synthetic.reports``) emits its FINDINGS
under exactly these headers, one per line as ``NAME: text``; the text tower splits
reports with :func:`split_report` so each organ system can be encoded on its own
(as Merlin does). The names follow the organ systems radiologists use for CT of
the abdomen and pelvis.
"""

from __future__ import annotations

import re

SECTIONS: tuple[str, ...] = (
    "LOWER THORAX",
    "LIVER AND BILIARY TREE",
    "GALLBLADDER",
    "SPLEEN",
    "PANCREAS",
    "ADRENAL GLANDS",
    "KIDNEYS AND URETERS",
    "GASTROINTESTINAL TRACT",
    "PERITONEUM",
    "VASCULATURE",
    "LYMPH NODES",
    "BLADDER",
    "MUSCULOSKELETAL",
)

FINDINGS_HEADER = "FINDINGS"
IMPRESSION_HEADER = "IMPRESSION"

_HEADER_RE = re.compile(
    r"^\s*(" + "|".join(re.escape(h) for h in (FINDINGS_HEADER, IMPRESSION_HEADER, *SECTIONS)) + r")\s*:\s*",
    re.MULTILINE,
)


def split_report(text: str) -> dict[str, str]:
    """Split a report into ``{header: text}`` for every known header it contains.

    Headers are recognised at the start of a line followed by a colon
    (``"LIVER AND BILIARY TREE: ..."``). Keys are the section names of
    :data:`SECTIONS` plus ``"IMPRESSION"``; text before the first organ section
    (e.g. EXAMINATION/TECHNIQUE lines and the bare ``FINDINGS:`` header) is
    dropped. Values are stripped; a header that appears twice is joined with a space.
    """
    out: dict[str, str] = {}
    matches = list(_HEADER_RE.finditer(text))
    for i, m in enumerate(matches):
        name = m.group(1)
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = " ".join(text[m.end() : end].split())
        if name == FINDINGS_HEADER:
            continue
        out[name] = f"{out[name]} {body}".strip() if name in out else body
    return out


def report_sections(report: str) -> list[str]:
    """The organ-system sections of a report, each as "HEADER: text" (the whole report
    when it has none): what a text tower trained on sections reads."""
    parts = [f"{header}: {text}" for header, text in split_report(report).items() if text.strip()]
    return parts or [report]
