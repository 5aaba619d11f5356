"""Rule-based findings labeler for radiology report text (CT abdomen/pelvis and chest).

``label_findings(report)`` reads free text sentence by sentence and says, for every
finding it knows that the text mentions, whether the report affirms it
(``"positive"``), denies it (``"negative"``) or hedges (``"uncertain"``). Findings the
text does not mention are left out of the result. It is the labeler behind the
clinical-efficacy report metrics (:mod:`volumevlm.metrics.report`) and can label
a training corpus; it is a set of regular expressions, not a clinical tool.

Known findings (:data:`KNOWN_FINDINGS`, snake_case keys):

* the 18 findings of the synthetic cohort (:data:`SYNTHETIC_FINDINGS`, the same keys
  and order as ``volumevlm.data.synthetic.findings.FINDINGS``; synthetic, not clinical data);
* Merlin's 30 abdominal findings (:data:`MERLIN_FINDINGS`);
* CT-RATE's 18 chest findings (:data:`CT_RATE_FINDINGS`).

Where the lists name the same thing one key is used (``pleural_effusion``,
``cardiomegaly``, ``hepatic_steatosis``, ``lymphadenopathy``, ``atelectasis``,
``hiatal_hernia``; CT-RATE's "coronary artery wall calcification" is Merlin's
``coronary_calcification``). :func:`resolve_findings` accepts these plain-English
names too. Merlin's generic ``fracture`` is separate from the synthetic
``vertebral_compression_fracture``: a compression fracture is a fracture (both are
labelled), "No acute fracture." denies ``fracture`` only.

How a report is read
--------------------
1. Lines are split into sections by headers (``"LIVER:"``, ``"IMPRESSION:"``, one to
   five words and a colon at the start of a line; the header text is kept as a
   sentence of its own, so "Small pleural effusion: unchanged." still counts). Sections that describe the request
   rather than the patient's images (INDICATION, HISTORY, TECHNIQUE, COMPARISON,
   EXAMINATION, ...; :data:`SKIPPED_SECTIONS`) are ignored. In an organ section, a
   sentence that begins with a bare adjective ("SPLEEN: Enlarged, 16 cm.",
   "LIVER: Normal.") gets the organ as its subject ("the spleen is enlarged ...").
2. Text is cut into sentences at ``.`` (not a decimal point), ``!``, ``?`` and newlines,
   and sentences into clauses at ``;`` and contrastive words ("but", "however",
   "although", "except", "which", ", there is" ...). Negation and hedging never reach
   across a clause boundary: "No ascites. Splenomegaly." and "No ascites, but
   splenomegaly." deny only ascites.
3. Every finding has *mention* patterns (synonyms and free phrasing, e.g. "fatty
   infiltration of the liver", "the spleen is enlarged", plain words such as "the spleen
   is big" or "large liver" (but not "large liver lesion"), "aneurysmal dilatation of the
   infrarenal aorta", "the aorta is aneurysmal" (an aorta without a thoracic qualifier
   is read as the abdominal aorta)) and *normal* patterns: statements that clearly deny it without a
   negation word ("The liver is normal in size" denies hepatomegaly, "Normal heart
   size" denies cardiomegaly, "Subcentimeter lymph nodes" denies lymphadenopathy).
   A normal statement is negative.
4. A mention is classified by its clause context:

   * a *post-hedge* after it in the clause ("... cannot be excluded", "... is
     suspected", or "versus" within two words) makes it uncertain;
   * otherwise the *nearest* negation or hedge cue before it in the clause decides:
     negation ("no", "not", "without", "negative for", "free of", "no evidence of",
     "absence of", "resolved", "neither"/"nor") -> negative; hedge ("possible",
     "probable", "likely", "questionable", "suspicious for", "may represent",
     "cannot exclude", "versus", ...) -> uncertain. So "no ascites or pleural
     effusion" denies both, "possible ascites without pleural effusion" hedges
     ascites and denies the effusion;
   * otherwise a *post-negation* shortly after it ("... is not seen", "... has
     resolved", "... is absent", "... not present"), or a telegraphic denial right
     next to it ("Gallstones absent.", "Effusions absent bilaterally.", "Ascites: none.",
     where a section body that only denies is read with its header) -> negative;
   * otherwise positive.

   Pseudo-negations ("no change in", "no interval change", "not only") do not negate.
   Words that describe degree or nature rather than presence ("borderline",
   "approximately", "indeterminate", "nonspecific", "likely simple" *after* the
   finding) are not hedges.
5. Precedence when a report speaks of a finding more than once (across sentences or
   within one): **positive > uncertain > negative**. A finding affirmed anywhere is
   positive even if another sentence denies it (e.g. "No renal calculi." in FINDINGS
   and "Left nephrolithiasis." in an addendum): generated and reference reports are
   compared on what they assert.

All patterns are compiled once at import; a report of ~2 kB is labelled in well under a
millisecond (thousands of reports per second on one core).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

from volumevlm.errors import VolumeVLMError
from volumevlm.text.findings import FINDING_SETS

POSITIVE, NEGATIVE, UNCERTAIN = "positive", "negative", "uncertain"
_RANK = {NEGATIVE: 0, UNCERTAIN: 1, POSITIVE: 2}

# The finding sets come from the one registry (volumevlm.text.findings). The labeler reads
# CT-RATE's "coronary artery wall calcification" as Merlin's coronary_calcification: one
# concept, one labeler key (the alias below maps the CT-RATE spelling to it).
SYNTHETIC_FINDINGS: tuple[str, ...] = FINDING_SETS["synthetic"]
MERLIN_FINDINGS: tuple[str, ...] = FINDING_SETS["merlin30"]
_LABELER_KEYS = {"coronary_artery_wall_calcification": "coronary_calcification"}
CT_RATE_FINDINGS: tuple[str, ...] = tuple(_LABELER_KEYS.get(key, key) for key in FINDING_SETS["ctrate18"])

# Sections whose text is about the request, not about the images.
SKIPPED_SECTIONS: frozenset[str] = frozenset({
    "indication", "indications", "history", "clinical history", "clinical information", "clinical indication",
    "clinical data", "reason for exam", "reason for examination", "reason for study", "reason", "technique",
    "comparison", "comparisons", "examination", "exam", "procedure", "protocol", "dose", "radiation dose",
})

# ---------------------------------------------------------------------------------------------
# Pattern pieces. Every pattern runs on lower-cased text whose whitespace is collapsed to
# single spaces; clauses are joined with "\n", which no pattern crosses.

_ADV = (r"(?:(?:mildly|moderately|markedly|massively|severely|slightly|minimally|significantly|diffusely|borderline"
        r"|again|still|now|also|somewhat|grossly|overall|newly|visibly) ){0,2}")
_COP = r"(?:is|are|appears?|remains?|seems?)"
_W = r"[\w-]+ "  # one word and its trailing space
# Nouns naming an aspect of an organ ("normal hepatic *attenuation*"): a normal statement
# about one aspect says nothing about the others.
_ASPECTS = (r"size|span|caliber|calibre|diameter|attenuation|density|enhancement|contour|contours|morphology|"
            r"appearance|echotexture|volume|thickness|wall|walls|duct|ducts|length|signal|position|configuration")
_NORMAL_WORDS = r"normal(?![\w-])|unremarkable|within normal limits"


def _normal_patterns(subjects: str, aspects: str, extra_states: str = "", blocked_prefix: str = "") -> list[str]:
    """Normal statements about an organ that deny a finding concerning ``aspects`` of it.

    ``subjects``: alternation naming the organ ("liver|hepatic"); ``aspects``: the
    aspects the finding is about ("size|span"); ``extra_states``: further denying
    predicates ("not enlarged"). A statement about another aspect ("the liver is normal
    in attenuation") does not deny a size finding.
    """
    states = _NORMAL_WORDS + (f"|{extra_states}" if extra_states else "")
    tail = (rf"(?: in (?:(?:{_ASPECTS}) (?:and|or) )?(?:{aspects})(?![\w-])"
            rf"|(?! in (?:(?:{_ASPECTS})(?![\w-])|[\w-]+ (?:and|or) ))(?! and (?:{_ASPECTS})(?![\w-])))")
    return [
        # "the liver is (otherwise) normal (in size)", "heart size is within normal limits"
        rf"(?<![\w-])(?:{subjects})(?: (?:size|gland|parenchyma|silhouette|loops))? {_COP} "
        rf"(?:otherwise |overall |grossly |again |also |entirely )?(?:{states}){tail}",
        # "normal heart size", "unremarkable spleen", "normal-sized liver", "normal caliber aorta"
        rf"(?<![\w-])(?:normal(?:[- ]sized?)?|unremarkable|non-?enlarged)(?: (?:appearing|caliber|calibre))? "
        rf"(?:{subjects})(?:(?: (?:{_ASPECTS}) (?:and|or))? (?:{aspects})(?![\w-])|(?! (?:{_ASPECTS})(?![\w-])))",
        # "liver span is normal", "aortic caliber is within normal limits"
        # (the copula may be left out, as in telegraphic reports: "heart size normal")
        rf"(?<![\w-])(?:{subjects}) (?:{aspects})(?: {_COP})? (?:{_NORMAL_WORDS})",
    ]


_LIVER = r"liver|hepatic"
# Plain words for "enlarged" ("Spleen is big.", "Large liver."). Before the organ's name they
# only count when no lesion noun follows: "large liver lesion" is a lesion, not hepatomegaly.
_BIG = r"enlarged|large|big"
_NOT_BIG = r"not (?:enlarged|large|big)"
_NOT_A_LESION = (r"(?![\w-]| (?:lesions?|mass(?:es)?|cysts?|hypodensit|hyperdensit|metasta|tumou?rs?|neoplasms?|nodules?"
                 r"|hemangiomas?|abscess|infarcts?|lacerations?|lobes?|segments?|hilum|vein|artery|capsule))")
_SIZE = r"size|span|dimensions?|appearance"
_KIDNEY = r"kidneys?|renal"
_NOT_THORACIC = r"(?<!thoracic )(?<!ascending )(?<!descending )(?<!thoracoabdominal )"

# finding -> (mention patterns, normal-statement patterns)
_RULES: dict[str, tuple[list[str], list[str]]] = {
    # ---- synthetic cohort -----------------------------------------------------------------
    "hepatic_steatosis": (
        [r"steato(?:sis|tic)", r"fatty (?:infiltration|change|changes|deposition)(?! (?:of|in|within) the (?!liver))",
         r"fatty liver", r"nafld", r"nash(?![\w-])",
         r"(?:liver|hepatic parenchyma) (?:is|appears) diffusely (?:hypoattenuating|hypodense|low in attenuation)",
         r"diffusely hypoattenuating liver", r"hypoattenuating liver", r"low attenuation of the liver",
         r"(?:diffusely )?(?:decreased|low|reduced) (?:hepatic|liver) (?:attenuation|density)"],
        _normal_patterns(_LIVER, "attenuation|density|appearance|echotexture"),
    ),
    "hepatomegaly": (
        [r"hepatomegaly", r"hepatosplenomegaly", rf"(?:liver|hepatic size) {_COP} {_ADV}(?:{_BIG})",
         rf"enlarged (?:{_W}){{0,1}}liver{_NOT_A_LESION}", rf"(?:large|big) liver{_NOT_A_LESION}",
         r"enlargement of the liver", r"liver enlargement",
         r"(?:liver|hepatic) size is (?:mildly |moderately |markedly )?increased"],
        _normal_patterns(_LIVER, _SIZE, rf"{_NOT_BIG}|of normal size|normal-sized|normal sized"),
    ),
    "cirrhosis": (
        [r"cirrho\w+", r"nodular (?:hepatic |liver )?(?:contour|surface|margins?)",
         r"(?:hepatic|liver) (?:contour|surface|margin) (?:is|appears) nodular", r"shrunken nodular liver"],
        _normal_patterns(_LIVER, r"contour|contours|morphology|appearance", r"smooth")
        + [r"smooth (?:hepatic|liver) (?:contour|surface)"],
    ),
    "liver_lesion": (
        [r"(?:hepatic|liver) (?:lesions?|mass(?:es)?|hypodensit(?:y|ies)|hyperdensit(?:y|ies)|metastas[ie]s|cysts?"
         r"|tumou?rs?|neoplasms?|hemangiomas?|abscess(?:es)?)",
         r"(?:lesions?|mass(?:es)?|hypodensit(?:y|ies)|hyperdensit(?:y|ies)|metastas[ie]s|cysts?|hemangiomas?) "
         r"(?:in|within|of|involving) the (?:[\w-]+ ){0,3}?(?:liver|hepatic (?:lobes?|segments?|dome))(?![\w-])",
         # "lesion in segment 7 of the liver"
         r"(?:lesions?|mass(?:es)?|hypodensit(?:y|ies)|hyperdensit(?:y|ies)|metastas[ie]s|cysts?|hemangiomas?) "
         r"(?:in|within|involving) (?:hepatic segments? [\w/-]+|segments? [\w/-]+ of the liver)(?![\w-])",
         r"hepatocellular carcinoma", r"(?<![\w-])hcc(?![\w-])", r"hepatoma"],
        [],
    ),
    "splenomegaly": (
        [r"splenomegaly", r"hepatosplenomegaly", rf"(?:spleen|splenic size) {_COP} {_ADV}(?:{_BIG})",
         rf"enlarged (?:(?!accessory)[\w-]+ ){{0,1}}spleen{_NOT_A_LESION}", rf"(?:large|big) spleen{_NOT_A_LESION}",
         r"enlargement of the spleen", r"splenic enlargement"],
        _normal_patterns(r"spleen|splenic", _SIZE, rf"{_NOT_BIG}|of normal size|normal-sized|normal sized"),
    ),
    "gallstones": (
        [r"gallstones?", r"cholelith\w*", r"(?:calculus|calculi|stones?) (?:in|within) the gallbladder",
         r"gallbladder (?:calculus|calculi|stones?)",
         # "the gallbladder contains multiple stones"; a negation inside ("contains no stones") is not skipped over
         r"gallbladder (?:contains|containing|with|has) (?:(?!(?:no|not|without)(?![\w-]))[\w-]+ ){0,3}?(?:calculus|calculi|stones?)"],
        _normal_patterns(r"gallbladder", r"appearance|lumen"),
    ),
    "renal_cyst": (
        [r"(?:renal|kidney|parapelvic|peripelvic) cysts?", r"renal cystic (?:lesions?|masses?)",
         r"(?:cysts?|cystic lesions?) (?:in|of|within|arising from|arises from|arise from|from|involving) the "
         r"(?:[\w-]+ ){0,5}?kidneys?(?![\w-])", r"bosniak"],
        _normal_patterns(_KIDNEY, "appearance"),
    ),
    "kidney_stone": (
        [r"nephrolithiasis", r"urolithiasis", r"(?:renal|kidney) (?:calculus|calculi|stones?)",
         r"(?:non-?obstructing|obstructing) (?:[\w-]+ )?(?:renal |kidney )?(?:calculus|calculi|stones?)",
         r"(?:calculus|calculi|stones?) (?:at|in|within|of) the (?:[\w-]+ ){0,4}?"
         r"(?:renal pelvis|kidneys?|collecting system|(?:upper|lower|mid) pole|interpolar region)(?![\w-])"],
        _normal_patterns(_KIDNEY, "appearance"),
    ),
    "hydronephrosis": (
        [r"hydronephros[ie]s", r"hydroureteronephros[ie]s", r"pelv[io]caliectasis", r"pyelocaliectasis",
         r"caliectasis", r"pelviectasis", r"dilat\w+ (?:of )?(?:the )?(?:[\w-]+ ){0,2}?(?:renal )?collecting systems?",
         rf"collecting systems? {_COP} {_ADV}dilated", r"dilated (?:renal )?collecting systems?"],
        _normal_patterns(_KIDNEY, "appearance"),
    ),
    "abdominal_aortic_aneurysm": (
        [r"abdominal aortic aneurysm\w*", r"(?<![\w-])aaa(?![\w-])",
         r"aneurysmal (?:dilatation|dilation|enlargement) of the (?:(?!ascending|thoracic|descending|arch)[\w-]+ ){0,2}?aorta",
         r"(?:infrarenal|juxtarenal|suprarenal|pararenal) (?:abdominal )?aort(?:ic|a) aneurysm\w*",
         # "The aorta is aneurysmal.", "Aneurysmal abdominal aorta.": in these abdominal reports an aorta
         # without a thoracic qualifier is the abdominal aorta.
         rf"{_NOT_THORACIC}(?:(?:abdominal|infrarenal|juxtarenal|suprarenal) )*aorta {_COP} {_ADV}aneurysmal",
         r"aneurysmal (?:(?:abdominal|infrarenal|juxtarenal|suprarenal) )*aorta(?![\w-])",
         r"aneurysm of the (?:infrarenal |juxtarenal |suprarenal )?(?:abdominal |infrarenal )aorta"],
        _normal_patterns(r"(?:infrarenal )?(?:abdominal )?aorta|aortic",
                         r"caliber|calibre|diameter|size|appearance", r"not aneurysmal|not dilated|of normal caliber"),
    ),
    "atherosclerosis": (
        [r"atheroscleros[ie]s", r"atherosclerotic", r"atheromatous", r"atheromas?",
         r"calcified (?:atherosclerotic )?plaques?",
         r"(?:vascular|aortic|aortoiliac|arterial|iliac|aortoiliac arterial) calcifications?"],
        [],
    ),
    "ascites": (
        [r"ascit(?:es|ic)", r"free fluid",
         r"(?:intraperitoneal|peritoneal|perihepatic|perisplenic|pelvic) (?:free )?fluid(?! collections?)",
         r"fluid in the (?:pelvis|abdomen|cul-de-sac|paracolic gutters?|morison\w* pouch)"],
        [],
    ),
    "pleural_effusion": (
        [r"pleural (?:effusions?|fluid)", r"hydrothorax", r"hydropneumothorax",
         r"(?:left|right|bilateral)(?:-sided)? (?:(?!pericardial|joint)[\w-]+ ){0,2}?effusions?",
         r"effusions? (?:in|within) the (?:[\w-]+ )?pleural"],
        [rf"(?<![\w-])(?:lungs|lung bases|pleural spaces?) {_COP} (?:otherwise )?clear",
         r"clear (?:lungs|lung bases)"],
    ),
    "lymphadenopathy": (
        [r"(?:lymph)?adenopath(?:y|ies)", r"enlarged (?:(?!no(?![\w-]))[\w-]+ ){0,3}?(?:lymph )?nodes?(?![\w-])",
         rf"(?:lymph )?nodes? {_COP} {_ADV}enlarged", r"lymph node enlargement",
         r"(?:pathologic(?:al)?(?:ly)?|bulky) (?:enlarged )?(?:[\w-]+ ){0,2}?(?:lymph )?nodes?(?![\w-])"],
        [r"sub-?centimeter (?:[\w-]+ ){0,3}?(?:lymph )?nodes?(?![\w-])",
         r"non-?enlarged (?:[\w-]+ ){0,2}?(?:lymph )?nodes?(?![\w-])",
         r"normal[- ]sized? (?:[\w-]+ ){0,2}?(?:lymph )?nodes?(?![\w-])",
         rf"(?:lymph )?nodes? {_COP} (?:not (?:pathologically )?enlarged|normal in size|within normal limits|sub-?centimeter)"],
    ),
    "bowel_obstruction": (
        [r"(?:small |large )?bowel obstruction", r"(?<![\w-])sbo(?![\w-])", r"intestinal obstruction",
         r"colonic obstruction", r"mechanical obstruction", r"closed[- ]loop obstruction",
         r"obstructed (?:small |large )?bowel", rf"bowel {_COP} {_ADV}obstructed",
         r"dilated (?:[\w-]+ ){0,2}?(?:small |large )?bowel(?: loops)?", r"dilated loops of (?:small |large )?bowel",
         r"transition point"],
        _normal_patterns(r"(?:stomach and )?(?:small |large )?bowel(?: loops)?|stomach and (?:small |large )?bowel",
                         r"caliber|calibre|appearance", r"not dilated|non-?dilated|normal in caliber")
        + [r"non-?dilated (?:small |large )?bowel"],
    ),
    "vertebral_compression_fracture": (
        [r"compression (?:fractures?|deformit(?:y|ies))", r"wedge (?:compression )?(?:fractures?|deformit(?:y|ies))",
         r"(?:vertebral|vertebral body|spinal|spine) (?:body )?(?:compression )?fractures?",
         r"loss of (?:vertebral )?(?:body )?height", r"height loss", r"burst fractures?",
         r"fractures? of (?:the )?(?:[tl]\d{1,2}|(?:[\w-]+ )?vertebra\w*)(?![\w-])",
         r"(?<![\w-])[tl]\d{1,2} (?:vertebral )?(?:body )?fractures?"],
        [],
    ),
    "osteopenia": (
        [r"osteopeni\w*", r"osteoporo\w*", r"demineraliz\w+", r"demineralis\w+",
         r"(?:decreased|low|reduced|diminished|loss of) bone (?:mineral )?(?:density|mineralization)"],
        _normal_patterns(r"bones|osseous structures|bone", r"density|mineralization|appearance"),
    ),
    "cardiomegaly": (
        [r"cardiomegaly", rf"(?:heart|cardiac silhouette|heart size|cardiac size) {_COP} {_ADV}(?:{_BIG}|increased)",
         r"cardiac enlargement", rf"enlarged (?:{_W}){{0,1}}(?:heart|cardiac silhouette)", r"enlargement of the heart",
         r"(?:large|big) heart(?![\w-])"],
        _normal_patterns(r"heart|cardiac(?: silhouette)?", _SIZE, rf"{_NOT_BIG}|of normal size|normal-sized|normal sized"),
    ),
    # ---- Merlin (abdominal) ---------------------------------------------------------------
    "biliary_ductal_dilation": (
        [r"biliary (?:ductal |duct |tree |system )?(?:dilatation|dilation|ectasia)",
         r"(?:intrahepatic|extrahepatic|common bile|bile) ducts? (?:dilatation|dilation|ectasia)",
         r"dilat\w+ (?:of )?(?:the )?(?:intrahepatic |extrahepatic |common )*(?:bile ducts?|biliary (?:tree|ducts?|system))",
         r"dilated (?:intrahepatic |extrahepatic |common )*(?:bile ducts?|biliary (?:tree|ducts?|system))",
         rf"(?:biliary (?:tree|ducts?|system)|bile ducts?|common bile duct|cbd) {_COP} {_ADV}dilated",
         r"choledochectasia", r"(?<![\w-])cbd dilatation"],
        _normal_patterns(r"biliary (?:tree|ducts?|system)|bile ducts?|common bile duct|cbd",
                         r"caliber|calibre|diameter|appearance", r"not dilated|non-?dilated|of normal caliber"),
    ),
    "surgically_absent_gallbladder": (
        [r"(?:post-?)?cholecystectomy", r"(?:surgically )?absent gallbladder",
         r"gallbladder (?:is |has been )?(?:surgically )?(?:absent|removed|resected)"],
        [],
    ),
    "pancreatic_atrophy": (
        [r"pancrea\w* (?:parenchymal )?atrophy", r"atroph\w+ (?:of )?(?:the )?pancrea\w*",
         rf"pancreas {_COP} {_ADV}atrophic", r"atrophic pancrea\w*"],
        _normal_patterns(r"pancreas|pancreatic", r"size|volume|morphology|appearance|thickness"),
    ),
    "renal_hypodensity": (
        [r"(?:renal|kidney) (?:hypodensit(?:y|ies)|hypoattenuating lesions?|hypodense lesions?)",
         r"hypodense (?:renal|kidney) (?:lesions?|foci|focus)",
         r"(?:hypodensit(?:y|ies)|hypodense (?:lesions?|foci|focus)|hypoattenuating (?:lesions?|foci|focus)) "
         r"(?:in|of|within|involving) the (?:[\w-]+ ){0,4}?kidneys?(?![\w-])"],
        _normal_patterns(_KIDNEY, "appearance"),
    ),
    "prostatomegaly": (
        [r"prostatomegaly", rf"prostat(?:e|ic)(?: gland)? {_COP} {_ADV}enlarged", r"enlarged prostat\w*",
         r"prostatic (?:enlargement|hypertrophy|hyperplasia)", r"(?<![\w-])bph(?![\w-])"],
        _normal_patterns(r"prostate(?: gland)?|prostatic", _SIZE, r"not enlarged|of normal size"),
    ),
    "hiatal_hernia": ([r"hiatal hernia", r"hiatus hernia", r"paraesophageal hernia"], []),
    "submucosal_edema": (
        [r"submucosal (?:edema|oedema)", r"(?:bowel|intestinal|colonic) wall (?:edema|oedema)",
         r"edematous (?:bowel|colon|colonic|small bowel)", r"mural (?:edema|oedema)"],
        [],
    ),
    "appendicitis": (
        [r"appendicitis"],
        _normal_patterns(r"appendix", r"caliber|calibre|appearance|size", r"not dilated|not inflamed|not enlarged"),
    ),
    "free_air": (
        [r"free (?:intraperitoneal )?(?:air|gas)", r"pneumoperitoneum", r"extraluminal (?:free )?(?:air|gas)",
         r"intraperitoneal (?:free )?air"],
        [],
    ),
    "anasarca": ([r"anasarca", r"(?:generalized|diffuse) (?:subcutaneous )?(?:soft tissue )?(?:edema|oedema)"], []),
    "thrombosis": (
        [r"thrombos[ie]s", r"thrombus", r"thrombi(?![\w-])", r"thrombosed", r"occlusive clot"],
        [r"(?<![\w-])(?:veins?|vasculature|vessels|arteries|artery|portal vein|hepatic veins)(?: are| is| remain| remains) "
         r"(?:widely |all )?patent"],
    ),
    "coronary_calcification": (
        [r"coronary (?:artery |arterial )?(?:wall )?calcifi\w+",
         r"calcifi\w+ (?:of|in|within|along) the (?:[\w-]+ ){0,2}?coronar\w+",
         r"coronary (?:artery |arterial )?atherosclero\w+", r"calcified coronary (?:arteries|artery|plaques?)",
         r"coronary (?:artery )?(?:calcified )?plaques?"],
        [],
    ),
    "aortic_valve_calcification": (
        [r"aortic valv\w*(?: leaflets?)? calcifi\w+", r"calcifi\w+ (?:of|in|within) the aortic valv\w*",
         r"calcified aortic valv\w*"],
        [],
    ),
    "fracture": (
        [r"fractures?", r"fractured", r"compression deformit(?:y|ies)", r"wedge deformit(?:y|ies)"],
        [r"no acute (?:osseous|bony|bone) (?:abnormalit(?:y|ies)|findings?|injury|injuries)",
         rf"(?<![\w-])(?:bones|osseous structures) {_COP} (?:otherwise )?(?:intact|unremarkable)"],
    ),
    "metastatic_disease": ([r"metasta\w+", r"carcinomatosis"], []),
    "atelectasis": ([r"atelecta\w+", r"fibroatelecta\w+", r"lobar collapse", r"collapse of the (?:[\w-]+ ){0,3}?lobe"], []),
    # ---- CT-RATE (chest) --------------------------------------------------------------------
    "medical_material": (
        [r"medical material", r"(?:surgical |vascular |embolization )?clips?(?![\w-])", r"stents?(?![\w-])",
         r"pacemakers?", r"pacer", r"catheters?", r"(?:endotracheal|nasogastric|chest|feeding|tracheostomy) tubes?",
         r"port-?a-?cath", r"(?:sternotomy|sternal|surgical|cerclage) wires?", r"prosthe\w+", r"(?<![\w-])implants?(?![\w-])",
         r"(?:icd|pacemaker) leads?", r"central (?:venous )?(?:line|catheter)", r"(?<![\w-])picc(?![\w-])",
         r"embolization coils?", r"ivc filter", r"surgical hardware", r"(?:fixation|orthopedic) hardware",
         r"pedicle screws?", r"(?<![\w-])drains?(?![\w-])(?! into)"],
        [],
    ),
    "arterial_wall_calcification": (
        [r"(?:arterial|vascular|aortic|vessel|aortic wall|arterial wall|aortoiliac) (?:wall )?calcifications?",
         r"calcifi\w+ (?:of|in|within|along) the (?:(?!coronar)[\w-]+ ){0,3}?"
         r"(?:aorta|arteries|artery|vessels?|aortic (?:wall|arch))(?![\w-])",
         r"atherosclerotic calcifications?", r"calcified (?:atherosclerotic )?plaques?", r"(?:mural|intimal) calcifi\w+"],
        [],
    ),
    "pericardial_effusion": (
        [r"pericardial (?:effusions?|fluid)", r"hemopericardium", r"fluid in the pericardi\w+"], [],
    ),
    "emphysema": (
        [r"(?<!subcutaneous )(?<!mediastinal )(?<!interstitial )emphysema\w*", r"emphysematous", r"bullae",
         r"bullous (?:disease|changes?|emphysema)"],
        [],
    ),
    "lung_nodule": (
        [r"(?:pulmonary|lung|subpleural|perifissural|parenchymal) (?:[\w-]+ )?nodules?",
         r"(?:ground[- ]glass|part[- ]solid|solid) (?:pulmonary )?nodules?",
         r"nodules? (?:in|within) the (?:[\w-]+ ){0,3}?(?:lungs?|lobes?)(?![\w-])",
         r"(?:upper|lower|middle) lobe (?:[\w-]+ ){0,2}?nodules?"],
        [],
    ),
    "lung_opacity": (
        [r"opacit(?:y|ies)", r"ground[- ]glass(?! nodules?)", r"air-?space (?:disease|opacit\w+)", r"infiltrates?(?![\w-])"],
        [rf"(?<![\w-])(?:lungs|lung bases|lung fields) {_COP} (?:otherwise )?clear", r"clear (?:lungs|lung bases)"],
    ),
    "pulmonary_fibrotic_sequela": (
        [r"fibrotic (?:changes?|sequela\w*|bands?|strands?|scarring|stripes?)", r"fibrous (?:bands?|strands?)",
         r"(?:pulmonary|lung|interstitial) fibrosis", r"fibrosis (?:in|of) the (?:[\w-]+ ){0,2}?(?:lungs?|lobes?|bases)",
         r"(?:apical|pleuroparenchymal|parenchymal|subpleural|basilar|bibasilar|pulmonary) (?:fibrosis|scarring|scars?)(?![\w-])",
         r"fibroatelecta\w+", r"honeycomb\w*", r"reticulation", r"reticular (?:opacit\w+|changes?|pattern)",
         r"traction bronchiectasis"],
        [],
    ),
    "mosaic_attenuation_pattern": ([r"mosaic (?:attenuation|perfusion|pattern|oligemia)"], []),
    "peribronchial_thickening": (
        [r"peribronchial (?:wall )?(?:thickening|cuffing)", r"bronchial wall thickening", r"bronchial thickening",
         r"thickened bronchial walls?"],
        [],
    ),
    "consolidation": (
        [r"consolidat\w+"],
        [rf"(?<![\w-])(?:lungs|lung bases|lung fields) {_COP} (?:otherwise )?clear", r"clear (?:lungs|lung bases)"],
    ),
    "bronchiectasis": ([r"bronchiectas\w+", r"bronchiolectasis"], []),
    "interlobular_septal_thickening": (
        [r"(?:interlobular )?septal thickening", r"thickening of the (?:interlobular )?septa",
         r"thickened (?:interlobular )?septa\w*", r"septal lines", r"kerley b", r"crazy[- ]paving"],
        [],
    ),
}

KNOWN_FINDINGS: tuple[str, ...] = tuple(dict.fromkeys(SYNTHETIC_FINDINGS + MERLIN_FINDINGS + CT_RATE_FINDINGS))

# Plain-English names of the source lists that differ from "key with spaces".
_NAME_ALIASES: dict[str, str] = {
    "coronary artery wall calcification": "coronary_calcification",
    "biliary ductal dilatation": "biliary_ductal_dilation",
    "gallbladder absent": "surgically_absent_gallbladder",
    "cholecystectomy": "surgically_absent_gallbladder",
    "nephrolithiasis": "kidney_stone",
    "renal stone": "kidney_stone",
    "renal calculus": "kidney_stone",
    "fatty liver": "hepatic_steatosis",
    "aaa": "abdominal_aortic_aneurysm",
    "pulmonary fibrotic sequelae": "pulmonary_fibrotic_sequela",
    "mosaic attenuation": "mosaic_attenuation_pattern",
    "lung nodules": "lung_nodule",
    "compression fracture": "vertebral_compression_fracture",
}


def _key_of(name: str) -> str:
    return "_".join(re.sub(r"[^a-z0-9]+", " ", name.lower()).split())


_ALIASES: dict[str, str] = {_key_of(k): k for k in KNOWN_FINDINGS}
_ALIASES.update({_key_of(name): key for name, key in _NAME_ALIASES.items()})


def resolve_findings(findings: Iterable[str] | None) -> tuple[str, ...]:
    """Canonical keys of ``findings`` (keys or plain-English names, any case); all known if None.

    Raises :class:`VolumeVLMError` naming the first unknown finding.
    """
    if findings is None:
        return KNOWN_FINDINGS
    if isinstance(findings, str):
        findings = [findings]
    out = []
    for name in findings:
        if not isinstance(name, str):
            raise VolumeVLMError(f"findings: expected finding names (str), got {type(name).__name__} {name!r}")
        key = _ALIASES.get(_key_of(name))
        if key is None:
            raise VolumeVLMError(f"findings: unknown finding {name!r}; known findings are listed in "
                                 "volumevlm.text.labeler.KNOWN_FINDINGS")
        out.append(key)
    return tuple(dict.fromkeys(out))


def scored_findings(findings: Sequence[str]) -> list[str] | None:
    """The labeler keys of those ``findings`` it knows, in order (the columns of a report's
    clinical F1); names it does not know are left out; None when it knows none of them
    (then every finding it knows is scored)."""
    known = set(KNOWN_FINDINGS)
    keys = []
    for name in findings:
        try:
            key = resolve_findings([name])[0]
        except VolumeVLMError:
            continue
        if key in known:
            keys.append(key)
    return keys or None


# ---------------------------------------------------------------------------------------------
# Compiled once at import.

assert set(_RULES) == set(KNOWN_FINDINGS), sorted(set(_RULES) ^ set(KNOWN_FINDINGS))


def _compile(patterns: list[str]) -> re.Pattern | None:
    if not patterns:
        return None
    # Mentions start at a word start: "non-enlarged nodes" is not "enlarged nodes".
    return re.compile(r"(?<![\w-])(?:" + "|".join(f"(?:{p})" for p in patterns) + ")")


_MENTION: dict[str, re.Pattern] = {k: _compile(m) for k, (m, _) in _RULES.items()}
_NORMAL: dict[str, re.Pattern | None] = {k: _compile(n) for k, (_, n) in _RULES.items()}

# Cues before a mention; the nearest one (largest end) in the clause decides. Hedges are
# listed first so "can not exclude" is a hedge, not the negation "not".
_PRE_HEDGE = (
    r"possibl[ey]|probabl[ey]|likely|unlikely|questionabl[ey]|question of|suspicious (?:for|of)|suspected|"
    r"suspect|suspicion (?:for|of)|concerning (?:for|of)|concern for|worrisome for|may (?:represent|reflect|be|indicate)|"
    r"might (?:represent|reflect|be)|could (?:represent|reflect|be)|can ?not (?:exclude|rule out|be excluded)|"
    r"can't (?:exclude|rule out)|cannot exclude|cannot rule out|not (?:excluded|ruled out)|rule out|equivocal|presumed|"
    r"presumably|differential (?:diagnosis )?(?:includes?|considerations?)|suggestive of|suggest(?:s|ing)?|versus|vs"
)
_PRE_NEG = (
    r"no|not|without|negative for|free of|absence of|resolved|resolution of|neither|nor|never|"
    r"no evidence of|no sign of|no signs of|rather than|instead of|clear of"
)
_PRE = re.compile(rf"(?<![\w-])(?:(?P<hedge>{_PRE_HEDGE})|(?P<neg>{_PRE_NEG}))(?![\w-])")
# Phrases that contain a negation word but do not negate what follows.
_PSEUDO_NEG = re.compile(
    r"(?<![\w-])(?:no (?:significant |substantial |appreciable |definite |interval |marked )?(?:change|increase|decrease|"
    r"difference|progression)|not (?:only|significantly (?:changed|different))|without (?:significant |interval )?change|"
    r"no longer (?:requires?|needs?)|not (?:been )?changed)(?![\w-])"
)
# After a mention, anywhere in its clause.
_POST_HEDGE = re.compile(
    r"(?<![\w-])(?:can ?not|could not|can't) be (?:entirely |completely )?(?:excluded|ruled out)|"
    r"(?:is|are) not (?:entirely |completely )?(?:excluded|ruled out)|not (?:excluded|ruled out)|"
    r"(?:is|are) (?:possible|suspected|questioned|questionable|likely|probable|favou?red|uncertain|equivocal|"
    r"not certain|considered)|may be present|(?:would be|is) difficult to exclude"
)
_VERSUS_NEAR = re.compile(r"^(?:,? [\w-]+){0,2},? (?:versus|vs)(?![\w-])")
# Shortly after a mention (within ~70 characters of its clause).
_POST_NEG = re.compile(
    r"(?<![\w-])(?:(?:is|are|was|were) (?:not (?:seen|identified|present|visualized|visible|demonstrated|evident|"
    r"appreciated|detected|noted|depicted|found)|absent|no longer (?:seen|present|visualized|visible|identified|evident|noted))"
    r"|(?:has|have) (?:since |now |completely |interval(?:ly)? )?resolved|(?:is|are) resolved"
    r"|(?:has|have) been (?:excluded|ruled out)"
    r"|not (?:seen|identified|visualized|demonstrated|detected|appreciated|present|found|evident|visible))(?![\w-])"
)
_POST_NEG_REACH = 70
# A telegraphic denial right after the mention, without a copula: "Gallstones absent.",
# "Pleural effusions absent bilaterally.", "Ascites: none." (read as "ascites none").
# Only adjacent: "Splenomegaly with absent flow in the splenic vein" affirms splenomegaly;
# "none"/"negative"/"no" only end the clause: "Renal cysts, none of which enhance" and
# "Splenomegaly, negative for focal lesion" affirm.
_POST_NEG_NEAR = re.compile(r"^(?: (?:(?:now|currently|entirely|completely) )?absent(?![\w-])"
                            r"|,? (?:(?:(?:now|currently|entirely|completely) )?absent|none|negative|no)(?=$|,| bilaterally$))")
# A section body that is nothing but a denial ("Gallstones: absent.", "Ascites: none."): the header
# names the finding, so the two are read as one sentence.
_DENIAL_BODY = re.compile(
    r"^\s*(?:absent|none|negative|no|not (?:seen|identified|present|visualized|demonstrated|detected|found))"
    r"(?: bilaterally)?[\s.]*$")

# Sentence ends: '.' not followed by a digit ("4.2 cm" stays whole; "L1. Diffuse" splits), !, ?.
_SENTENCE_END = re.compile(r"\.(?!\d)|[!?]")
# Every alternative starts with a literal character, so the regex engine skips fast.
_CLAUSE_BREAK = re.compile(
    r";| (?:but|however|although|though|whereas|except|apart from|aside from|which|while)(?![\w-])"
    r"|,? (?:and )?there (?:is|are|was|were)(?![\w-])|,? and (?:the|this|these)(?= [\w-]+ (?:is|are|was|were)(?![\w-]))"
)
# (needle for a cheap `in` test, pattern, replacement); the text is lower-cased first.
_ABBREVIATIONS = (
    ("vs.", re.compile(r"(?<![\w-])vs\."), "versus"),
    (".g.", re.compile(r"(?<![\w-])e\.g\."), ""),
    (".e.", re.compile(r"(?<![\w-])i\.e\."), ""),
    ("approx.", re.compile(r"(?<![\w-])approx\."), "approximately"),
    ("s/p", re.compile(r"(?<![\w-])s/p(?![\w-])"), "status post"),
    ("w/o", re.compile(r"(?<![\w-])w/o(?![\w-])"), "without"),
    ("r/o", re.compile(r"(?<![\w-])r/o(?![\w-])"), "rule out"),
    ("w/", re.compile(r"(?<![\w-])w/(?=\s)"), "with "),
)
_HEADER = re.compile(r"^\s*([a-z][a-z/&,()' -]{0,48}?)\s*:\s*")
_LIST_MARK = re.compile(r"^\s*(?:\d{1,2}[.)]|[-*\u2022])\s+")

# Organ named by a section header, for "SPLEEN: Enlarged." -> "the spleen is enlarged."
_SECTION_ORGANS: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(p), organ) for p, organ in (
        (r"liver|hepat", "liver"), (r"spleen|splenic", "spleen"), (r"heart|cardiac|pericard", "heart"),
        (r"kidney|renal", "kidneys"), (r"gallbladder", "gallbladder"), (r"appendix", "appendix"),
        (r"pancrea", "pancreas"), (r"aorta|vascul|vessel", "aorta"), (r"bowel|gastrointestinal|gi tract|intestin", "bowel"),
        (r"lymph|nodes", "lymph nodes"), (r"bone|musculoskeletal|osseous|spine|skelet", "bones"),
        (r"prostate", "prostate"), (r"lung|thorax|chest|pleura", "lungs"),
    )
)
_BARE_ADJECTIVE = re.compile(
    r"(?:normal(?![\w-])|unremarkable|within normal limits|(?:not |mildly |moderately |markedly |massively )?(?:enlarged|large|big)|"
    r"atrophic|cirrhotic|nodular|aneurysmal|(?:not )?dilated|patent|clear|intact|normal in (?:size|caliber|appearance))"
    r"(?=$|[,:]| (?:in|with|without|measuring|at|to|and|for|by|but)(?![\w-]))"
)


_ORGAN_CACHE: dict[str, str | None] = {}


def _section_organ(header: str) -> str | None:
    organ = _ORGAN_CACHE.get(header, "")
    if organ == "":
        organ = next((o for pattern, o in _SECTION_ORGANS if pattern.search(header)), None)
        if len(_ORGAN_CACHE) < 4096:  # headers repeat across reports; bound the cache anyway
            _ORGAN_CACHE[header] = organ
    return organ


def _clauses(report: str) -> list[str]:
    """Lower-cased clauses of the report's image-describing text, whitespace collapsed."""
    text = report.lower()
    for needle, pattern, repl in _ABBREVIATIONS:
        if needle in text:
            text = pattern.sub(repl, text)
    out: list[str] = []
    skip, organ = False, None
    for line in text.splitlines():
        m = _HEADER.match(line) if ":" in line else None
        if m and len(m.group(1).split()) <= 5:
            header = " ".join(m.group(1).split())
            skip = header in SKIPPED_SECTIONS
            organ = _section_organ(header)
            # The header stays as a clause of its own: a mixed-case "header" may be
            # a finding ("Small pleural effusion: unchanged."); a body that only denies
            # ("Gallstones: absent.") is about the header, so it joins it.
            body = line[m.end():]
            line = f"{header} {body}" if _DENIAL_BODY.match(body) else f"{header}. {body}"
        if skip:
            continue
        line = _LIST_MARK.sub("", line)
        for sentence in _SENTENCE_END.split(line):
            sentence = " ".join(sentence.split())
            if not sentence:
                continue
            if organ is not None and _BARE_ADJECTIVE.match(sentence):
                sentence = f"the {organ} is {sentence}"
            for clause in _CLAUSE_BREAK.split(sentence):
                clause = clause.strip(" ,:")
                if clause:
                    out.append(clause)
    return out


def _mask(match: re.Match) -> str:
    return "~" * len(match.group(0))


# --- prefilter ---------------------------------------------------------------------------------
# Scanning a whole report with ~50 alternations that start with a look-behind costs
# milliseconds. Each compiled pattern instead gets "stems": literal strings one of which
# every match must contain, derived from the parsed pattern (so they cannot drift from
# it). Only clauses containing a stem are searched. Where no stem of >= 3 characters
# can be proven (or the parser is unavailable) the pattern runs on every clause.

try:  # the stdlib regex parser: private, so any failure just disables the prefilter
    from re import _constants as _sre_c  # type: ignore[attr-defined]
    from re import _parser as _sre_p
except ImportError:  # pragma: no cover - Python 3.10
    try:
        import sre_constants as _sre_c  # type: ignore[no-redef]
        import sre_parse as _sre_p  # type: ignore[no-redef]
    except ImportError:
        _sre_c = _sre_p = None


def _required(items) -> set[str] | None:
    """Strings one of which any match of the parsed sequence ``items`` contains (None: unknown)."""
    candidates: list[set[str]] = []
    run: list[str] = []

    def flush():
        if run:
            candidates.append({"".join(run)})
            run.clear()

    for op, av in items:
        if op is _sre_c.LITERAL:
            run.append(chr(av))
            continue
        flush()
        sub = None
        if op is _sre_c.SUBPATTERN:
            sub = _required(av[-1])
        elif op is _sre_c.BRANCH:
            alts = [_required(alt) for alt in av[1]]
            if alts and all(a for a in alts):
                sub = set().union(*alts)
        elif op in (_sre_c.MAX_REPEAT, _sre_c.MIN_REPEAT) or op is getattr(_sre_c, "POSSESSIVE_REPEAT", None):
            if av[0] >= 1:
                sub = _required(av[2])
        if sub:
            candidates.append(sub)
    flush()
    if not candidates:
        return None
    return max(candidates, key=lambda c: (min(map(len, c)), -len(c)))


def _stems(pattern: re.Pattern | None) -> tuple[str, ...] | None:
    if pattern is None or _sre_p is None:
        return None
    try:
        found = _required(_sre_p.parse(pattern.pattern))
    except Exception:  # pragma: no cover - parser internals changed
        return None
    if not found or min(map(len, found)) < 3:
        return None
    # A stem containing another stem adds nothing: the shorter one is present whenever it is.
    return tuple(sorted(s for s in found if not any(t != s and t in s for t in found)))


_WORD = re.compile(r"[a-z0-9]+")


def _anchors(stems: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """The longest letter/digit run of each stem: a word of the text contains it whenever the stem occurs."""
    if stems is None:
        return None
    out = []
    for stem in stems:
        runs = _WORD.findall(stem)
        best = max(runs, key=len) if runs else ""
        if len(best) < 3:
            return None
        out.append(best)
    return tuple(dict.fromkeys(out))


_MENTION_ANCHORS = {k: _anchors(_stems(p)) for k, p in _MENTION.items()}
_NORMAL_ANCHORS = {k: _anchors(_stems(p)) for k, p in _NORMAL.items()}
_ALL_ANCHORS: tuple[str, ...] = tuple(sorted({a for d in (_MENTION_ANCHORS, _NORMAL_ANCHORS)
                                              for v in d.values() if v for a in v}))
# word of a report -> anchors it contains; reports share most of their vocabulary.
_WORD_ANCHORS: dict[str, tuple[str, ...]] = {}
_WORD_CACHE_LIMIT = 200_000


def _anchors_in(word: str) -> tuple[str, ...]:
    got = _WORD_ANCHORS.get(word)
    if got is None:
        got = tuple(a for a in _ALL_ANCHORS if a in word)
        if len(_WORD_ANCHORS) < _WORD_CACHE_LIMIT:
            _WORD_ANCHORS[word] = got
    return got


class _Report:
    """One report's clauses, with the per-clause lookups that classification needs."""

    def __init__(self, clauses: list[str]):
        self.clauses = clauses
        self._cues: dict[int, list[re.Match]] = {}
        # anchor -> clauses whose words contain it (a superset of the clauses a pattern can match)
        words: dict[str, set[int]] = {}
        for ci, clause in enumerate(clauses):
            for word in _WORD.findall(clause):
                words.setdefault(word, set()).add(ci)
        self._anchor_clauses: dict[str, set[int]] = {}
        for word, ids in words.items():
            for anchor in _anchors_in(word):
                self._anchor_clauses.setdefault(anchor, set()).update(ids)

    def clause_ids(self, anchors: tuple[str, ...] | None) -> Iterable[int]:
        """Indices of the clauses that may match a pattern with these anchors (all if None), ascending."""
        if anchors is None:
            return range(len(self.clauses))
        found: set[int] = set()
        for anchor in anchors:
            ids = self._anchor_clauses.get(anchor)
            if ids:
                found |= ids
        return sorted(found)

    def cues(self, ci: int) -> list[re.Match]:
        """Negation/hedge cues of clause ``ci`` (pseudo-negations masked), in order."""
        got = self._cues.get(ci)
        if got is None:
            masked = _PSEUDO_NEG.sub(_mask, self.clauses[ci])
            got = self._cues[ci] = list(_PRE.finditer(masked))
        return got

    def classify(self, ci: int, s: int, e: int) -> str:
        """Status of the mention at [s, e) of clause ``ci`` (rules in the module doc)."""
        clause = self.clauses[ci]
        suffix = clause[e:]
        if _POST_HEDGE.search(suffix) or _VERSUS_NEAR.match(suffix):
            return UNCERTAIN
        nearest = None
        for cue in self.cues(ci):
            if cue.end() > s:
                break
            nearest = cue
        if nearest is not None:
            return UNCERTAIN if nearest.lastgroup == "hedge" else NEGATIVE
        if (_POST_NEG.search(suffix, 0, _POST_NEG_REACH) or _POST_NEG_NEAR.match(suffix)) and not _PSEUDO_NEG.match(suffix):
            return NEGATIVE
        return POSITIVE

    def status(self, key: str) -> str | None:
        best = -1
        mention = _MENTION[key]
        for ci in self.clause_ids(_MENTION_ANCHORS[key]):
            for m in mention.finditer(self.clauses[ci]):
                rank = _RANK[self.classify(ci, m.start(), m.end())]
                if rank > best:
                    best = rank
                    if best == _RANK[POSITIVE]:
                        return POSITIVE
        if best < 0:
            normal = _NORMAL[key]
            if normal is not None and any(normal.search(self.clauses[ci]) for ci in self.clause_ids(_NORMAL_ANCHORS[key])):
                best = _RANK[NEGATIVE]
        return None if best < 0 else (NEGATIVE, UNCERTAIN, POSITIVE)[best]


def label_findings(report: str, findings: Sequence[str] | None = None) -> dict[str, str]:
    """Label the findings a report mentions.

    Args:
        report: free-text radiology report (any length; sections optional).
        findings: finding keys or names to look for (see :func:`resolve_findings`);
            None means all of :data:`KNOWN_FINDINGS`.

    Returns:
        ``{finding_key: "positive" | "negative" | "uncertain"}`` for the requested findings
        the text mentions, in the order of the requested findings; unmentioned findings are
        absent. Over several mentions positive > uncertain > negative (see module doc).
    """
    if not isinstance(report, str):
        raise VolumeVLMError(f"label_findings: expected report text (str), got {type(report).__name__}")
    keys = resolve_findings(findings)
    clauses = _clauses(report)
    if not clauses:
        return {}
    rep = _Report(clauses)
    out: dict[str, str] = {}
    for key in keys:
        status = rep.status(key)
        if status is not None:
            out[key] = status
    return out


def report_sentences(report: str) -> list[tuple[str, str]]:
    """The sentences of a report's image-describing sections, as written: a list of
    (sentence, context), where context prefixes the sentence with its section header so
    that :func:`label_findings` reads it as it reads the report ("SPLEEN: Enlarged.").
    Sections the labeler skips (indication, technique, ...) are left out."""
    if not isinstance(report, str):
        raise VolumeVLMError(f"report_sentences: expected report text (str), got {type(report).__name__}")
    out: list[tuple[str, str]] = []
    header, skip = "", False
    for line in report.splitlines():
        m = _HEADER.match(line.lower()) if ":" in line else None
        if m and len(m.group(1).split()) <= 5:
            header = " ".join(m.group(1).split())
            skip = header in SKIPPED_SECTIONS
            line = line[m.end():]
        if skip:
            continue
        line = _LIST_MARK.sub("", line)
        for piece in _SENTENCE_END.split(line):
            sentence = " ".join(piece.split()).strip(" ,:")
            if sentence:
                out.append((f"{sentence}.", f"{header}: {sentence}." if header else f"{sentence}."))
    return out


def label_reports(reports: Iterable[str], findings: Sequence[str] | None = None) -> list[dict[str, str]]:
    """:func:`label_findings` of every report, in order (a list of dicts)."""
    if isinstance(reports, str):
        raise VolumeVLMError("label_reports: expected a list of report texts, got one str")
    keys = resolve_findings(findings)
    return [label_findings(r, keys) for r in reports]


def findings_matrix(labels: Sequence[dict], findings: Sequence[str] | None = None, uncertain_as: int = 1) -> np.ndarray:
    """Binary case x finding matrix from labeler output.

    Args:
        labels: one ``{finding: status}`` dict per case (from :func:`label_reports`).
        findings: columns, keys or names (None: :data:`KNOWN_FINDINGS`).
        uncertain_as: value for "uncertain": 1 (default: a hedged finding counts as
            present, the usual choice for report-generation metrics, which then reward a
            generator that hedges on a true finding), 0 (hedges count as absent) or -1
            (kept apart, CheXpert style).

    Returns:
        int8 array of shape (len(labels), len(findings)): 1 positive, 0 negative or not
        mentioned, ``uncertain_as`` for uncertain.
    """
    if uncertain_as not in (-1, 0, 1):
        raise VolumeVLMError(f"findings_matrix: uncertain_as must be -1, 0 or 1, got {uncertain_as!r}")
    keys = resolve_findings(findings)
    value = {POSITIVE: 1, NEGATIVE: 0, UNCERTAIN: int(uncertain_as)}
    out = np.zeros((len(labels), len(keys)), dtype=np.int8)
    for i, row in enumerate(labels):
        if not isinstance(row, dict):
            raise VolumeVLMError(f"findings_matrix: labels[{i}] is {type(row).__name__}, expected a dict from label_findings")
        for j, key in enumerate(keys):
            status = row.get(key)
            if status is None:
                continue
            if status not in value:
                raise VolumeVLMError(f"findings_matrix: labels[{i}][{key!r}] = {status!r}, expected positive/negative/uncertain")
            out[i, j] = value[status]
    return out


__all__ = [
    "CT_RATE_FINDINGS",
    "KNOWN_FINDINGS",
    "MERLIN_FINDINGS",
    "SKIPPED_SECTIONS",
    "SYNTHETIC_FINDINGS",
    "findings_matrix",
    "label_findings",
    "label_reports",
    "report_sentences",
    "resolve_findings",
    "scored_findings",
]
