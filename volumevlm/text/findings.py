"""The one registry of finding sets: the synthetic cohort's 18, Merlin's 30, CT-RATE's 18.

A finding set is an ordered tuple of keys, the names manifests (``findings``), prompt
sets (``conf/prompts/<set>.yaml``) and evaluation use; a key is the snake_case of the
finding's published name ("Coronary artery wall calcification" ->
``coronary_artery_wall_calcification``). The synthetic cohort generator, the findings
labeler, the dataset adapters and the bundled prompt sets all read their lists from here
(the tests check the prompt sets against it), so a finding is added or renamed in one place.
"""

from __future__ import annotations

import re

# The synthetic cohort's findings (volumevlm.data.synthetic; NOT clinical data), in the
# cohort's order, with the plain-English names prompts use ("{finding} is present.").
SYNTHETIC_FINDING_NAMES: dict[str, str] = {
    "hepatic_steatosis": "hepatic steatosis",
    "hepatomegaly": "hepatomegaly",
    "cirrhosis": "cirrhosis",
    "liver_lesion": "liver lesion",
    "splenomegaly": "splenomegaly",
    "gallstones": "gallstones",
    "renal_cyst": "renal cyst",
    "kidney_stone": "kidney stone",
    "hydronephrosis": "hydronephrosis",
    "abdominal_aortic_aneurysm": "abdominal aortic aneurysm",
    "atherosclerosis": "atherosclerosis",
    "ascites": "ascites",
    "pleural_effusion": "pleural effusion",
    "lymphadenopathy": "lymphadenopathy",
    "bowel_obstruction": "bowel obstruction",
    "vertebral_compression_fracture": "vertebral compression fracture",
    "osteopenia": "osteopenia",
    "cardiomegaly": "cardiomegaly",
}

# Merlin's 30 abdominal findings, in the order of their published list.
MERLIN_FINDING_NAMES: tuple[str, ...] = (
    "biliary ductal dilation", "hepatomegaly", "hepatic steatosis", "surgically absent gallbladder",
    "gallstones", "pancreatic atrophy", "splenomegaly", "renal cyst", "renal hypodensity",
    "hydronephrosis", "prostatomegaly", "hiatal hernia", "submucosal edema", "bowel obstruction",
    "appendicitis", "free air", "ascites", "anasarca", "atherosclerosis", "thrombosis",
    "abdominal aortic aneurysm", "coronary calcification", "aortic valve calcification", "fracture",
    "osteopenia", "lymphadenopathy", "metastatic disease", "atelectasis", "pleural effusion", "cardiomegaly",
)

# CT-RATE's 18 chest findings: the column headers of its multi-abnormality labels CSV, in
# their published order.
CT_RATE_FINDING_NAMES: tuple[str, ...] = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
)


def finding_key(name: str) -> str:
    """The key of a published finding name: lower case, words joined by "_"."""
    return "_".join(re.sub(r"[^a-z0-9]+", " ", str(name).lower()).split())


# set name (the bundled prompt set of the same name) -> ordered keys
FINDING_SETS: dict[str, tuple[str, ...]] = {
    "synthetic": tuple(SYNTHETIC_FINDING_NAMES),
    "merlin30": tuple(finding_key(name) for name in MERLIN_FINDING_NAMES),
    "ctrate18": tuple(finding_key(name) for name in CT_RATE_FINDING_NAMES),
}


def finding_text(key: str) -> str:
    """Plain-English name of a finding key ("renal_cyst" -> "renal cyst")."""
    return SYNTHETIC_FINDING_NAMES.get(key, key.replace("_", " "))


# The structures of our label map (volumevlm.data.labels.LABELS) a finding is seen in: the
# organs whose features a findings classifier may be restricted to (report.findings_organs).
# A finding not listed (ascites, bowel obstruction: outside every labelled structure) is read
# from all of them. Lymph nodes are listed with the vessels they lie along.
_KIDNEYS = ("kidney_left", "kidney_right")
_LUNGS = ("lung_left", "lung_right")
FINDING_ORGANS: dict[str, tuple[str, ...]] = {
    # the synthetic cohort's findings
    "hepatic_steatosis": ("liver",),
    "hepatomegaly": ("liver",),
    "cirrhosis": ("liver", "spleen"),
    "liver_lesion": ("liver",),
    "splenomegaly": ("spleen",),
    "gallstones": ("gallbladder",),
    "renal_cyst": _KIDNEYS,
    "kidney_stone": _KIDNEYS,
    "hydronephrosis": _KIDNEYS,
    "abdominal_aortic_aneurysm": ("aorta",),
    "atherosclerosis": ("aorta",),
    "pleural_effusion": _LUNGS,
    "lymphadenopathy": ("aorta", "inferior_vena_cava"),
    "vertebral_compression_fracture": ("vertebrae",),
    "osteopenia": ("vertebrae",),
    "cardiomegaly": ("heart",),
    # Merlin's and CT-RATE's findings our label map has organs for
    "biliary_ductal_dilation": ("liver", "gallbladder"),
    "surgically_absent_gallbladder": ("gallbladder",),
    "pancreatic_atrophy": ("pancreas",),
    "renal_hypodensity": _KIDNEYS,
    "hiatal_hernia": ("stomach",),
    "thrombosis": ("aorta", "inferior_vena_cava"),
    "coronary_calcification": ("heart",),
    "aortic_valve_calcification": ("heart",),
    "fracture": ("vertebrae",),
    "atelectasis": _LUNGS,
    "arterial_wall_calcification": ("aorta",),
    "pericardial_effusion": ("heart",),
    "coronary_artery_wall_calcification": ("heart",),
    "emphysema": _LUNGS,
    "lung_nodule": _LUNGS,
    "lung_opacity": _LUNGS,
    "pulmonary_fibrotic_sequela": _LUNGS,
    "mosaic_attenuation_pattern": _LUNGS,
    "peribronchial_thickening": _LUNGS,
    "consolidation": _LUNGS,
    "bronchiectasis": _LUNGS,
    "interlobular_septal_thickening": _LUNGS,
}
