"""ICD-10 -> phecode table: coverage of every generator code, lookups, and clear errors."""

from __future__ import annotations

import pytest

from volumevlm.data.synthetic.codes import FINDING_CODES, emittable_codes
from volumevlm.errors import InputError
from volumevlm.text.phecodes import all_phecodes, icd10_to_phecodes, load_phecode_table, phecode_description


def test_known_codes_map_to_expected_phecodes():
    assert icd10_to_phecodes(["N20.0"]) == ["594.1"]
    assert icd10_to_phecodes(["I71.4", "I10"]) == ["442.11", "401.1"]
    assert phecode_description("594.1") == "Calculus of kidney"
    assert phecode_description("416") == "Cardiomegaly"


def test_lookup_ignores_dots_case_and_spaces_and_dedupes():
    assert icd10_to_phecodes([" n200 ", "N20.0", "k760"]) == ["594.1", "571.5"]


def test_unknown_code_is_a_one_line_error_naming_it():
    with pytest.raises(InputError) as err:
        icd10_to_phecodes(["I10", "Z99.999"])
    msg = str(err.value)
    assert "Z99.999" in msg and "\n" not in msg
    with pytest.raises(InputError):
        phecode_description("999.99")


def test_every_finding_code_is_in_the_table():
    table = load_phecode_table()
    for name, (codes, sensitivity) in FINDING_CODES.items():
        assert 0.5 <= sensitivity < 1.0, name
        for code in codes:
            assert code in table, (name, code)


def test_table_is_consistent():
    table = load_phecode_table()
    assert len(table) >= 35
    phecodes = all_phecodes()
    assert set(table.values()) == set(phecodes)
    assert phecodes == sorted(phecodes, key=float)
    for p in phecodes:
        assert phecode_description(p).strip()


def test_every_code_the_generator_can_emit_has_a_phecode():
    codes = emittable_codes()
    assert len(codes) >= 35
    phecodes = icd10_to_phecodes(codes)
    assert len(phecodes) >= 30
    assert set(codes) <= set(load_phecode_table())
