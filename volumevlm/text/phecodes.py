"""ICD-10-CM -> phecode mapping: the phenotype targets of pretraining.

Phenotype heads predict phecodes (groups of billing codes with clinical meaning), as
Merlin does. The bundled table ``volumevlm/text/data/icd10_phecode.csv`` covers
only the ICD-10-CM codes that the synthetic cohort generator can emit; the phecodes
and descriptions were chosen by the volumevlm developers in the style of the phecode
scheme and are approximate. A code missing from the table is an error (never
silently dropped), so a real-data manifest that needs more codes fails loudly and
names the code.
"""

from __future__ import annotations

import csv
from functools import lru_cache
from importlib import resources

from volumevlm.errors import InputError

TABLE_NAME = "icd10_phecode.csv"


def _normalise(code: str) -> str:
    """ICD-10 codes compare without dots, case or surrounding spaces ("k76.0" == "K760")."""
    return str(code).strip().upper().replace(".", "")


@lru_cache(maxsize=1)
def _table() -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """Parse the bundled CSV once: ({icd10 without dot: (icd10, phecode)}, {phecode: description})."""
    source = resources.files("volumevlm.text").joinpath("data", TABLE_NAME)
    by_icd: dict[str, tuple[str, str]] = {}
    descriptions: dict[str, str] = {}
    with source.open("r", encoding="utf-8") as fh:
        rows = csv.DictReader(line for line in fh if not line.startswith("#"))
        for row in rows:
            icd, phe, desc = row["icd10"].strip(), row["phecode"].strip(), row["description"].strip()
            if not icd or not phe:
                raise InputError(TABLE_NAME, f"row {row!r} lacks an icd10 code or a phecode")
            by_icd[_normalise(icd)] = (icd, phe)
            descriptions.setdefault(phe, desc)
    return by_icd, descriptions


def load_phecode_table() -> dict[str, str]:
    """The bundled table as ``{icd10 code (dotted, as in the CSV): phecode}``."""
    by_icd, _ = _table()
    return {icd: phe for icd, phe in by_icd.values()}


def icd10_to_phecodes(codes: list[str] | tuple[str, ...]) -> list[str]:
    """Map ICD-10-CM codes to their phecodes: unique, in order of first appearance.

    Raises :class:`InputError` naming the first code that the bundled table lacks.
    """
    by_icd, _ = _table()
    out: list[str] = []
    for code in codes:
        hit = by_icd.get(_normalise(code))
        if hit is None:
            raise InputError(
                f"ICD-10 code {code!r}",
                f"not in the bundled ICD-10 -> phecode table ({TABLE_NAME}, which covers the synthetic generator's codes only)",
            )
        if hit[1] not in out:
            out.append(hit[1])
    return out


def phecode_description(code: str) -> str:
    """Human-readable description of a phecode, e.g. ``"594.1" -> "Calculus of kidney"``."""
    _, descriptions = _table()
    key = str(code).strip()
    if key not in descriptions:
        raise InputError(f"phecode {code!r}", f"not in the bundled phecode table ({TABLE_NAME})")
    return descriptions[key]


def all_phecodes() -> list[str]:
    """Every phecode of the bundled table, sorted numerically: the phenotype head's output order."""
    _, descriptions = _table()
    return sorted(descriptions, key=lambda p: (float(p), p))
