"""One registry of finding sets (volumevlm.text.findings) serves the synthetic cohort, the
labeler, the dataset adapters and the bundled prompt sets: each of them must hold exactly
the registry's keys, in the registry's order."""

from __future__ import annotations

from volumevlm.data.adapters import CT_RATE_FINDINGS as CT_RATE_COLUMNS
from volumevlm.data.synthetic.findings import FINDING_NAMES, FINDINGS
from volumevlm.text import labeler
from volumevlm.text.findings import CT_RATE_FINDING_NAMES, FINDING_SETS, finding_key, finding_text
from volumevlm.text.prompts import load_prompt_set


def test_every_bundled_prompt_set_holds_its_registry_set_in_order():
    for name, keys in FINDING_SETS.items():
        assert load_prompt_set(name).keys == list(keys), name
    assert [len(FINDING_SETS[n]) for n in ("synthetic", "merlin30", "ctrate18")] == [18, 30, 18]


def test_cohort_labeler_and_adapters_read_the_registry():
    assert FINDINGS == FINDING_SETS["synthetic"] and list(FINDING_NAMES) == list(FINDINGS)
    assert labeler.SYNTHETIC_FINDINGS == FINDING_SETS["synthetic"]
    assert labeler.MERLIN_FINDINGS == FINDING_SETS["merlin30"]
    # The labeler's one key for coronary calcification is Merlin's; CT-RATE's spelling resolves to it.
    expected = tuple("coronary_calcification" if k == "coronary_artery_wall_calcification" else k for k in FINDING_SETS["ctrate18"])
    assert labeler.CT_RATE_FINDINGS == expected
    assert labeler.resolve_findings(["coronary artery wall calcification"]) == ("coronary_calcification",)
    assert set(labeler.KNOWN_FINDINGS) >= set(FINDING_SETS["synthetic"]) | set(FINDING_SETS["merlin30"])
    # The adapter reads CT-RATE's CSV by the registry's column headers and stores their keys.
    assert CT_RATE_COLUMNS == CT_RATE_FINDING_NAMES
    assert tuple(finding_key(c) for c in CT_RATE_COLUMNS) == FINDING_SETS["ctrate18"]


def test_finding_names():
    assert finding_key("Coronary artery wall calcification") == "coronary_artery_wall_calcification"
    assert finding_key("  Lung-nodule ") == "lung_nodule"
    assert finding_text("renal_cyst") == "renal cyst"
    assert finding_text("free_air") == "free air"


def test_finding_organs_name_registry_findings_and_our_structures():
    from volumevlm.data.labels import LABEL_INDEX
    from volumevlm.text.findings import FINDING_ORGANS

    known = set().union(*FINDING_SETS.values())
    assert set(FINDING_ORGANS) <= known
    assert all(organs and set(organs) <= set(LABEL_INDEX) - {"background"} for organs in FINDING_ORGANS.values())
    # Every synthetic finding seen in a labelled structure has its organs; fluid and bowel do not.
    assert set(FINDING_SETS["synthetic"]) - set(FINDING_ORGANS) == {"ascites", "bowel_obstruction"}
    assert FINDING_ORGANS["kidney_stone"] == ("kidney_left", "kidney_right")
