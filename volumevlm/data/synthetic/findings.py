"""Patients and findings of the synthetic cohort: who is sick with what, and how much.

Synthetic, not clinical data. Findings are drawn from a small causal model so that
they co-occur the way they do in real cohorts: age drives osteopenia, atherosclerosis,
aneurysm and renal cysts; a latent chronic liver disease drives cirrhosis, ascites and
splenomegaly; latent heart failure drives cardiomegaly and pleural effusion; obesity and
diabetes drive steatosis; stones drive hydronephrosis on their own side; osteopenia
drives compression fractures. Every positive finding carries measurable facts (sizes
in mm, HU, laterality, count, location) that the phantom renders and the report states.
"""

from __future__ import annotations

import math

import numpy as np

from volumevlm.text.findings import FINDING_SETS, SYNTHETIC_FINDING_NAMES

# Ordered names: the label vocabulary of zero-shot prompts and of the manifest's "findings",
# and their plain-English names, e.g. for zero-shot prompts ("{name} is present."): the
# registry's synthetic set (volumevlm.text.findings).
FINDINGS: tuple[str, ...] = FINDING_SETS["synthetic"]
FINDING_NAMES: dict[str, str] = SYNTHETIC_FINDING_NAMES

CONTRAST_PHASES: tuple[str, ...] = ("non-contrast", "arterial", "portal venous")

VERTEBRAL_LEVELS: tuple[str, ...] = ("T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5")


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _r(x: float, nd: int = 1) -> float:
    """Round for the manifest: facts are human-facing numbers, not float noise."""
    return round(float(x), nd)


def sample_patient(rng: np.random.Generator) -> dict:
    """Demographics and latent conditions (not all visible in the image).

    Returns a dict: age (years), sex ("F"/"M"), bmi (kg/m2), and booleans smoker,
    alcohol, hepatitis_c, diabetes, hypertension, liver_disease, heart_failure, malignancy.
    """
    age = int(np.clip(round(rng.normal(58, 15)), 22, 92))
    sex = "F" if rng.random() < 0.5 else "M"
    bmi = float(np.clip(rng.lognormal(math.log(27.0), 0.18), 17.0, 48.0))
    smoker = bool(rng.random() < 0.22)
    alcohol = bool(rng.random() < 0.08)
    hepatitis_c = bool(rng.random() < 0.04)
    diabetes = bool(rng.random() < 0.06 + 0.18 * (bmi >= 30) + 0.12 * _sigmoid((age - 60) / 8))
    hypertension = bool(rng.random() < 0.1 + 0.55 * _sigmoid((age - 55) / 9) + 0.1 * (bmi >= 30))
    liver_disease = bool(rng.random() < 0.06 + 0.45 * alcohol + 0.5 * hepatitis_c)
    heart_failure = bool(rng.random() < 0.04 + 0.25 * _sigmoid((age - 72) / 6) + 0.05 * hypertension)
    malignancy = bool(rng.random() < 0.05 + 0.04 * _sigmoid((age - 60) / 8))
    return {
        "age": age, "sex": sex, "bmi": _r(bmi), "smoker": smoker, "alcohol": alcohol,
        "hepatitis_c": hepatitis_c, "diabetes": diabetes, "hypertension": hypertension,
        "liver_disease": liver_disease, "heart_failure": heart_failure, "malignancy": malignancy,
    }


def _laterality(rng: np.random.Generator, p_bilateral: float = 0.2) -> str:
    u = rng.random()
    return "bilateral" if u < p_bilateral else ("left" if u < (1 + p_bilateral) / 2 else "right")


def sample_findings(rng: np.random.Generator, patient: dict) -> tuple[dict[str, int], dict[str, dict]]:
    """Draw presence of every finding in :data:`FINDINGS` and the facts of each positive one.

    Returns (findings {name: 0|1} for all names, facts {name: {...}} for positives only).
    Facts use mm for sizes, HU for attenuation; ``"subtle": True`` marks the cases a
    model must look closely for (small, mild or low contrast).
    """
    age, p = patient["age"], patient
    obese = p["bmi"] >= 30
    prob = {
        "hepatic_steatosis": 0.08 + 0.25 * obese + 0.12 * p["diabetes"] + 0.2 * p["alcohol"],
        "cirrhosis": 0.01 + 0.75 * p["liver_disease"],
        "liver_lesion": 0.09 + 0.35 * p["malignancy"],
        "gallstones": 0.07 + 0.07 * (p["sex"] == "F") + 0.06 * obese + 0.06 * _sigmoid((age - 55) / 10),
        "renal_cyst": 0.03 + 0.4 * _sigmoid((age - 62) / 8),
        "kidney_stone": 0.09,
        "abdominal_aortic_aneurysm": 0.01 + (0.1 + 0.08 * p["smoker"]) * (p["sex"] == "M") * _sigmoid((age - 65) / 5)
        + 0.02 * _sigmoid((age - 70) / 5),
        "atherosclerosis": 0.03 + 0.75 * _sigmoid((age - 62) / 7) + 0.1 * p["smoker"],
        "lymphadenopathy": 0.05 + 0.5 * p["malignancy"],
        "bowel_obstruction": 0.06,
        "osteopenia": 0.02 + (0.7 if p["sex"] == "F" else 0.45) * _sigmoid((age - 64) / 6),
        "cardiomegaly": 0.03 + 0.85 * p["heart_failure"],
    }
    on = {name: bool(rng.random() < min(pr, 0.95)) for name, pr in prob.items()}
    on["hepatomegaly"] = bool(rng.random() < 0.04 + 0.25 * on["hepatic_steatosis"] + 0.1 * p["heart_failure"]) and not on["cirrhosis"]
    on["splenomegaly"] = bool(rng.random() < 0.04 + 0.6 * p["liver_disease"])
    on["ascites"] = bool(rng.random() < 0.02 + 0.45 * p["liver_disease"] + 0.2 * p["heart_failure"] + 0.1 * p["malignancy"])
    on["pleural_effusion"] = bool(rng.random() < 0.03 + 0.5 * p["heart_failure"] + 0.08 * p["malignancy"])
    on["vertebral_compression_fracture"] = bool(rng.random() < 0.025 + 0.2 * on["osteopenia"])

    facts: dict[str, dict] = {}
    if on["hepatic_steatosis"]:
        hu = rng.uniform(2, 38)
        grade = "mild" if hu > 28 else ("moderate" if hu > 14 else "severe")
        facts["hepatic_steatosis"] = {"liver_hu_noncontrast": _r(hu), "grade": grade, "subtle": grade == "mild"}
    if on["hepatomegaly"]:
        span = rng.uniform(185, 235)
        facts["hepatomegaly"] = {"craniocaudal_span_mm": _r(span, 0), "subtle": span < 195}
    if on["cirrhosis"]:
        facts["cirrhosis"] = {"nodular_contour": True, "right_lobe_atrophy": bool(rng.random() < 0.7),
                              "subtle": False}
    if on["liver_lesion"]:
        count = int(rng.choice([1, 1, 1, 2, 2, 3, 4, 5]))
        diam = sorted((float(x) for x in rng.uniform(5, 40, size=count) ** 1.0), reverse=True)
        diam = [_r(d, 0) for d in diam]
        lobes = [str(rng.choice(["right", "right", "left"])) for _ in range(count)]
        delta = rng.uniform(20, 60)
        facts["liver_lesion"] = {"count": count, "diameters_mm": diam, "largest_mm": diam[0], "lobes": lobes,
                                 "hu_below_liver": _r(delta), "subtle": diam[0] < 10 or delta < 25}
    if on["splenomegaly"]:
        length = rng.uniform(140, 200)
        facts["splenomegaly"] = {"length_mm": _r(length, 0), "subtle": length < 148}
    if on["gallstones"]:
        count = int(rng.choice([1, 1, 2, 3, 5, 8]))
        largest = rng.uniform(3, 22)
        facts["gallstones"] = {"count": count, "largest_mm": _r(largest, 0), "hu": _r(rng.uniform(150, 900), 0),
                               "subtle": largest < 6}
    if on["renal_cyst"]:
        side = _laterality(rng, 0.25)
        largest = rng.uniform(8, 55)
        facts["renal_cyst"] = {"laterality": side, "largest_mm": _r(largest, 0),
                               "pole": str(rng.choice(["upper", "interpolar", "lower"])),
                               "hu": _r(rng.uniform(-2, 15), 0), "subtle": largest < 14}
    if on["kidney_stone"]:
        side = _laterality(rng, 0.2)
        size = rng.uniform(2, 11)
        facts["kidney_stone"] = {"laterality": side, "size_mm": _r(size), "count": int(rng.choice([1, 1, 2])),
                                 "location": str(rng.choice(["lower pole", "interpolar", "renal pelvis"])),
                                 "hu": _r(rng.uniform(400, 1300), 0), "subtle": size < 3.5}
    hydro_p = 0.03 + 0.35 * on["kidney_stone"]
    on["hydronephrosis"] = bool(rng.random() < hydro_p)
    if on["hydronephrosis"]:
        stone = facts.get("kidney_stone")
        if stone and stone["laterality"] != "bilateral":
            side = stone["laterality"]
        else:
            side = _laterality(rng, 0.15)
        grade = str(rng.choice(["mild", "moderate", "severe"]))
        pelvis = {"mild": rng.uniform(12, 18), "moderate": rng.uniform(18, 28), "severe": rng.uniform(28, 40)}[grade]
        facts["hydronephrosis"] = {"laterality": side, "grade": grade, "pelvis_diameter_mm": _r(pelvis, 0),
                                   "subtle": grade == "mild"}
    if on["abdominal_aortic_aneurysm"]:
        diam = rng.uniform(32, 66)
        facts["abdominal_aortic_aneurysm"] = {"max_diameter_mm": _r(diam, 0), "length_mm": _r(rng.uniform(40, 70), 0),
                                              "mural_thrombus": bool(rng.random() < 0.5 and diam > 40),
                                              "location": "infrarenal", "subtle": diam < 35}
    if on["atherosclerosis"]:
        plaques = int(rng.integers(3, 26))
        severity = "mild" if plaques < 8 else ("moderate" if plaques < 16 else "extensive")
        facts["atherosclerosis"] = {"calcified_plaques": plaques, "severity": severity, "hu": _r(rng.uniform(450, 1100), 0),
                                    "subtle": severity == "mild"}
    if on["ascites"]:
        amount = str(rng.choice(["small", "moderate", "large"], p=[0.45, 0.35, 0.2]))
        thick = {"small": rng.uniform(6, 12), "moderate": rng.uniform(12, 24), "large": rng.uniform(24, 40)}[amount]
        facts["ascites"] = {"amount": amount, "thickness_mm": _r(thick, 0), "subtle": amount == "small"}
    if on["pleural_effusion"]:
        side = _laterality(rng, 0.55 if p["heart_failure"] else 0.2)
        size = str(rng.choice(["small", "moderate", "large"], p=[0.5, 0.35, 0.15]))
        depth = {"small": rng.uniform(10, 25), "moderate": rng.uniform(25, 50), "large": rng.uniform(50, 80)}[size]
        facts["pleural_effusion"] = {"laterality": side, "size": size, "depth_mm": _r(depth, 0), "subtle": size == "small"}
    if on["lymphadenopathy"]:
        count = int(rng.choice([1, 1, 2, 3, 4]))
        axes = sorted((_r(x, 0) for x in rng.uniform(11, 32, size=count)), reverse=True)
        station = str(rng.choice(["retroperitoneal", "mesenteric", "pelvic"]))
        facts["lymphadenopathy"] = {"count": count, "short_axis_mm": axes, "largest_mm": axes[0], "station": station,
                                    "subtle": axes[0] < 14}
    if on["bowel_obstruction"]:
        diam = rng.uniform(30, 48)
        facts["bowel_obstruction"] = {"max_loop_diameter_mm": _r(diam, 0),
                                      "transition": str(rng.choice(["right lower quadrant", "left lower quadrant", "mid abdomen"])),
                                      "segment": "small bowel", "subtle": False}
    if on["osteopenia"]:
        hu = rng.uniform(55, 120)
        facts["osteopenia"] = {"cancellous_hu": _r(hu, 0), "subtle": hu > 105}
    if on["vertebral_compression_fracture"]:
        level = str(rng.choice(["T12", "L1", "L1", "L2", "L3", "L4"]))
        loss = rng.uniform(18, 55)
        facts["vertebral_compression_fracture"] = {"level": level, "height_loss_percent": _r(loss, 0),
                                                   "acuity": str(rng.choice(["chronic", "age-indeterminate"])),
                                                   "subtle": loss < 25}
    if on["cardiomegaly"]:
        width = rng.uniform(150, 190)
        facts["cardiomegaly"] = {"transverse_diameter_mm": _r(width, 0), "subtle": width < 156}

    findings = {name: int(on[name]) for name in FINDINGS}
    return findings, facts
