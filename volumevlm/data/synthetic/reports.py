"""Free-text radiology reports of the synthetic cohort, and the checker that keeps them honest.

Synthetic, not clinical data. :func:`write_report` turns a case's findings and facts
into a report with an EXAMINATION/TECHNIQUE header, FINDINGS under the organ-system
sections of :data:`volumevlm.text.sections.SECTIONS` and an IMPRESSION. Each finding
has several templates (synonyms, measurements in mm or cm, laterality), normal
sections have several phrasings, negatives are sometimes negated explicitly
("No hydronephrosis."), and subtle positives are sometimes hedged ("Possible ...");
hedged findings are returned so the manifest records them.

:func:`finding_mentions` reads a report back with keyword cues per finding plus
negation and uncertainty cues, and :func:`check_report` lists every disagreement
between a report and its labels; the tests run it on every generated case.
"""

from __future__ import annotations

import re

import numpy as np

from volumevlm.data.synthetic.findings import FINDINGS
from volumevlm.text.sections import SECTIONS

# --- reading reports back ---------------------------------------------------------------

# One regular expression per finding: any match is a mention of that finding.
FINDING_CUES: dict[str, str] = {
    "hepatic_steatosis": (r"steatosis|fatty (infiltration|liver|change)|diffusely hypoattenuating|hypoattenuating liver"
                          r"|low attenuation of the liver"),
    "hepatomegaly": r"hepatomegaly|liver is enlarged|enlarged liver",
    "cirrhosis": r"cirrho\w*|nodular (hepatic |liver )?(contour|surface)",
    "liver_lesion": (r"(hepatic|liver) (lesions?|mass(es)?|hypodensit\w+|metasta\w+)"
                     r"|(lesions?|hypodensit\w+|masses) (in|within) the (liver|(right|left) hepatic lobe)"),
    "splenomegaly": r"splenomegaly|spleen is enlarged|enlarged spleen",
    "gallstones": r"gallstones?|cholelithiasis",
    "renal_cyst": r"(renal|kidney|cortical|simple|exophytic) cysts?|renal hypodensit\w+",
    "kidney_stone": r"nephrolithiasis|(renal|kidney) (calcul\w+|stones?)|(nonobstructing|obstructing) (\w+ )?(calcul\w+|stones?)",
    "hydronephrosis": r"hydronephrosis|pelvicaliectasis|pelviectasis|dilat\w+ of the (\w+ )?(renal )?collecting systems?",
    "abdominal_aortic_aneurysm": r"aneurysm\w*",
    "atherosclerosis": r"atheroscleros\w+|atherosclerotic|calcified plaques?",
    "ascites": r"ascites|free fluid|intraperitoneal fluid|perihepatic fluid",
    "pleural_effusion": r"pleural effusions?|pleural fluid",
    "lymphadenopathy": r"(lymph)?adenopathy|enlarged (\w+ )?(lymph )?nodes?|lymph node enlargement",
    "bowel_obstruction": r"obstruction|obstructed|dilated (\w+ )?(small )?bowel|air-fluid levels|transition point",
    "vertebral_compression_fracture": r"fractures?|compression deformity|wedge deformity|height loss|loss of (vertebral )?(body )?height",
    "osteopenia": r"osteopeni\w*|osteoporo\w*|demineraliz\w+|decreased bone (density|mineralization)",
    "cardiomegaly": r"cardiomegaly|heart is enlarged|cardiac enlargement|enlarged heart",
}
_CUES = {name: re.compile(rf"\b(?:{pat})", re.IGNORECASE) for name, pat in FINDING_CUES.items()}
_NEGATION = re.compile(r"\b(no|not|without|negative for|nor|absence of|free of|resolved)\b", re.IGNORECASE)
_HEDGE_BEFORE = re.compile(r"\b(possible|possibly|probable|questionable|equivocal|suspected|cannot exclude)\b", re.IGNORECASE)
_HEDGE_ANYWHERE = re.compile(r"cannot be excluded|not excluded|cannot exclude", re.IGNORECASE)
# Sentences end at '.', ';' or a newline, but not at decimal points ("4.2 cm").
_SENTENCE = re.compile(r"(?<!\d)\.(?!\d)|;|\n")
_SCOPE_BREAK = re.compile(r"\b(but|however|although)\b", re.IGNORECASE)

_RANK = {"negated": 0, "uncertain": 1, "affirmed": 2}
SIDE_WORDS = {"left": ("left",), "right": ("right",), "bilateral": ("bilateral", "both")}


def _report_body(text: str) -> str:
    """The FINDINGS and IMPRESSION part: header lines (EXAMINATION, TECHNIQUE) carry no findings."""
    m = re.search(r"^\s*FINDINGS\s*:", text, re.MULTILINE)
    return text[m.start():] if m else text


def finding_mentions(text: str) -> dict[str, dict]:
    """How a report speaks of each finding it mentions.

    Returns ``{finding: {"status": "affirmed"|"uncertain"|"negated", "sentences": [...]}}``
    for findings with at least one mention; absent keys are not mentioned. A mention is
    negated when a negation cue precedes it in its sentence (no "but"/"however" between),
    uncertain when a hedge precedes it or the sentence says "cannot be excluded", and
    affirmed otherwise. Over several mentions, affirmed beats uncertain beats negated.
    """
    out: dict[str, dict] = {}
    for sentence in _SENTENCE.split(_report_body(text)):
        sentence = sentence.strip()
        if not sentence:
            continue
        for name, cue in _CUES.items():
            for m in cue.finditer(sentence):
                before = sentence[: m.start()]
                parts = _SCOPE_BREAK.split(before)
                scope = parts[-1] if parts else before
                if _HEDGE_BEFORE.search(scope) or _HEDGE_ANYWHERE.search(sentence):
                    status = "uncertain"
                elif _NEGATION.search(scope):
                    status = "negated"
                else:
                    status = "affirmed"
                entry = out.setdefault(name, {"status": status, "sentences": []})
                if _RANK[status] > _RANK[entry["status"]]:
                    entry["status"] = status
                if status != "negated" and sentence not in entry["sentences"]:
                    entry["sentences"].append(sentence)
    return out


def check_report(text: str, findings: dict[str, int], facts: dict[str, dict] | None = None) -> list[str]:
    """Every disagreement between a report and its labels, as readable strings ([] = consistent).

    Rules: a positive finding is mentioned and not only negated; it is hedged exactly when
    its facts say ``"uncertain": True``; its laterality (if any) is named in an affirming
    sentence. A negative finding is absent or negated, never affirmed or hedged.
    """
    facts = facts or {}
    seen = finding_mentions(text)
    problems: list[str] = []
    for name in FINDINGS:
        status = seen.get(name, {}).get("status")
        if findings.get(name):
            want = "uncertain" if facts.get(name, {}).get("uncertain") else "affirmed"
            if status != want:
                problems.append(f"{name}: positive but {status or 'not mentioned'} (expected {want})")
                continue
            side = facts.get(name, {}).get("laterality")
            if side:
                said = " ".join(seen[name]["sentences"]).lower()
                if not any(re.search(rf"\b{w}\b", said) for w in SIDE_WORDS[side]):
                    problems.append(f"{name}: laterality {side!r} not stated")
        elif status in ("affirmed", "uncertain"):
            problems.append(f"{name}: negative but {status} in the report")
    return problems


# --- writing reports ---------------------------------------------------------------------

_COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
_STATION = {"retroperitoneal": "retroperitoneal", "mesenteric": "mesenteric", "pelvic": "pelvic sidewall"}


class _Writer:
    """Sentence choices for one report; all randomness comes from one generator."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def size(self, mm: float) -> str:
        """A length in mm or cm, as radiologists vary it."""
        if mm >= 10 and self.chance(0.5):
            return f"{mm / 10:.1f} cm"
        return f"{mm:.0f} mm" if mm >= 3 else f"{mm:.1f} mm"


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _lower_thorax(w: _Writer, f: dict, x: dict, hedged: set) -> list[str]:
    out = []
    if f["pleural_effusion"]:
        e = x["pleural_effusion"]
        side, size = e["laterality"], e["size"]
        plural = "s" if side == "bilateral" else ""
        if "pleural_effusion" in hedged:
            out.append(f"Possible trace {side} pleural effusion{plural}.")
        else:
            out.append(w.pick([
                f"{_cap(size)} {side} pleural effusion{plural}.",
                f"There {'are' if plural else 'is a'} {size} {side} pleural effusion{plural} with adjacent compressive atelectasis.",
                f"{_cap(size)} layering {side} pleural fluid, measuring up to {w.size(e['depth_mm'])} in depth.",
            ]))
    else:
        out.append(w.pick(["No pleural effusion.", "The lung bases are clear.",
                           "No pleural effusion or consolidation at the lung bases.", ""]))
    if f["cardiomegaly"]:
        c = x["cardiomegaly"]
        if "cardiomegaly" in hedged:
            out.append("Possible mild cardiomegaly.")
        else:
            out.append(w.pick([
                "Cardiomegaly.",
                f"The heart is enlarged, measuring {w.size(c['transverse_diameter_mm'])} in transverse dimension.",
                f"Cardiomegaly, with a transverse cardiac diameter of {w.size(c['transverse_diameter_mm'])}.",
                "Cardiac enlargement.",
            ]))
    else:
        out.append(w.pick(["Heart size is normal.", "The heart is normal in size.", "No cardiomegaly.", ""]))
    if w.chance(0.15):
        out.append("Mild bibasilar dependent atelectasis.")
    return out


def _liver(w: _Writer, f: dict, x: dict, hedged: set, phase: str) -> list[str]:
    out = []
    if f["cirrhosis"]:
        c = x["cirrhosis"]
        atrophy = " and atrophy of the right lobe" if c["right_lobe_atrophy"] else ""
        out.append(w.pick([
            f"Nodular hepatic contour{atrophy}, consistent with cirrhosis.",
            f"The liver is cirrhotic in morphology with a nodular surface{atrophy}.",
            "Cirrhotic liver morphology.",
        ]))
    if f["hepatomegaly"]:
        span = w.size(x["hepatomegaly"]["craniocaudal_span_mm"])
        if "hepatomegaly" in hedged:
            out.append("Possible mild hepatomegaly.")
        else:
            out.append(w.pick([
                f"Hepatomegaly, with the liver measuring {span} in craniocaudal dimension.",
                f"The liver is enlarged, measuring {span} craniocaudally.",
                f"Enlarged liver ({span} craniocaudal span).",
            ]))
    if f["hepatic_steatosis"]:
        s = x["hepatic_steatosis"]
        if "hepatic_steatosis" in hedged:
            out.append("Possible mild hepatic steatosis.")
        else:
            opts = [
                f"{_cap(s['grade'])} diffuse hepatic steatosis.",
                "The liver is diffusely hypoattenuating, consistent with hepatic steatosis.",
                f"{_cap(s['grade'])} fatty infiltration of the liver.",
            ]
            if phase == "non-contrast":
                opts.append(f"Hepatic attenuation measures {s['liver_hu_noncontrast']:.0f} HU, compatible with steatosis.")
            out.append(w.pick(opts))
    if not (f["cirrhosis"] or f["hepatomegaly"] or f["hepatic_steatosis"]):
        out.append(w.pick(["The liver is normal in size and attenuation.", "Normal hepatic size and contour.",
                           "The liver is unremarkable in size and morphology.", "No hepatomegaly."]))
    if f["liver_lesion"]:
        les = x["liver_lesion"]
        n, big, lobe = les["count"], w.size(les["largest_mm"]), les["lobes"][0]
        if "liver_lesion" in hedged:
            out.append(f"Questionable subcentimeter hepatic hypodensity in the {lobe} lobe, too small to characterize.")
        elif n == 1:
            out.append(w.pick([
                f"{big} hypodense lesion in the {lobe} hepatic lobe.",
                f"There is a {big} hypoattenuating hepatic lesion in the {lobe} lobe.",
                f"Solitary {big} hepatic hypodensity in the {lobe} lobe.",
            ]))
        else:
            word = _COUNT_WORDS.get(n, "multiple")
            out.append(w.pick([
                f"{_cap(word)} hypodense hepatic lesions, the largest measuring {big} in the {lobe} lobe.",
                f"Multiple hepatic hypodensities, the largest {big}.",
                f"{_cap(word)} hypoattenuating lesions within the liver measuring up to {big}.",
            ]))
    else:
        out.append(w.pick(["No focal hepatic lesion.", "No focal liver lesion.", "", "No suspicious hepatic mass."]))
    out.append(w.pick(["No intrahepatic or extrahepatic biliary ductal dilatation.", "The biliary tree is not dilated.", ""]))
    if phase == "portal venous" and w.chance(0.4):
        out.append("The portal and hepatic veins are patent.")
    return out


def _gallbladder(w: _Writer, f: dict, x: dict, hedged: set) -> list[str]:
    if not f["gallstones"]:
        return [w.pick(["The gallbladder is unremarkable.", "No radiopaque gallstones.",
                        "Gallbladder is normally distended without wall thickening.", "Normal gallbladder."])]
    g = x["gallstones"]
    if "gallstones" in hedged:
        return ["Possible tiny gallstone in the gallbladder neck."]
    big = w.size(g["largest_mm"])
    if g["count"] == 1:
        return [w.pick([f"A {big} calcified gallstone in the gallbladder.", f"Cholelithiasis, with a single {big} stone.",
                        f"Solitary {big} gallstone without gallbladder wall thickening."])]
    return [w.pick([f"Multiple gallstones, the largest measuring {big}.",
                    "Cholelithiasis without gallbladder wall thickening or pericholecystic inflammation.",
                    f"Cholelithiasis with {_COUNT_WORDS.get(g['count'], 'numerous')} stones up to {big}."])]


def _spleen(w: _Writer, f: dict, x: dict, hedged: set) -> list[str]:
    if not f["splenomegaly"]:
        return [w.pick(["The spleen is normal in size.", "Unremarkable spleen.", "No splenomegaly."])]
    length = w.size(x["splenomegaly"]["length_mm"])
    if "splenomegaly" in hedged:
        return ["Possible mild splenomegaly."]
    return [w.pick([f"Splenomegaly, measuring {length} in length.", f"The spleen is enlarged, measuring {length}.",
                    f"Splenomegaly ({length} craniocaudal)."])]


def _kidneys(w: _Writer, f: dict, x: dict, hedged: set, phase: str) -> list[str]:
    out = []
    if f["renal_cyst"]:
        c = x["renal_cyst"]
        side, big = c["laterality"], w.size(c["largest_mm"])
        pole = "interpolar region" if c["pole"] == "interpolar" else f"{c['pole']} pole"
        if "renal_cyst" in hedged:
            out.append(f"Questionable small {side} renal cyst.")
        elif side == "bilateral":
            out.append(w.pick([f"Bilateral simple renal cysts, the largest measuring {big}.", f"Bilateral renal cysts up to {big}."]))
        else:
            out.append(w.pick([f"{big} simple cyst in the {pole} of the {side} kidney.", f"{_cap(side)} renal cyst measuring {big}.",
                               f"A {big} exophytic cyst arises from the {pole} of the {side} kidney, a simple renal cyst."]))
    if f["kidney_stone"]:
        s = x["kidney_stone"]
        side, size = s["laterality"], w.size(s["size_mm"])
        obstructing = f["hydronephrosis"] and x["hydronephrosis"]["laterality"] in (side, "bilateral") and side != "bilateral"
        if "kidney_stone" in hedged:
            out.append(f"Possible punctate nonobstructing {side} renal calculus.")
        elif side == "bilateral":
            out.append(w.pick([f"Bilateral nephrolithiasis, the largest stone measuring {size}.",
                               f"Bilateral renal calculi up to {size}."]))
        elif obstructing:
            out.append(w.pick([f"{size} obstructing calculus at the {side} renal pelvis.",
                               f"{_cap(side)} nephrolithiasis with a {size} stone at the renal pelvis."]))
        else:
            out.append(w.pick([f"{size} nonobstructing {side} renal calculus in the {s['location']}.",
                               f"{_cap(side)} nephrolithiasis, measuring up to {size}.",
                               f"{_cap(side)} kidney stone measuring {size} in the {s['location']}."]))
    if f["hydronephrosis"]:
        h = x["hydronephrosis"]
        side = h["laterality"]
        if "hydronephrosis" in hedged:
            out.append(f"Possible mild {side} hydronephrosis.")
        else:
            out.append(w.pick([f"{_cap(h['grade'])} {side} hydronephrosis.",
                               f"{_cap(h['grade'])} dilatation of the {side} renal collecting system, "
                               f"with the renal pelvis measuring {w.size(h['pelvis_diameter_mm'])}.",
                               f"{_cap(side)} hydronephrosis, {h['grade']} in degree."]))
    negs = [n for n, k in (("hydronephrosis", "hydronephrosis"), ("kidney_stone", "nephrolithiasis")) if not f[n]]
    if len(negs) == 2:
        out.append(w.pick(["No hydronephrosis or nephrolithiasis.", "No renal calculi or hydronephrosis.", "No hydronephrosis."]))
    elif negs == ["hydronephrosis"]:
        out.append(w.pick(["No hydronephrosis.", "There is no hydronephrosis.", ""]))
    elif negs == ["kidney_stone"]:
        out.append(w.pick(["No nephrolithiasis.", ""]))
    if not (f["renal_cyst"] or f["kidney_stone"] or f["hydronephrosis"]):
        if phase == "non-contrast":
            out.append(w.pick(["The kidneys are normal in size.", "The kidneys are unremarkable."]))
        else:
            out.append(w.pick(["The kidneys enhance symmetrically.", "The kidneys are normal in size and enhance symmetrically."]))
    out.append(w.pick(["The ureters are unremarkable.", ""]))
    return out


def _gi(w: _Writer, f: dict, x: dict) -> list[str]:
    out = []
    if f["bowel_obstruction"]:
        b = x["bowel_obstruction"]
        d, loc = w.size(b["max_loop_diameter_mm"]), b["transition"]
        out.append(w.pick([
            f"Dilated fluid-filled small bowel loops measuring up to {d} with air-fluid levels and a transition point in the {loc}, "
            "consistent with small bowel obstruction.",
            f"Small bowel obstruction with a transition point in the {loc}; the colon is decompressed.",
            f"Multiple dilated loops of small bowel up to {d}, compatible with mechanical obstruction.",
        ]))
    else:
        out.append(w.pick(["No bowel obstruction.", "The bowel is normal in caliber.", "No dilated bowel loops.",
                           "The stomach and bowel are unremarkable."]))
    if w.chance(0.2):
        out.append(w.pick(["Colonic diverticulosis without diverticulitis.", "Small hiatal hernia."]))
    if w.chance(0.3):
        out.append("The appendix is normal.")
    return out


def _peritoneum(w: _Writer, f: dict, x: dict, hedged: set) -> list[str]:
    if not f["ascites"]:
        return [w.pick(["No ascites or free air.", "No free fluid.", "No ascites.", "No intraperitoneal free air or fluid collection."])]
    a = x["ascites"]
    if "ascites" in hedged:
        return ["Possible trace free fluid in the pelvis."]
    return [w.pick([f"{_cap(a['amount'])} volume ascites.", f"{_cap(a['amount'])} amount of free fluid in the abdomen and pelvis.",
                    f"{_cap(a['amount'])} perihepatic and pelvic ascites."])]


def _vessels(w: _Writer, f: dict, x: dict, hedged: set) -> list[str]:
    out = []
    if f["abdominal_aortic_aneurysm"]:
        a = x["abdominal_aortic_aneurysm"]
        d = w.size(a["max_diameter_mm"])
        thrombus = ", with eccentric mural thrombus" if a["mural_thrombus"] else ""
        if a["subtle"]:
            out.append(f"Borderline aneurysmal dilatation of the infrarenal aorta measuring {d}.")
        else:
            out.append(w.pick([f"Infrarenal abdominal aortic aneurysm measuring {d} in maximal diameter{thrombus}.",
                               f"Fusiform aneurysmal dilatation of the infrarenal aorta to {d}{thrombus}.",
                               f"The infrarenal abdominal aorta is aneurysmal, measuring up to {d}{thrombus}."]))
    else:
        out.append(w.pick(["The abdominal aorta is normal in caliber.", "No abdominal aortic aneurysm.", ""]))
    if f["atherosclerosis"]:
        s = x["atherosclerosis"]
        if "atherosclerosis" in hedged:
            out.append("Possible minimal atherosclerotic calcification of the aorta.")
        else:
            out.append(w.pick([f"{_cap(s['severity'])} atherosclerotic calcification of the abdominal aorta and iliac arteries.",
                               "Aortoiliac atherosclerosis.", "Scattered calcified plaque in the abdominal aorta."]))
    else:
        out.append(w.pick(["No significant atherosclerotic calcification.", "", "No aortic atherosclerosis."]))
    return out


def _nodes(w: _Writer, f: dict, x: dict, hedged: set) -> list[str]:
    if not f["lymphadenopathy"]:
        return [w.pick(["No lymphadenopathy.", "No pathologically enlarged lymph nodes by CT size criteria.",
                        "Subcentimeter retroperitoneal lymph nodes.", "No adenopathy."])]
    n = x["lymphadenopathy"]
    station, big = _STATION[n["station"]], w.size(n["largest_mm"])
    if "lymphadenopathy" in hedged:
        return [f"Possible mild {station} lymphadenopathy."]
    return [w.pick([f"{_cap(station)} lymphadenopathy, the largest node measuring {big} in short axis.",
                    f"Enlarged {station} lymph nodes, up to {big} short axis.",
                    f"{_cap(station)} adenopathy measuring up to {big}."])]


def _msk(w: _Writer, f: dict, x: dict, hedged: set) -> list[str]:
    out = []
    if f["vertebral_compression_fracture"]:
        c = x["vertebral_compression_fracture"]
        lvl, pct = c["level"], c["height_loss_percent"]
        if "vertebral_compression_fracture" in hedged:
            out.append(f"Possible mild compression deformity of {lvl}.")
        else:
            out.append(w.pick([f"{_cap(c['acuity'])} compression fracture of {lvl} "
                               f"with approximately {pct:.0f}% loss of vertebral body height.",
                               f"{lvl} compression deformity with {pct:.0f}% height loss.",
                               f"Anterior wedge deformity of {lvl}, approximately {pct:.0f}% height loss."]))
    else:
        out.append(w.pick(["No acute fracture.", "No compression fracture.", "No acute osseous abnormality.", ""]))
    if f["osteopenia"]:
        o = x["osteopenia"]
        if "osteopenia" in hedged:
            out.append("Possible mild osteopenia.")
        else:
            out.append(w.pick(["Diffuse osteopenia.", "The bones are diffusely demineralized.",
                               f"Osteopenia, with trabecular attenuation of {o['cancellous_hu']:.0f} HU in the lumbar vertebral bodies."]))
    if w.chance(0.25):
        out.append("Mild degenerative changes of the lumbar spine.")
    return out


# Impression phrases, most important first. Hedged findings stay out of the impression.
_IMPRESSION_ORDER = (
    "bowel_obstruction", "abdominal_aortic_aneurysm", "liver_lesion", "lymphadenopathy", "hydronephrosis",
    "kidney_stone", "ascites", "pleural_effusion", "cirrhosis", "splenomegaly", "cardiomegaly",
    "vertebral_compression_fracture", "gallstones", "hepatic_steatosis", "hepatomegaly", "renal_cyst",
    "atherosclerosis", "osteopenia",
)


def _impression_phrase(w: _Writer, name: str, x: dict) -> str:
    d = x[name]
    side = d.get("laterality", "")
    opts = {
        "bowel_obstruction": lambda: [f"Small bowel obstruction with transition point in the {d['transition']}.",
                                      "Findings of small bowel obstruction."],
        "abdominal_aortic_aneurysm": lambda: [f"{w.size(d['max_diameter_mm'])} infrarenal abdominal aortic aneurysm.",
                                              "Abdominal aortic aneurysm."],
        "liver_lesion": lambda: ["Hypodense hepatic lesions; further characterization with MRI is recommended." if d["count"] > 1
                         else "Indeterminate hepatic lesion; consider MRI for characterization.",
                         f"Hepatic lesion{'s' if d['count'] > 1 else ''}, the largest {w.size(d['largest_mm'])}."],
        "lymphadenopathy": lambda: [f"{_cap(_STATION[d['station']])} lymphadenopathy.", "Lymphadenopathy, nonspecific."],
        "hydronephrosis": lambda: [f"{_cap(d['grade'])} {side} hydronephrosis."],
        "kidney_stone": lambda: [f"{_cap(side)} nephrolithiasis.", f"{_cap(side)} renal calculus."],
        "ascites": lambda: [f"{_cap(d['amount'])} ascites."],
        "pleural_effusion": lambda: [f"{_cap(d['size'])} {side} pleural effusion{'s' if side == 'bilateral' else ''}."],
        "cirrhosis": lambda: ["Cirrhosis.", "Cirrhotic liver morphology."],
        "splenomegaly": lambda: ["Splenomegaly."],
        "cardiomegaly": lambda: ["Cardiomegaly."],
        "vertebral_compression_fracture": lambda: [f"{d['level']} compression fracture, {d['acuity']}."],
        "gallstones": lambda: ["Cholelithiasis.", "Cholelithiasis without evidence of acute cholecystitis."],
        "hepatic_steatosis": lambda: ["Hepatic steatosis."],
        "hepatomegaly": lambda: ["Hepatomegaly."],
        "renal_cyst": lambda: [f"{_cap(side)} renal cyst{'s' if side == 'bilateral' else ''}, likely simple."],
        "atherosclerosis": lambda: ["Aortoiliac atherosclerosis."],
        "osteopenia": lambda: ["Osteopenia."],
    }[name]()
    return w.pick(opts)


def write_report(rng: np.random.Generator, findings: dict[str, int], facts: dict[str, dict], *, contrast_phase: str,
                 slice_thickness_mm: float) -> tuple[str, list[str]]:
    """A synthetic CT abdomen/pelvis report consistent with ``findings`` and ``facts``.

    Returns (text, hedged findings). A subtle positive (``facts[name]["subtle"]``) is
    hedged with probability 0.35; hedged findings are worded "Possible ..." and left
    out of the IMPRESSION. Measurements come from the facts (mm, HU).
    """
    w = _Writer(rng)
    hedgeable = {"hepatic_steatosis", "hepatomegaly", "liver_lesion", "gallstones", "renal_cyst", "kidney_stone",
                 "hydronephrosis", "atherosclerosis", "ascites", "pleural_effusion", "lymphadenopathy",
                 "vertebral_compression_fracture", "osteopenia", "cardiomegaly"}
    hedged = {n for n in FINDINGS if findings[n] and n in hedgeable and facts[n].get("subtle") and w.chance(0.35)}
    x, f = facts, findings
    exam = {"non-contrast": "CT abdomen and pelvis without intravenous contrast",
            "arterial": "CT abdomen and pelvis with intravenous contrast, arterial phase",
            "portal venous": "CT abdomen and pelvis with intravenous contrast, portal venous phase"}[contrast_phase]
    indication = w.pick(["Abdominal pain.", "Follow-up.", "Weight loss.", "Evaluation of abdominal symptoms.", "Nausea and vomiting."])
    body = {
        "LOWER THORAX": _lower_thorax(w, f, x, hedged),
        "LIVER AND BILIARY TREE": _liver(w, f, x, hedged, contrast_phase),
        "GALLBLADDER": _gallbladder(w, f, x, hedged),
        "SPLEEN": _spleen(w, f, x, hedged),
        "PANCREAS": [w.pick(["The pancreas is unremarkable.", "No pancreatic ductal dilatation or peripancreatic inflammation.",
                             "Normal pancreatic morphology."])],
        "ADRENAL GLANDS": [w.pick(["The adrenal glands are normal.", "Unremarkable adrenal glands.", "No adrenal nodule."])],
        "KIDNEYS AND URETERS": _kidneys(w, f, x, hedged, contrast_phase),
        "GASTROINTESTINAL TRACT": _gi(w, f, x),
        "PERITONEUM": _peritoneum(w, f, x, hedged),
        "VASCULATURE": _vessels(w, f, x, hedged),
        "LYMPH NODES": _nodes(w, f, x, hedged),
        "BLADDER": [w.pick(["The urinary bladder is unremarkable.", "The bladder is partially distended and unremarkable.",
                            "Normal urinary bladder."])],
        "MUSCULOSKELETAL": _msk(w, f, x, hedged),
    }
    lines = [f"EXAMINATION: {exam}.", f"INDICATION: {indication}",
             f"TECHNIQUE: Axial images from the lung bases through the pelvis, reconstructed at {slice_thickness_mm:.1f} mm.",
             "", "FINDINGS:"]
    for section in SECTIONS:
        text = " ".join(s for s in body[section] if s)
        lines.append(f"{section}: {text if text else 'Unremarkable.'}")
    positives = [n for n in _IMPRESSION_ORDER if f[n] and n not in hedged]
    if len(positives) > 3 and w.chance(0.5):
        positives = positives[: int(w.rng.integers(3, len(positives) + 1))]
    lines += ["", "IMPRESSION:"]
    if positives:
        lines += [f"{i}. {_impression_phrase(w, n, x)}" for i, n in enumerate(positives, 1)]
    else:
        lines.append("1. " + w.pick(["No acute abnormality in the abdomen or pelvis.", "Unremarkable CT of the abdomen and pelvis.",
                                     "No acute intra-abdominal or pelvic process."]))
    return "\n".join(lines) + "\n", sorted(hedged)
