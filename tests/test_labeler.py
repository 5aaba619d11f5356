"""The rule-based findings labeler (volumevlm.text.labeler) on hand-written sentences.

Most sentences are NOT the synthetic report templates: free phrasing, synonyms,
negation scope and hedges as radiologists write them. The last tests run it over
synthetic reports (NOT clinical data) whose true findings are known.
"""

from __future__ import annotations

import pytest

from volumevlm.errors import VolumeVLMError
from volumevlm.text import label_findings
from volumevlm.text.labeler import (
    KNOWN_FINDINGS,
    SYNTHETIC_FINDINGS,
    findings_matrix,
    label_reports,
    report_sentences,
    resolve_findings,
)

NEG, POS, UNC = "negative", "positive", "uncertain"


def labels(text: str, *findings: str) -> dict[str, str]:
    return label_findings(text, list(findings) if findings else None)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("No ascites.", {"ascites": NEG}),
        ("Without hydronephrosis.", {"hydronephrosis": NEG}),
        ("Negative for pleural effusion.", {"pleural_effusion": NEG}),
        ("No evidence of hepatomegaly or splenomegaly.", {"hepatomegaly": NEG, "splenomegaly": NEG}),
        ("Free of free intraperitoneal fluid.", {"ascites": NEG}),
        ("Splenomegaly is not seen.", {"splenomegaly": NEG}),
        ("Ascites has resolved.", {"ascites": NEG}),
        ("Interval resolution of the previously seen ascites.", {"ascites": NEG}),
        # A negation applies to the findings after it in its clause, not across a scope break.
        ("No ascites, but splenomegaly.", {"ascites": NEG, "splenomegaly": POS}),
        ("No hepatomegaly, although mild splenomegaly is present.", {"hepatomegaly": NEG, "splenomegaly": POS}),
        ("Negative for pleural effusion; however, there is moderate ascites.", {"pleural_effusion": NEG, "ascites": POS}),
        ("No ascites. Splenomegaly.", {"ascites": NEG, "splenomegaly": POS}),
        ("Hepatomegaly without splenomegaly.", {"hepatomegaly": POS, "splenomegaly": NEG}),
        # Pseudo-negation: "no change" is not a denial.
        ("No change in the moderate right pleural effusion.", {"pleural_effusion": POS}),
    ],
)
def test_negation_and_its_scope(text, expected):
    assert labels(text, *expected) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        # A denial after the finding, with or without a copula, and as a section body.
        ("Gallstones absent.", {"gallstones": NEG}),
        ("Gallstones absent", {"gallstones": NEG}),
        ("Ascites absent.", {"ascites": NEG}),
        ("Pleural effusion absent bilaterally.", {"pleural_effusion": NEG}),
        ("Abdominal aortic aneurysm absent.", {"abdominal_aortic_aneurysm": NEG}),
        ("Gallstones are absent.", {"gallstones": NEG}),
        ("Gallstones not seen.", {"gallstones": NEG}),
        ("Gallstones not identified.", {"gallstones": NEG}),
        ("Gallstones is not present.", {"gallstones": NEG}),
        ("Ascites not present.", {"ascites": NEG}),
        ("Gallstones not found.", {"gallstones": NEG}),
        ("Gallstones were not found.", {"gallstones": NEG}),
        ("No evidence of gallstones.", {"gallstones": NEG}),
        ("Gallstones: absent.", {"gallstones": NEG}),
        ("Ascites: none.", {"ascites": NEG}),
        ("Hydronephrosis: not seen.", {"hydronephrosis": NEG}),
        ("Gallstones: negative.", {"gallstones": NEG}),
        ("GALLBLADDER: Gallstones absent.", {"gallstones": NEG}),
        # the denial is the finding's own: the next finding in the sentence is still affirmed
        ("Gallstones absent, ascites present.", {"gallstones": NEG, "ascites": POS}),
        ("Pleural effusions: none bilaterally.", {"pleural_effusion": NEG}),
        ("Ascites, none.", {"ascites": NEG}),
        # "absent" that is not next to the finding describes something else, and "none"/
        # "negative" that go on ("none of which", "negative for") do not deny the finding
        ("Splenomegaly with absent flow in the splenic vein.", {"splenomegaly": POS}),
        ("Splenomegaly, absent flow in the splenic vein.", {"splenomegaly": POS}),
        ("Multiple renal cysts, none of which enhance.", {"renal_cyst": POS}),
        ("Splenomegaly, negative for focal lesion.", {"splenomegaly": POS}),
        # "Gallbladder: absent." says the gallbladder is gone, not that a finding is denied
        ("GALLBLADDER: Absent.", {"surgically_absent_gallbladder": POS}),
        # a header that names a finding, with a body that does not deny it, still affirms it
        ("Small pleural effusion: unchanged.", {"pleural_effusion": POS}),
    ],
)
def test_a_denial_after_the_finding_is_negative(text, expected):
    assert labels(text, *expected) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        # plain words for "enlarged", and "aneurysmal" said of the aorta
        ("Spleen is big.", {"splenomegaly": POS}),
        ("Large spleen.", {"splenomegaly": POS}),
        ("Enlarged spleen.", {"splenomegaly": POS}),
        ("The spleen is large in size.", {"splenomegaly": POS}),
        ("SPLEEN: Large.", {"splenomegaly": POS}),
        ("Large liver.", {"hepatomegaly": POS}),
        ("Big liver.", {"hepatomegaly": POS}),
        ("Liver is large.", {"hepatomegaly": POS}),
        ("LIVER: Big, 21 cm.", {"hepatomegaly": POS}),
        ("The heart is big.", {"cardiomegaly": POS}),
        ("Aorta is aneurysmal.", {"abdominal_aortic_aneurysm": POS}),
        ("Aneurysmal abdominal aorta.", {"abdominal_aortic_aneurysm": POS}),
        ("Aneurysmal aorta.", {"abdominal_aortic_aneurysm": POS}),
        # their negated versions deny
        ("The spleen is not big.", {"splenomegaly": NEG}),
        ("The spleen is not large.", {"splenomegaly": NEG}),
        ("Not a large liver.", {"hepatomegaly": NEG}),
        ("Liver is not large.", {"hepatomegaly": NEG}),
        ("The heart is not large.", {"cardiomegaly": NEG}),
        ("The aorta is not aneurysmal.", {"abdominal_aortic_aneurysm": NEG}),
        ("No aneurysmal abdominal aorta.", {"abdominal_aortic_aneurysm": NEG}),
        ("Aneurysmal aorta is not seen.", {"abdominal_aortic_aneurysm": NEG}),
        # a large lesion of an organ is not a large organ; a thoracic aorta is not an abdominal one
        ("Large liver lesion.", {"hepatomegaly": None, "liver_lesion": POS}),
        ("Big liver mass.", {"hepatomegaly": None, "liver_lesion": POS}),
        ("Enlarged accessory spleen.", {"splenomegaly": None}),
        ("The ascending aorta is aneurysmal.", {"abdominal_aortic_aneurysm": None}),
        ("Aneurysmal thoracic aorta.", {"abdominal_aortic_aneurysm": None}),
    ],
)
def test_plain_words_for_enlarged_and_aneurysmal(text, expected):
    got = labels(text, *expected)
    assert {k: got.get(k) for k in expected} == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Possible splenomegaly.", {"splenomegaly": UNC}),
        ("Hepatic steatosis cannot be excluded.", {"hepatic_steatosis": UNC}),
        ("Small bowel obstruction cannot be excluded.", {"bowel_obstruction": UNC}),
        ("Probable right pleural effusion.", {"pleural_effusion": UNC}),
        ("Findings are suspicious for retroperitoneal lymphadenopathy.", {"lymphadenopathy": UNC}),
        ("Questionable left renal calculus.", {"kidney_stone": UNC}),
        ("This may represent early cirrhosis.", {"cirrhosis": UNC}),
        # The hedge covers its own mention; a negation later in the clause still denies its own.
        ("Possible ascites without pleural effusion.", {"ascites": UNC, "pleural_effusion": NEG}),
    ],
)
def test_uncertainty(text, expected):
    assert labels(text, *expected) == expected


@pytest.mark.parametrize(
    "text, finding",
    [
        ("Fatty infiltration of the liver.", "hepatic_steatosis"),
        ("The liver is diffusely low in attenuation.", "hepatic_steatosis"),
        ("Decreased hepatic attenuation.", "hepatic_steatosis"),
        ("Enlarged spleen.", "splenomegaly"),
        ("The spleen is enlarged, measuring 15 cm.", "splenomegaly"),
        ("Splenic enlargement.", "splenomegaly"),
        ("Liver enlargement, 21 cm craniocaudal.", "hepatomegaly"),
        ("Dilated renal collecting system on the left.", "hydronephrosis"),
        ("Moderate left hydroureteronephrosis.", "hydronephrosis"),
        ("Mild pelvocaliectasis of the right kidney.", "hydronephrosis"),
        ("Gallbladder contains multiple stones.", "gallstones"),
        ("Stones within the gallbladder.", "gallstones"),
        ("Stones in the left kidney.", "kidney_stone"),
        ("Renal calculi bilaterally.", "kidney_stone"),
        ("There is a 2 cm cyst arising from the left kidney.", "renal_cyst"),
        ("Hypodense lesion in segment 7 of the liver.", "liver_lesion"),
        ("Nodular liver surface.", "cirrhosis"),
        ("Aneurysmal dilatation of the infrarenal aorta to 4.1 cm.", "abdominal_aortic_aneurysm"),
        ("Calcified plaque along the aorta.", "atherosclerosis"),
        ("Small amount of free fluid in the pelvis.", "ascites"),
        ("Mildly enlarged retroperitoneal lymph nodes.", "lymphadenopathy"),
        ("Multiple dilated loops of small bowel.", "bowel_obstruction"),
        ("Diffuse loss of bone mineral density.", "osteopenia"),
        ("Wedge deformity of L1 with 30% height loss.", "vertebral_compression_fracture"),
        ("The cardiac silhouette is enlarged.", "cardiomegaly"),
        ("SPLEEN: Enlarged, 16 cm.", "splenomegaly"),  # bare adjective under an organ header
    ],
)
def test_synonyms_and_free_phrasing_are_positive(text, finding):
    assert labels(text, finding) == {finding: POS}


@pytest.mark.parametrize(
    "text, finding",
    [
        ("The liver is normal in size.", "hepatomegaly"),
        ("Heart size normal.", "cardiomegaly"),
        ("Normal caliber abdominal aorta.", "abdominal_aortic_aneurysm"),
        ("Subcentimeter retroperitoneal lymph nodes.", "lymphadenopathy"),
        ("The lung bases are clear.", "pleural_effusion"),
        ("SPLEEN: Normal.", "splenomegaly"),
    ],
)
def test_normal_statements_deny_without_a_negation_word(text, finding):
    assert labels(text, finding) == {finding: NEG}


def test_a_normal_statement_about_another_aspect_denies_nothing():
    # Attenuation says nothing about size, and vice versa.
    assert labels("The liver is normal in attenuation.", "hepatomegaly") == {}
    assert labels("The liver is normal in size.", "hepatic_steatosis") == {}


def test_findings_not_mentioned_are_left_out():
    text = "FINDINGS:\nSPLEEN: Splenomegaly.\nPERITONEUM: No ascites.\n"
    got = labels(text)
    assert got == {"splenomegaly": POS, "ascites": NEG}
    assert labels("The gallbladder contains no stones.", "gallstones") in ({}, {"gallstones": NEG})
    assert labels("", "ascites") == {}
    # Request sections (indication, technique) describe no finding of this patient.
    assert labels("INDICATION: Rule out ascites.\nFINDINGS: Splenomegaly.") == {"splenomegaly": POS}


def test_precedence_positive_over_uncertain_over_negative():
    assert labels("No ascites. Moderate ascites in the pelvis.", "ascites") == {"ascites": POS}
    assert labels("No ascites. Possible trace ascites.", "ascites") == {"ascites": UNC}


def test_names_keys_and_bad_input():
    assert resolve_findings(["fatty liver", "Renal Stone", "splenomegaly"]) == ("hepatic_steatosis", "kidney_stone", "splenomegaly")
    assert set(SYNTHETIC_FINDINGS) <= set(KNOWN_FINDINGS)
    for bad in (lambda: label_findings(3), lambda: label_findings("x", ["not a finding"]), lambda: label_reports("one text")):
        with pytest.raises(VolumeVLMError) as err:
            bad()
        assert "\n" not in str(err.value)
    matrix = findings_matrix([{"ascites": POS, "splenomegaly": UNC}, {"ascites": NEG}], ["ascites", "splenomegaly"])
    assert matrix.tolist() == [[1, 1], [0, 0]]
    assert findings_matrix([{"splenomegaly": UNC}], ["splenomegaly"], uncertain_as=-1).tolist() == [[-1]]


def test_synthetic_reports_agree_with_their_labels():
    """On 300 synthetic reports (NOT clinical data): present (positive or uncertain) exactly
    when the case has the finding, and uncertain exactly when the report hedged it."""
    from volumevlm.data.synthetic.cohort import sample_cohort
    from volumevlm.data.synthetic.findings import FINDINGS

    assert tuple(FINDINGS) == SYNTHETIC_FINDINGS
    disagreements = []
    hedged_seen = 0
    for row in sample_cohort(seed=3, n=300):
        got = label_findings(row["report"], SYNTHETIC_FINDINGS)
        for name in SYNTHETIC_FINDINGS:
            present = got.get(name) in (POS, UNC)
            if present != bool(row["findings"][name]):
                disagreements.append((row["id"], name, got.get(name)))
            if row["finding_facts"].get(name, {}).get("uncertain"):
                hedged_seen += 1
                if got.get(name) != UNC:
                    disagreements.append((row["id"], name, got.get(name), "hedged"))
    assert hedged_seen > 0
    assert disagreements == []


def test_every_sentence_of_a_synthetic_report_is_read_as_its_case_says():
    """Pretraining reads single sentences (with their header) as targets, so each sentence,
    not just each report, must be read right: on 300 synthetic reports (NOT clinical data)
    no sentence affirms or hedges a finding the case does not have, and none denies one it has."""
    from volumevlm.data.synthetic.cohort import sample_cohort

    wrong, sentences = [], 0
    for row in sample_cohort(seed=5, n=300):
        for _, context in report_sentences(row["report"]):
            sentences += 1
            for name, status in label_findings(context, SYNTHETIC_FINDINGS).items():
                if (status == NEG) == bool(row["findings"][name]):
                    wrong.append((row["id"], context, name, status))
    assert sentences > 5000
    assert wrong == []


def test_report_sentences_keep_the_wording_and_the_header_the_labeler_needs():
    report = (
        "INDICATION: Rule out splenomegaly.\n"
        "TECHNIQUE: Axial images reconstructed at 2.5 mm.\n\n"
        "FINDINGS:\n"
        "SPLEEN: Enlarged. The splenic vein is patent.\n"
        "LIVER AND BILIARY TREE: 1.9 cm hypodense lesion in the left hepatic lobe.\n\n"
        "IMPRESSION:\n"
        "1. Splenomegaly.\n"
    )
    pairs = report_sentences(report)
    assert [text for text, _ in pairs] == [
        "Enlarged.", "The splenic vein is patent.", "1.9 cm hypodense lesion in the left hepatic lobe.", "Splenomegaly.",
    ]
    # the skipped sections (a question in the indication) give no sentence
    assert not any("Rule out" in text or "2.5 mm" in text for text, _ in pairs)
    # "Enlarged." alone names nothing; with its header the labeler reads splenomegaly
    assert label_findings(pairs[0][0]) == {}
    assert label_findings(pairs[0][1])["splenomegaly"] == "positive"
    with pytest.raises(VolumeVLMError, match="report_sentences"):
        report_sentences(None)
