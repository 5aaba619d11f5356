"""EHR diagnosis codes (ICD-10-CM) of the synthetic cohort.

Synthetic, not clinical data. Codes follow the findings imperfectly, as billing codes
do: a positive finding is coded only with its sensitivity (about 55-90 %), a negative
one is coded spuriously now and then (about 1-2 %), and codes that no image shows
(hypertension, diabetes, CKD, hyperlipidemia, COPD, obesity, ...) are drawn from the
patient's latent conditions and age. Every code emitted here is in the bundled
ICD-10 -> phecode table (volumevlm/text/data/icd10_phecode.csv).
"""

from __future__ import annotations

import math

import numpy as np

# finding -> (codes to choose from, sensitivity = P(coded | present))
FINDING_CODES: dict[str, tuple[tuple[str, ...], float]] = {
    "hepatic_steatosis": (("K76.0",), 0.6),
    "hepatomegaly": (("R16.0",), 0.55),
    "cirrhosis": (("K74.60",), 0.85),
    "liver_lesion": (("K76.89",), 0.7),
    "splenomegaly": (("R16.1",), 0.65),
    "gallstones": (("K80.20",), 0.8),
    "renal_cyst": (("N28.1",), 0.6),
    "kidney_stone": (("N20.0",), 0.85),
    "hydronephrosis": (("N13.30",), 0.75),
    "abdominal_aortic_aneurysm": (("I71.4",), 0.9),
    "atherosclerosis": (("I70.0",), 0.6),
    "ascites": (("R18.8",), 0.75),
    "pleural_effusion": (("J90",), 0.75),
    "lymphadenopathy": (("R59.0",), 0.7),
    "bowel_obstruction": (("K56.609",), 0.9),
    "vertebral_compression_fracture": (("M48.56XA", "S32.000A"), 0.8),
    "osteopenia": (("M85.80", "M81.0"), 0.6),
    "cardiomegaly": (("I51.7",), 0.7),
}

SPURIOUS_RATE = 0.015  # P(a finding's code | finding absent)

# Codes that no image shows, drawn from latent conditions and age (plus the two
# finding-linked variants C78.7 and K70.30).
OTHER_CODES: tuple[str, ...] = (
    "I10", "E11.9", "I50.9", "E66.9", "F17.210", "F10.20", "B18.2", "E78.5", "J44.9", "I25.10",
    "I48.91", "K21.9", "E03.9", "M54.50", "R10.9", "N18.3", "N18.4", "D64.9", "C78.7", "K70.30",
)


def emittable_codes() -> list[str]:
    """Every ICD-10-CM code :func:`sample_codes` can return (all are in the phecode table)."""
    return sorted({c for choices, _ in FINDING_CODES.values() for c in choices} | set(OTHER_CODES))


def image_visible_phecodes() -> list[str]:
    """The phecodes an image can show in the synthetic cohort: those of the findings'
    ICD-10 codes (the latent conditions' codes are invisible by construction)."""
    from volumevlm.text.phecodes import icd10_to_phecodes

    return sorted(set(icd10_to_phecodes([c for choices, _ in FINDING_CODES.values() for c in choices])))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def sample_codes(rng: np.random.Generator, patient: dict, findings: dict[str, int], facts: dict[str, dict]) -> list[str]:
    """ICD-10-CM codes of one case, sorted; drawn from findings, latent conditions and age."""
    codes: set[str] = set()
    for name, (choices, sensitivity) in FINDING_CODES.items():
        present = bool(findings[name])
        if rng.random() < (sensitivity if present else SPURIOUS_RATE):
            codes.add(str(choices[0] if len(choices) == 1 else rng.choice(choices)))
    # Metastatic-looking liver disease: lesions with nodes in a patient with a malignancy.
    if findings["liver_lesion"] and patient["malignancy"] and rng.random() < 0.6:
        codes.add("C78.7")
    if patient["alcohol"] and findings["cirrhosis"] and rng.random() < 0.6:
        codes.discard("K74.60")
        codes.add("K70.30")

    age, obese = patient["age"], patient["bmi"] >= 30
    latent = [
        ("I10", 0.85 if patient["hypertension"] else 0.01),
        ("E11.9", 0.85 if patient["diabetes"] else 0.01),
        ("I50.9", 0.8 if patient["heart_failure"] else 0.005),
        ("E66.9", 0.55 if obese else 0.01),
        ("F17.210", 0.7 if patient["smoker"] else 0.01),
        ("F10.20", 0.65 if patient["alcohol"] else 0.005),
        ("B18.2", 0.8 if patient["hepatitis_c"] else 0.002),
        ("E78.5", 0.1 + 0.4 * _sigmoid((age - 55) / 8) + 0.15 * patient["diabetes"]),
        ("J44.9", 0.02 + 0.3 * patient["smoker"] * _sigmoid((age - 55) / 8)),
        ("I25.10", 0.02 + 0.2 * _sigmoid((age - 65) / 7) + 0.15 * findings["atherosclerosis"]),
        ("I48.91", 0.02 + 0.1 * _sigmoid((age - 70) / 6) + 0.3 * patient["heart_failure"]),
        ("K21.9", 0.1),
        ("E03.9", 0.04 + 0.05 * (patient["sex"] == "F")),
        ("M54.50", 0.08 + 0.4 * findings["vertebral_compression_fracture"]),
        ("R10.9", 0.1 + 0.5 * findings["bowel_obstruction"] + 0.3 * findings["kidney_stone"] + 0.2 * findings["gallstones"]),
    ]
    for code, pr in latent:
        if rng.random() < pr:
            codes.add(code)
    ckd_p = 0.02 + 0.12 * _sigmoid((age - 65) / 8) + 0.1 * patient["diabetes"] + 0.06 * patient["hypertension"]
    if rng.random() < ckd_p:
        codes.add("N18.4" if rng.random() < 0.25 else "N18.3")
    if rng.random() < 0.04 + 0.08 * ("N18.3" in codes or "N18.4" in codes) + 0.05 * patient["malignancy"]:
        codes.add("D64.9")
    unknown = codes - set(emittable_codes())
    if unknown:  # a code added here but not to OTHER_CODES would escape the coverage test
        raise AssertionError(f"codes missing from OTHER_CODES: {sorted(unknown)}")
    return sorted(codes)
