"""Fitting the anatomy head (:class:`volumevlm.models.anatomy.AnatomyHead`).

For each organ-system section of the training reports, a ridge regression (scikit-learn's
``RidgeCV``, its strength chosen by efficient leave-one-out on the training cases) from
the case's organ features (token means, size and HU histogram per organ of the model's own
segmentation) to the frozen text tower's embedding of that section. No
finding label is used to fit it: the images are matched to their own report text, one
organ system at a time (the anatomy-level alignment of fVLM, as a closed-form fit on the
frozen towers). The labeler only decides which section a finding is read in
(:func:`finding_sections_of`), as it decides for the report head's prompts.

Where the training cases carry EHR codes, the head also gets phenotype classifiers: per
code, the logistic probe of the yardsticks (:func:`volumevlm.models.probes.fit_logistic_probes`),
the standardisation folded into the weights (:func:`folded_linear`). Given a findings
classifier on the same organ features (the report head's, with its out-of-fold
probabilities on the training cases), the codes are fitted on those probabilities and
read through it; else on the organ features themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from volumevlm.errors import VolumeVLMError

# Ridge strengths tried by leave-one-out (features standardized; ~900 of them for the
# tiny encoder's 14 organs x 64 channels, a few hundred cases).
ANATOMY_ALPHAS = (30.0, 100.0, 300.0, 1000.0, 3000.0)
# A section stated in fewer training reports than this is not fitted.
MIN_SECTION_CASES = 20
TEXT_BATCH = 256
# The fewest positive (and negative) training cases a code needs to get a classifier.
MIN_CODE_CASES = 5


def folded_linear(scaler, coef: np.ndarray, intercept) -> tuple[np.ndarray, np.ndarray]:
    """(weight, bias) of a linear model fitted on standardised features, acting on the raw
    ones: ``coef @ (x - mean) / scale + intercept == weight @ x + bias``. ``coef`` [O, D] or
    [D], ``scaler`` a fitted scikit-learn ``StandardScaler`` (a constant feature, scale 0,
    is left unscaled as scikit-learn does)."""
    coef = np.atleast_2d(np.asarray(coef, dtype=np.float64))
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    weight = coef / scale
    bias = np.asarray(intercept, dtype=np.float64).reshape(-1) - (weight * scaler.mean_).sum(axis=1)
    return weight, bias


def fit_phenotype_classifiers(x: np.ndarray, codes: np.ndarray, phecodes: Sequence[str],
                              seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, Any]]:
    """Per code with at least :data:`MIN_CODE_CASES` positive and negative training cases,
    the yardsticks' logistic probe (:func:`volumevlm.models.probes.fit_logistic_probes`) on
    the features x [N, D] against codes [N, V] (0/1). Returns (the codes fitted, weight
    [V', D], bias [V'] on the raw features, info per code: positives and the chosen C)."""
    from volumevlm.models.probes import fit_logistic_probes

    codes = np.asarray(codes, dtype=np.float64)
    if codes.ndim != 2 or codes.shape != (x.shape[0], len(phecodes)):
        raise VolumeVLMError(f"phenotype classifiers: codes {list(codes.shape)} for {x.shape[0]} cases and "
                             f"{len(phecodes)} phecodes")
    fitted, weights, biases, info = [], [], [], {}
    for code, column, probe in zip(phecodes, codes.T, fit_logistic_probes(x, codes, seed, MIN_CODE_CASES)):
        if probe is None:
            continue
        scaler, regression = probe[0], probe[-1]
        weight, bias = folded_linear(scaler, regression.coef_, regression.intercept_)
        fitted.append(str(code))
        weights.append(weight[0])
        biases.append(bias[0])
        info[str(code)] = {"positives": int((column > 0.5).sum()), "C": float(regression.C_[0])}
    if not fitted:
        return [], np.zeros((0, x.shape[1])), np.zeros(0), info
    return fitted, np.stack(weights), np.asarray(biases), info


def finding_sections_of(reports: Sequence[str], findings: Sequence[str], sections: Sequence[str]) -> dict[str, str]:
    """{finding: the section of ``sections`` that states it in most training reports}, read by
    the labeler from each section alone; a finding no section states is left out."""
    from volumevlm.text.labeler import findings_matrix, label_reports
    from volumevlm.text.sections import split_report

    findings = list(findings)
    parts = [split_report(r) for r in reports]
    counts = np.zeros((len(sections), len(findings)))
    for j, name in enumerate(sections):
        texts = [f"{name}: {p[name]}" for p in parts if p.get(name, "").strip()]
        if texts:
            counts[j] = (findings_matrix(label_reports(texts, findings), findings, uncertain_as=1) > 0).sum(axis=0)
    return {f: sections[int(counts[:, i].argmax())] for i, f in enumerate(findings) if counts[:, i].max() > 0}


@torch.no_grad()
def _section_embeddings(model, texts: list[str]) -> np.ndarray:
    # The tower in eval mode whatever the caller left it in: dropout would make the
    # regression's targets noise.
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        rows = [model.encode_text(texts[i:i + TEXT_BATCH]).float().cpu() for i in range(0, len(texts), TEXT_BATCH)]
    finally:
        if was_training:
            model.train(True)
    return torch.cat(rows).double().numpy()


def _findings_inputs(probe: dict[str, Any], x: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(finding names, out-of-fold probabilities [N, F]) of a findings classifier given to
    :func:`fit_anatomy_head`, checked against the organ features x [N, D]."""
    names = [str(f) for f in probe["findings"]]
    weight, bias = np.asarray(probe["weight"]), np.asarray(probe["bias"])
    oof = np.asarray(probe["out_of_fold"], dtype=np.float64)
    if weight.shape != (len(names), x.shape[1]) or bias.shape != (len(names),) or oof.shape != (x.shape[0], len(names)):
        raise VolumeVLMError(f"anatomy head: findings classifier weight {list(weight.shape)}, bias {list(bias.shape)}, "
                             f"out-of-fold {list(oof.shape)} for {len(names)} findings, {x.shape[0]} cases of "
                             f"{x.shape[1]} organ features")
    return names, oof


def fit_anatomy_head(model, organ_features: torch.Tensor, reports: Sequence[str], findings: Sequence[str],
                     organ_classes: int, sections: Sequence[str] | None = None,
                     phecodes: Sequence[str] | None = None, codes: Any = None, seed: int = 0,
                     organ_statistics: str | None = None,
                     findings_probe: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """(AnatomyHead, info) fitted on N training cases: organ_features float [N, K, F]
    (:func:`~volumevlm.models.anatomy.organ_features`), their reports, the findings to
    route (labeler keys), the segmentation head's class count. ``model``: the VolumeVLM
    whose (frozen) text tower embeds the sections. ``phecodes`` and ``codes`` [N, V] (0/1,
    the cases' EHR codes in that order): also fit the phenotype classifiers
    (:func:`fit_phenotype_classifiers`). ``findings_probe``: a findings classifier on the
    same (flattened) organ features, {"findings": F names, "weight" [F, K*F'], "bias" [F],
    "out_of_fold" [N, F] (its out-of-fold probabilities on these cases)}; the codes are then
    fitted on those probabilities and the head reads them through it (see
    :class:`~volumevlm.models.anatomy.AnatomyHead`). ``organ_statistics``: the histogram recipe the
    features were computed with (default: the current one), kept in the head. info: per section the chosen ridge strength and
    the cases it was fitted on, the finding -> section routing, per code fitted its
    positives and C (and ``phenotypes_through``: the findings they read, if any)."""
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    from volumevlm.models.anatomy import DEFAULT_ORGAN_STATISTICS, AnatomyHead, section_texts
    from volumevlm.text.sections import SECTIONS

    if organ_features.ndim != 3 or organ_features.shape[0] != len(reports):
        raise VolumeVLMError(f"anatomy head: organ features {list(organ_features.shape)} for {len(reports)} reports")
    x = organ_features.flatten(1).double().numpy()
    scaler = StandardScaler().fit(x)
    xs = scaler.transform(x)
    candidates = list(sections or SECTIONS)
    texts = [section_texts(r, candidates) for r in reports]
    fitted: list[tuple[str, np.ndarray, np.ndarray]] = []
    info: dict[str, Any] = {"sections": {}, "train_cases": len(reports)}
    for s, name in enumerate(candidates):
        rows = [i for i, t in enumerate(texts) if t[s] is not None]
        if len(rows) < MIN_SECTION_CASES:
            continue
        targets = _section_embeddings(model, [texts[i][s] for i in rows])
        ridge = RidgeCV(alphas=ANATOMY_ALPHAS).fit(xs[rows], targets)
        fitted.append((name, *folded_linear(scaler, ridge.coef_, ridge.intercept_)))
        info["sections"][name] = {"alpha": float(ridge.alpha_), "cases": len(rows)}
    if not fitted:
        raise VolumeVLMError(f"anatomy head: no report section is stated in {MIN_SECTION_CASES} or more training reports")
    names = [name for name, _, _ in fitted]
    routing = finding_sections_of(reports, findings, names)
    code_names: list[str] = []
    through: list[str] = []
    if phecodes is not None and codes is not None and len(phecodes):
        inputs = x
        if findings_probe is not None:
            through, inputs = _findings_inputs(findings_probe, x)
            info["phenotypes_through"] = through
        code_names, code_weight, code_bias, info["phenotypes"] = fit_phenotype_classifiers(inputs, codes, phecodes, seed)
        if not code_names:
            through = []
    head = AnatomyHead(names, routing, organ_classes, organ_features.shape[2], fitted[0][1].shape[0],
                       alpha={name: info["sections"][name]["alpha"] for name in names}, phecodes=code_names,
                       organ_statistics=organ_statistics or DEFAULT_ORGAN_STATISTICS, phenotype_findings=through)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(np.stack([w for _, w, _ in fitted])).float())
        head.bias.copy_(torch.from_numpy(np.stack([b for _, _, b in fitted])).float())
        if code_names:
            head.phenotype_weight.copy_(torch.from_numpy(code_weight).float())
            head.phenotype_bias.copy_(torch.from_numpy(code_bias).float())
        if through:
            head.findings_weight.copy_(torch.as_tensor(np.asarray(findings_probe["weight"])).float())
            head.findings_bias.copy_(torch.as_tensor(np.asarray(findings_probe["bias"])).float())
    info["finding_sections"] = routing
    return head.eval(), info
