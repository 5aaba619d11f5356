"""Report-generation training: ``train_report(cfg) -> (metrics, objects)``.

Starts from a pretrained checkpoint (``cfg.init_from``), keeps its image encoder frozen
(eval mode, no gradients) and trains a :class:`~volumevlm.models.report.ReportGenerator`
(visual resampler + causal LM decoder) on the reports of ``cfg.data.root``'s manifest
(train split; validation on the val split). Images go through the checkpoint's own
preprocessing (``model.preprocess``), never a re-typed one.

``report.precompute: true`` (the default) runs the frozen encoder once per case at the
start and keeps its tokens in memory, so training touches only the head: on a CPU this
is many times faster than encoding every batch. ``false`` encodes each batch (for
cohorts whose tokens do not fit in memory).

Everything goes under ``cfg.output_dir``: checkpoints/ (Lightning state, resumed on a
rerun), csv/ and tensorboard/ logs (train/loss, val/loss and, from the generated
validation reports (:mod:`volumevlm.metrics.report`), val/clinical_f1 (macro F1
over the checkpoint's findings), val/clinical_f1_micro, val/bleu4, val/rouge_l,
val/distinct_ratio), report_samples.jsonl (every validation case: reference and generated report),
metrics.json, and ``cfg.model_dir``: the SAME VolumeVLM with the report head attached.
Trained on a synthetic cohort, the generated text is NOT a clinical report.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from volumevlm import NOT_FOR_CLINICAL_USE
from volumevlm.errors import InputError, VolumeVLMError
from volumevlm.io.writers import write_text_atomic
from volumevlm.text.labeler import scored_findings
from volumevlm.train.module import OPTIMIZER_DEFAULTS, configure_adamw, total_optimizer_steps

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
SAMPLES_NAME = "report_samples.jsonl"
# cfg.report keys besides "head" (the ReportConfig) and "optimizer".
REPORT_DEFAULTS: dict[str, Any] = {
    "head": {},
    "optimizer": {},
    "precompute": True,
    "batch_size": None,  # cases per training batch (each gives one sequence per section); None: data.batch_size
    "generate_cases": 8,  # validation cases generated at each validation end (0: none)
    "final_generate_cases": None,  # at the final validation (None: every validation case)
    "log_samples": 2,  # generated reports printed to the log at each validation end
    # Condition the decoder on findings (head.findings empty: the checkpoint's findings the
    # labeler knows); a findings classifier on the frozen encoder is fitted for inference.
    "condition_on_findings": True,
    # Share of the sections whose prompt names no finding that a training batch keeps (1.0:
    # all). Normal sections are most of every report and are learnt at once; dropping most
    # of them spends the steps on the sections that must follow their findings.
    "normal_section_rate": 1.0,
    # Also fit the anatomy head (volumevlm.train.anatomy) from the same encoder and
    # segmentation pass over the training cases (needs head.findings_features=organs).
    "anatomy": False,
    # A finding the findings classifier reads at an out-of-fold AUROC below this is never
    # called (0: every finding gets its F1-best threshold). For a finding read near chance
    # that threshold calls nearly every case, and the report then states it in nearly
    # every report: macro F1 counts that as a gain, a reader would not.
    "findings_min_auroc": 0.0,
    # Findings read in their own organs (needs head.findings_features=organs): null (every
    # finding from every organ's features), "registry" (the organs
    # volumevlm.text.findings.FINDING_ORGANS lists, those the segmentation head has), or
    # {finding: [structure names of the segmentation head]}. A finding with organs gets the
    # regression on their features alone when that reads it better out of fold than the
    # regression on all of them: 420 cases do not fit a thousand features for a finding
    # seen in one organ.
    "findings_organs": None,
}
# The threshold of a finding the classifier does not call: no probability reaches it.
NEVER_CALLED = 2.0
# report.findings_organs: the organs volumevlm.text.findings.FINDING_ORGANS lists.
REGISTRY_ORGANS = "registry"
# The findings classifier's name for the whole feature vector (fit info "features").
ALL_FEATURES = "all"


def _settings(report: Mapping[str, Any] | None) -> dict[str, Any]:
    given = dict(report or {})
    unknown = sorted(set(given) - set(REPORT_DEFAULTS))
    if unknown:
        raise VolumeVLMError(f"report: unknown keys {unknown}; known: {sorted(REPORT_DEFAULTS)}")
    out = {**REPORT_DEFAULTS, **given}
    optimizer = dict(out["optimizer"] or {})
    unknown = sorted(set(optimizer) - set(OPTIMIZER_DEFAULTS))
    if unknown:
        raise VolumeVLMError(f"report.optimizer: unknown keys {unknown}; known: {sorted(OPTIMIZER_DEFAULTS)}")
    out["optimizer"] = {**OPTIMIZER_DEFAULTS, **optimizer}
    floor = out["findings_min_auroc"]
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0.0 <= float(floor) <= 1.0:
        raise VolumeVLMError(f"report.findings_min_auroc: must be a number in [0, 1], got {floor!r}")
    organs = out["findings_organs"]
    if organs is not None and organs != REGISTRY_ORGANS:
        if not isinstance(organs, Mapping) or not all(
                isinstance(v, Sequence) and not isinstance(v, str) and v and all(isinstance(o, str) for o in v)
                for v in organs.values()):
            raise VolumeVLMError(f"report.findings_organs: must be null, {REGISTRY_ORGANS!r} or a mapping of findings to "
                                 f"lists of structure names, got {organs!r}")
        out["findings_organs"] = {str(k): [str(o) for o in v] for k, v in organs.items()}
    return out


def finding_organ_columns(findings_organs: Mapping[str, Sequence[str]] | str | None, findings: Sequence[str],
                          label_names: Mapping[int, str], width: int,
                          statistics_width: int = 0) -> dict[str, dict[str, list[int]]]:
    """{finding: {"organs": the columns of its organs, "organ_statistics": of their
    statistics alone}}: the other feature sets the findings classifier tries for it
    (:func:`fit_findings_classifier`). The organ features are laid out organ by organ,
    ``width`` columns each (organ k = label k + 1 of the segmentation head whose
    ``label_names`` are given), the organ's last ``statistics_width`` columns its
    model-free statistics (size and HU histogram; 0: no "organ_statistics" set).
    ``findings_organs``: see ``REPORT_DEFAULTS["findings_organs"]``; with "registry" a
    finding none of whose organs the segmentation head has gets none (it is read from all
    of them); a mapping must name the head's findings and the segmentation head's
    structures (one-line error otherwise)."""
    from volumevlm.text.findings import FINDING_ORGANS

    if not findings_organs:
        return {}
    index = {name: int(k) for k, name in label_names.items() if int(k) > 0}
    if findings_organs == REGISTRY_ORGANS:
        mapping = {f: [o for o in FINDING_ORGANS.get(f, ()) if o in index] for f in findings}
    else:
        mapping = {str(f): list(v) for f, v in dict(findings_organs).items()}
        stray = sorted(set(mapping) - set(findings))
        if stray:
            raise VolumeVLMError(f"report.findings_organs: {stray} are not findings of the head; its findings: {list(findings)}")
        unknown = sorted({o for v in mapping.values() for o in v} - set(index))
        if unknown:
            raise VolumeVLMError(f"report.findings_organs: {unknown} are not structures of the segmentation head; "
                                 f"its structures: {sorted(index, key=index.get)}")
    out: dict[str, dict[str, list[int]]] = {}
    for finding, organs in mapping.items():
        starts = [(index[o] - 1) * width for o in sorted(set(organs), key=index.get)]
        if not starts:
            continue
        out[finding] = {"organs": [s + c for s in starts for c in range(width)]}
        if statistics_width:
            out[finding]["organ_statistics"] = [s + c for s in starts for c in range(width - statistics_width, width)]
    return out


# ---------------------------------------------------------------------- data


class CaseTokens(Dataset):
    """Precomputed encoder tokens of cases: item {"tokens" float32 [N + R, C], "grid"
    (gx, gy, gz), "report" str, "id" str}."""

    def __init__(self, cases: Sequence[Mapping[str, Any]]):
        self.cases = list(cases)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.cases[index]


class CaseImages(Dataset):
    """Preprocessed images of cases with a report: item {"image" float32 [1, X, Y, Z],
    "report" str, "id" str} (a view of a PretrainDataset)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        return {"image": item["image"], "report": item["report"], "id": item["id"]}


class ReportCollate:
    """Batches for :class:`ReportModule`: the cases' tokens [B, N, C] (+ grid) or images
    [B, 1, X, Y, Z], "reports"/"ids" lists, and one text row per (case, section):
    "input_ids"/"attention_mask"/"labels" long [M, T] and "case_index" long [M].

    A head conditioned on findings also gets "findings" float [B, F]: the labeler's
    reading of each report (teacher forcing), each finding flipped with probability
    ``noise`` (training's ``findings_noise``; 0 for validation). The prompts of a head
    with ``findings_in_prompt`` name the same, flipped, findings; of the sections whose
    prompt names none, a share ``normal_rate`` is kept (training's ``normal_section_rate``;
    1 for validation; a case keeps at least one section)."""

    def __init__(self, generator, noise: float = 0.0, normal_rate: float = 1.0):
        if not 0.0 < float(normal_rate) <= 1.0:
            raise VolumeVLMError(f"report.normal_section_rate must be in (0, 1], got {normal_rate!r}")
        self.generator = generator
        self.noise = float(noise)
        self.normal_rate = float(normal_rate)

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        reports = [item["report"] for item in items]
        findings = None
        present: list[Sequence[str]] = [()] * len(items)
        if self.generator.config.findings:
            findings = self.generator.findings_readings(reports)
            if self.noise > 0:
                flip = torch.rand(findings.shape) < self.noise
                findings = torch.where(flip, 1.0 - findings, findings)
            if self.generator.config.findings_in_prompt:
                present = self.generator.present_findings(findings)
        prompts, targets, case_index = [], [], []
        for i, item in enumerate(items):
            pairs = self.generator.training_texts(item["report"], present[i])
            if self.normal_rate < 1.0 and self.generator.config.findings_in_prompt:
                # A section is normal when its prompt is the bare header (no finding named).
                plain = self.generator.training_texts(item["report"])
                kept = [pair for pair, bare in zip(pairs, plain)
                        if pair[0] != bare[0] or float(torch.rand(())) < self.normal_rate]
                pairs = kept or pairs[:1]
            for prompt, target in pairs:
                prompts.append(prompt)
                targets.append(target)
                case_index.append(i)
        batch: dict[str, Any] = self.generator.encode_targets(targets, prompts)
        batch["case_index"] = torch.tensor(case_index, dtype=torch.long)
        batch["reports"] = reports
        if findings is not None:
            batch["findings"] = findings
        batch["ids"] = [item["id"] for item in items]
        if "tokens" in items[0]:
            grids = {tuple(item["grid"]) for item in items}
            if len(grids) != 1:
                raise VolumeVLMError(f"report batch: cases with different token grids {sorted(grids)} (one preprocessing size is needed)")
            batch["tokens"] = torch.stack([item["tokens"] for item in items])
            batch["grid"] = grids.pop()
            if "features" in items[0]:
                batch["finding_inputs"] = torch.stack([item["features"] for item in items])
        else:
            batch["image"] = torch.stack([item["image"] for item in items])
        return batch


@torch.no_grad()
def precompute_tokens(encoder, dataset, batch_size: int, device: torch.device | str = "cpu",
                      features_of=None) -> list[dict[str, Any]]:
    """One no-grad, eval-mode encoder pass over a PretrainDataset's cases (with a report).

    Returns [{"tokens" float32 [N + R, C] on the CPU, "grid", "report", "id"}];
    ``features_of(tokens, grid, images)`` -> [B, D], when given, adds each case's
    findings-classifier input as "features" (computed in the same pass)."""
    from volumevlm.data.datasets import collate_cases
    from volumevlm.models.report import encoder_features

    was_training = encoder.training
    encoder.eval()
    cases: list[dict[str, Any]] = []
    try:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate_cases)
        for batch in loader:
            images = batch["image"].to(device)
            tokens, grid = encoder_features(encoder(images))
            features = features_of(tokens, grid, images).float().cpu() if features_of is not None else None
            tokens = tokens.float().cpu()
            for i, report in enumerate(batch["report"]):
                case = {"tokens": tokens[i].clone(), "grid": grid, "report": report, "id": batch["id"][i]}
                if features is not None:
                    case["features"] = features[i].clone()
                cases.append(case)
    finally:
        encoder.train(was_training)
    return cases


@torch.no_grad()
def case_features(encoder, dataset, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """:func:`~volumevlm.models.report.finding_features` [N, 2C] of a PretrainDataset's
    cases: one no-grad, eval-mode encoder pass (for ``report.precompute: false``)."""
    from volumevlm.data.datasets import collate_cases
    from volumevlm.models.report import encoder_features, finding_features

    was_training = encoder.training
    encoder.eval()
    rows = []
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate_cases):
            tokens, grid = encoder_features(encoder(batch["image"].to(device)))
            rows.append(finding_features(tokens, grid).cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(rows)


def fit_findings_classifier(generator, features: torch.Tensor, readings: torch.Tensor, seed: int = 0,
                            folds: int = 5, return_out_of_fold: bool = False, min_auroc: float = 0.0,
                            columns: Mapping[str, Mapping[str, Sequence[int]]] | None = None):
    """Fit the head's findings classifier (a linear probe of the frozen encoder) and its thresholds.

    features float [N, 2C] (:func:`~volumevlm.models.report.finding_features` of the
    training cases); readings float [N, F] (the labeler's reading of their reports, the
    targets). Per finding: scikit-learn's standardised, class-balanced logistic regression;
    the call threshold maximises F1 on out-of-fold probabilities (``folds``-fold
    cross-validation), so it is not tuned on predictions of cases the probe was fitted to.
    A finding with fewer than ``folds`` positive (or negative) cases gets a constant
    prediction (its training prevalence) and a threshold of 0.5. The standardisation is
    folded into the linear layer. A finding whose out-of-fold AUROC is below ``min_auroc``
    gets the threshold :data:`NEVER_CALLED` (listed under "not_called"). ``columns``
    ({finding: {name: feature columns}}, :func:`finding_organ_columns`): such a finding is
    also fitted on each of those column sets alone (its weight elsewhere zero) and keeps
    the fit with the highest out-of-fold AUROC ("features": "all" or the set's name, per
    finding; "oof_auroc_by_features": every set's AUROC for the findings with sets).
    Returns {"findings", "thresholds", "oof_f1", "oof_auroc", "not_called", "features",
    "oof_auroc_by_features", "positives"}
    (out-of-fold figures on the training cases: a first look at how well the image alone
    predicts each finding); with ``return_out_of_fold`` also the out-of-fold probabilities
    float64 [N, F] (the training prevalence for a constant finding), as a second value."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from volumevlm.train.anatomy import folded_linear

    x = features.double().numpy()
    y = readings.numpy().astype(int)
    if x.shape[0] != y.shape[0] or y.shape[1] != len(generator.config.findings):
        raise VolumeVLMError(f"findings classifier: {x.shape[0]} feature rows, readings {list(y.shape)} "
                             f"for {len(generator.config.findings)} findings")
    weight = np.zeros((y.shape[1], x.shape[1]))
    bias = np.zeros(y.shape[1])
    thresholds = np.full(y.shape[1], 0.5)
    out_of_fold = np.zeros(y.shape, dtype=np.float64)
    oof_f1: dict[str, float | None] = {}
    oof_auroc: dict[str, float | None] = {}
    not_called: list[str] = []
    columns = {str(f): {str(k): np.unique(np.asarray(c, dtype=np.int64)) for k, c in sets.items()}
               for f, sets in (columns or {}).items()}
    outside = sorted({f for f, sets in columns.items() for k, c in sets.items()
                      if k == ALL_FEATURES or not len(c) or c[0] < 0 or c[-1] >= x.shape[1]})
    if outside:
        raise VolumeVLMError(f"findings classifier: a column set of {outside} is named {ALL_FEATURES!r}, empty or outside "
                             f"the {x.shape[1]} features")

    def new_probe():
        return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000))

    read_from: dict[str, str] = {}
    oof_auroc_by: dict[str, dict[str, float]] = {}
    for j, name in enumerate(generator.config.findings):
        positives = int(y[:, j].sum())
        if min(positives, len(y) - positives) < folds:
            rate = min(max(positives / max(len(y), 1), 1e-4), 1 - 1e-4)
            bias[j] = math.log(rate / (1 - rate))
            out_of_fold[:, j] = rate
            oof_f1[name] = oof_auroc[name] = None
            continue
        split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        best = None  # (out-of-fold AUROC, set name, columns, probe, out-of-fold probabilities)
        aurocs: dict[str, float] = {}
        for key, used in {ALL_FEATURES: np.arange(x.shape[1]), **columns.get(name, {})}.items():
            probe = new_probe()
            oof = cross_val_predict(probe, x[:, used], y[:, j], cv=split, method="predict_proba")[:, 1]
            auroc = float(roc_auc_score(y[:, j], oof))
            aurocs[key] = round(auroc, 4)
            if best is None or auroc > best[0]:  # a tie keeps the earlier set (all features first)
                best = (auroc, key, used, probe, oof)
        _, read_from[name], used, probe, oof = best
        if name in columns:
            oof_auroc_by[name] = aurocs
        out_of_fold[:, j] = oof
        best_f1, best_t = -1.0, 0.5
        for t in np.unique(oof):
            called = oof >= t
            tp = int((called & (y[:, j] == 1)).sum())
            f1 = 2 * tp / (called.sum() + positives)
            if f1 > best_f1:
                best_f1, best_t = f1, float(t)
        probe.fit(x[:, used], y[:, j])
        folded_weight, folded_bias = folded_linear(probe[0], probe[1].coef_, probe[1].intercept_)
        weight[j, used], bias[j] = folded_weight[0], folded_bias[0]
        thresholds[j] = best_t
        oof_f1[name] = round(best_f1, 4)
        oof_auroc[name] = round(float(roc_auc_score(y[:, j], oof)), 4)
        if oof_auroc[name] < float(min_auroc):
            thresholds[j] = NEVER_CALLED
            not_called.append(name)
    layer = generator.findings_classifier
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight).to(layer.weight.dtype))
        layer.bias.copy_(torch.from_numpy(bias).to(layer.bias.dtype))
        generator.finding_thresholds.copy_(torch.from_numpy(thresholds).to(generator.finding_thresholds.dtype))
    layer.requires_grad_(False)
    info = {"findings": list(generator.config.findings), "thresholds": [round(float(t), 4) for t in thresholds],
            "oof_f1": oof_f1, "oof_auroc": oof_auroc, "not_called": not_called,
            "features": read_from, "oof_auroc_by_features": oof_auroc_by,
            "positives": {n: int(v) for n, v in zip(generator.config.findings, y.sum(axis=0))}}
    return (info, out_of_fold) if return_out_of_fold else info


# ---------------------------------------------------------------------- metrics


def report_scores(generated: Sequence[str], references: Sequence[str], findings: Sequence[str] | None = None) -> dict[str, float]:
    """Figures of generated vs reference reports
    (:func:`volumevlm.metrics.report.report_metrics`): clinical_f1 (macro over
    ``findings``; None = every finding the labeler knows), clinical_f1_micro, bleu4,
    rouge_l, distinct_ratio, cases. The references should already be in the
    generator's layout (:meth:`ReportGenerator.reference_text`). {} for no cases."""
    from volumevlm.metrics.report import report_metrics

    generated, references = list(generated), list(references)
    if not generated:
        return {}
    return dict(report_metrics(generated, references, findings=findings))


# ---------------------------------------------------------------------- the module


class ReportModule(L.LightningModule):
    """Trains a ReportGenerator on a frozen encoder.

    generator: the :class:`~volumevlm.models.report.ReportGenerator` (resampler + decoder:
    the only trained parameters). encoder: the frozen VolumeEncoder when batches carry
    images (None when they carry precomputed tokens). optimizer: OPTIMIZER_DEFAULTS keys
    (AdamW, warmup then cosine per optimizer step). generate_cases: validation cases to
    generate at each validation end (0: none; None: all). log_samples: generated reports
    written to the log. findings: the findings the clinical F1 scores (None: every
    finding the labeler knows; train_report passes the checkpoint's).
    """

    def __init__(self, generator, encoder=None, optimizer: Mapping[str, Any] | None = None,
                 generate_cases: int | None = 8, log_samples: int = 2, findings: Sequence[str] | None = None):
        super().__init__()
        self.generator = generator
        self.encoder = encoder
        if encoder is not None:
            encoder.requires_grad_(False)
            encoder.eval()
        self.optimizer_config = {**OPTIMIZER_DEFAULTS, **dict(optimizer or {})}
        self.generate_cases = generate_cases
        self.log_samples = int(log_samples)
        self.findings = None if findings is None else [str(f) for f in findings]
        self.samples: list[dict[str, str]] = []
        self.scores: dict[str, float] = {}
        self._gen_cases: list[tuple[torch.Tensor, tuple, str, str]] = []

    def train(self, mode: bool = True):
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()  # frozen: dropout/drop-path stay off while the head trains
        return self

    # ------------------------------------------------------------------ steps

    def visual(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, tuple | None]:
        """(encoder tokens [B, N + R, C], grid) of a batch: precomputed, or encoded now without gradients."""
        if "tokens" in batch:
            return batch["tokens"], batch["grid"]
        if self.encoder is None:
            raise VolumeVLMError("report training: batches carry images but the module has no encoder")
        from volumevlm.models.report import encoder_features

        with torch.no_grad():
            return encoder_features(self.encoder(batch["image"]))

    def batch_loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Next-token loss; the decoder reads the findings the batch carries (the labeler's
        reading of its reports, flipped by the training collate: :class:`ReportCollate`)."""
        tokens, grid = self.visual(batch)
        return self.generator(
            tokens, batch["input_ids"], batch["attention_mask"], batch["labels"], grid=grid, case_index=batch["case_index"],
            findings=batch.get("findings"),
        )

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.batch_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["reports"]))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._gen_cases = []

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        tokens, grid = self.visual(batch)
        loss = self.generator(
            tokens, batch["input_ids"], batch["attention_mask"], batch["labels"], grid=grid, case_index=batch["case_index"],
            findings=batch.get("findings"),
        )
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["reports"]))
        limit = self.generate_cases
        if self.trainer.sanity_checking or limit == 0:
            return
        for i in range(tokens.shape[0]):
            if limit is not None and len(self._gen_cases) >= limit:
                break
            inputs = batch.get("finding_inputs")
            self._gen_cases.append((tokens[i], grid, batch["reports"][i], batch["ids"][i],
                                    None if inputs is None else inputs[i]))

    def on_validation_epoch_end(self) -> None:
        if not self._gen_cases:
            return
        cases, self._gen_cases = self._gen_cases, []
        conditioned = bool(self.generator.config.findings)
        generated: list[str] = []
        oracle: list[str] = []
        for start in range(0, len(cases), 32):
            chunk = cases[start : start + 32]
            grids = {c[1] for c in chunk}
            grid = grids.pop() if len(grids) == 1 else None
            tokens = torch.stack([c[0] for c in chunk])
            calls = None
            if conditioned and chunk[0][4] is not None:
                probabilities = self.generator.predict_findings(None, features=torch.stack([c[4] for c in chunk]))
                calls = self.generator.findings_calls(probabilities)
            generated += self.generator.generate(tokens, grid=grid, findings=calls)
            if conditioned:
                # The same decoder given the findings of the true report: how good the text
                # would be with a perfect findings classifier.
                readings = self.generator.findings_readings([c[2] for c in chunk])
                oracle += self.generator.generate(tokens, grid=grid, findings=readings)
        # Compared with what the head is trained to write (no EXAMINATION/TECHNIQUE lines).
        references = [self.generator.reference_text(c[2]) for c in cases]
        self.samples = [{"id": c[3], "reference": r, "generated": g} for c, r, g in zip(cases, references, generated)]
        for sample, text in zip(self.samples, oracle):
            sample["generated_from_true_findings"] = text
        self.scores = report_scores(generated, references, self.findings)
        if conditioned:
            self.scores.update({f"oracle_{k}": v for k, v in report_scores(oracle, references, self.findings).items()
                                if k in ("clinical_f1", "clinical_f1_micro", "bleu4", "rouge_l", "distinct_ratio")})
        for key, value in self.scores.items():
            if math.isfinite(value):
                self.log(f"val/{key}", value, prog_bar=key in ("clinical_f1", "distinct_ratio"))
        for sample in self.samples[: self.log_samples]:
            log.info("report sample %s (step %d):\n%s", sample["id"], self.global_step, sample["generated"])
            for logger in self.loggers:
                experiment = getattr(logger, "experiment", None)
                if hasattr(experiment, "add_text"):
                    experiment.add_text(f"val/report/{sample['id']}", sample["generated"].replace("\n", "  \n"), self.global_step)

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self):
        # The resampler's learned query vectors are not decayed.
        return configure_adamw(self.generator.named_parameters(), self.optimizer_config, total_optimizer_steps(self),
                               exempt_from_decay=lambda name: name.endswith("queries"))


# ---------------------------------------------------------------------- the run


def _rows_with_reports(rows: Sequence[dict], split: str) -> list[dict]:
    return [row for row in rows if row.get("split") == split and isinstance(row.get("report"), str) and row["report"].strip()]


def _init_provenance(folder: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((folder / "config.json").read_text()).get("provenance") or {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}


def train_report(cfg, callbacks: Sequence[L.Callback] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train the report head per ``cfg`` (``experiment=report_demo``); returns (metrics, objects).

    Needs ``cfg.init_from`` (a checkpoint directory), ``cfg.data.root`` (a manifest folder
    whose train/val cases have reports), ``cfg.report`` (see :data:`REPORT_DEFAULTS`;
    ``report.head`` = :class:`~volumevlm.models.report.ReportConfig` fields), ``cfg.trainer``.
    metrics: train/* and val/* floats (also in ``output_dir/metrics.json``). objects:
    {"cfg", "model" (the VolumeVLM with its report head), "generator", "module",
    "trainer", "model_dir", "resumed_from", "samples"}.
    """
    from omegaconf import OmegaConf

    from volumevlm.data.datasets import PretrainDataset
    from volumevlm.data.manifest import read_manifest
    from volumevlm.models.report import ReportConfig, ReportGenerator, section_bank_of, section_findings_of
    from volumevlm.models.vlm import VolumeVLM
    from volumevlm.train.train import LAST_CHECKPOINT, _float_metrics, build_trainer, checkpoint_dir, data_provenance

    started = time.perf_counter()
    init_from = cfg.get("init_from")
    if not init_from:
        raise VolumeVLMError("init_from: not set; give a pretrained checkpoint directory, e.g. init_from=demo-output/model")
    if OmegaConf.is_missing(cfg.data, "root") or not cfg.data.get("root"):
        raise VolumeVLMError("data.root: not set; give the dataset folder, e.g. data.root=demo-output/cohort")
    settings = _settings(OmegaConf.to_container(cfg.get("report") or {}, resolve=True))
    output_dir = Path(cfg.output_dir).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    init_dir = Path(str(init_from)).expanduser()
    model = VolumeVLM.from_pretrained(init_dir)
    model.requires_grad_(False)
    head_settings = dict(settings["head"])
    if settings["condition_on_findings"] and not head_settings.get("findings"):
        head_settings["findings"] = scored_findings(model.findings) or []
        if not head_settings["findings"]:
            raise VolumeVLMError(f"{init_dir}: none of the checkpoint's findings is known to the labeler; set report.head.findings")
    elif not settings["condition_on_findings"]:
        head_settings["findings"] = []
    root = Path(str(cfg.data.root)).expanduser()
    manifest = read_manifest(root / MANIFEST_NAME)
    train_rows = _rows_with_reports(manifest.rows, "train")
    if cfg.data.get("train_limit") is not None:
        train_rows = train_rows[: int(cfg.data.train_limit)]
    if head_settings.get("findings_in_prompt") and head_settings.get("section_findings") is None and head_settings["findings"]:
        # Which organ section states which finding, read from the training reports once.
        head_settings["section_findings"] = section_findings_of(
            [row["report"] for row in train_rows], ReportConfig.from_dict(head_settings).findings,
            ReportConfig.from_dict(head_settings).section_names)
    if head_settings["findings"] and head_settings.get("sections", True) and head_settings.get("section_bank") is None:
        # The texts a section may be taken from when the decoder cannot write the case's
        # findings there (bank_fallback), read from the training reports once.
        unfitted = ReportConfig.from_dict(head_settings)
        head_settings["section_bank"] = section_bank_of([row["report"] for row in train_rows], unfitted.findings,
                                                        unfitted.section_names)
    segmentation = None
    if head_settings.get("findings") and head_settings.get("findings_features", "grid") == "organs":
        if not settings["precompute"]:
            raise VolumeVLMError("report.head.findings_features=organs needs report.precompute=true")
        segmentation = model.head("segmentation")  # one-line error with the recipe when missing
        head_settings["organ_classes"] = int(segmentation.config.num_classes)
    head_config = ReportConfig.from_dict(head_settings)
    if settings["findings_organs"] and head_config.findings:
        if segmentation is None:
            raise VolumeVLMError("report.findings_organs needs report.head.findings_features=organs")
        # Checked before the pass over the cases (a misspelt organ fails at once).
        finding_organ_columns(settings["findings_organs"], head_config.findings, segmentation.config.label_names, 1)
    generator = ReportGenerator.build(head_config, model)

    val_rows = _rows_with_reports(manifest.rows, "val")
    if not train_rows:
        raise InputError(manifest.path, "no training case (split 'train') has a report")
    cache_dir = cfg.data.get("cache_dir") if cfg.data.get("cache", True) else None
    train_data = PretrainDataset(train_rows, model.preprocess, cache_dir=cache_dir)
    val_data = PretrainDataset(val_rows, model.preprocess, cache_dir=cache_dir) if val_rows else None

    trainer = build_trainer(cfg, callbacks)
    batch_size = int(settings["batch_size"] or cfg.data.batch_size)
    val_batch_size = int(cfg.data.get("val_batch_size") or batch_size)
    encode_started = time.perf_counter()
    if settings["precompute"]:
        device = trainer.strategy.root_device
        encoder = model.encoder.to(device)
        features_of = None
        if segmentation is not None:
            from volumevlm.models.report import image_finding_features

            segmentation.to(device)

            def features_of(tokens, grid, images):
                return image_finding_features(generator, tokens, grid, images, segmentation, cache_dir=cache_dir,
                                              hu_window=model.preprocess.hu_window)
        train_set = CaseTokens(precompute_tokens(encoder, train_data, val_batch_size, device, features_of))
        val_set = CaseTokens(precompute_tokens(encoder, val_data, val_batch_size, device, features_of)) if val_data else None
        model.encoder.to("cpu")
        if segmentation is not None:
            segmentation.to("cpu")
        module_encoder, workers = None, 0
    else:
        train_set, val_set = CaseImages(train_data), (CaseImages(val_data) if val_data else None)
        module_encoder, workers = model.encoder, int(cfg.data.get("num_workers") or 0)
    findings_probe: dict[str, Any] | None = None
    if head_config.findings:
        from volumevlm.models.report import finding_features

        if settings["precompute"] and segmentation is not None:
            features = torch.stack([c["features"] for c in train_set.cases])
        elif settings["precompute"]:
            features = torch.stack([finding_features(c["tokens"][None], c["grid"])[0] for c in train_set.cases])
        else:
            features = case_features(model.encoder, train_data, val_batch_size)
        readings = generator.findings_readings([row["report"] for row in train_rows])
        columns = None
        if settings["findings_organs"]:
            from volumevlm.models.anatomy import organ_statistics_width

            columns = finding_organ_columns(settings["findings_organs"], head_config.findings,
                                            segmentation.config.label_names,
                                            features.shape[1] // (head_config.organ_classes - 1),
                                            organ_statistics_width(head_config.organ_statistics))
        findings_probe, findings_oof = fit_findings_classifier(generator, features, readings, seed=int(cfg.seed),
                                                               return_out_of_fold=True,
                                                               min_auroc=settings["findings_min_auroc"],
                                                               columns=columns)
        log.info("report: findings classifier fitted on %d cases; out-of-fold F1 %s; read from %s",
                 len(features), findings_probe["oof_f1"], findings_probe["features"])
    anatomy_info: dict[str, Any] | None = None
    if settings["anatomy"]:
        import numpy as np

        from volumevlm.train.anatomy import fit_anatomy_head

        if segmentation is None or not settings["precompute"]:
            raise VolumeVLMError("report.anatomy=true needs report.head.findings_features=organs (and report.precompute=true)")
        organs = head_config.organ_classes - 1
        # The findings probe's input is the organ features, organ by organ (image_finding_features).
        features = torch.stack([c["features"] for c in train_set.cases]).view(len(train_set), organs, -1)
        # The head's findings classifier reads these same features: the codes are read through it.
        through = None
        if head_config.findings:
            layer = generator.findings_classifier
            through = {"findings": list(head_config.findings), "weight": layer.weight.detach().double().numpy(),
                       "bias": layer.bias.detach().double().numpy(), "out_of_fold": findings_oof}
        try:
            vocab = model.phecode_vocab
            # The pretraining's phenotype targets: a case without codes has none of them.
            codes = np.array([vocab.encode(row.get("phecodes") or []) for row in train_rows]) if vocab.codes else None
            anatomy, anatomy_info = fit_anatomy_head(model, features,
                                                     [row["report"] for row in train_rows], head_config.findings,
                                                     head_config.organ_classes, phecodes=list(vocab.codes),
                                                     codes=codes, seed=int(cfg.seed),
                                                     organ_statistics=head_config.organ_statistics,
                                                     findings_probe=through)
        except VolumeVLMError as err:  # too few training reports: the report head still trains
            anatomy_info = {"skipped": str(err)}
            log.warning("report: %s; the checkpoint gets no anatomy head", err)
        else:
            model.attach_head("anatomy", anatomy)
            log.info("report: anatomy head fitted on %d cases, sections %s", len(train_set), list(anatomy.sections))
    encode_s = time.perf_counter() - encode_started
    log.info("report: %d train / %d val cases; encoder pass %.1f s", len(train_set), len(val_set or []), encode_s)

    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=len(train_set) > batch_size,
                              num_workers=workers,
                              collate_fn=ReportCollate(generator, head_config.findings_noise, float(settings["normal_section_rate"])),
                              persistent_workers=workers > 0)
    val_loader = (DataLoader(val_set, batch_size=val_batch_size, shuffle=False, num_workers=workers,
                             collate_fn=ReportCollate(generator),
                             persistent_workers=workers > 0) if val_set else None)
    module = ReportModule(generator, encoder=module_encoder, optimizer=settings["optimizer"],
                          generate_cases=settings["generate_cases"], log_samples=settings["log_samples"],
                          findings=scored_findings(model.findings))

    fast_dev_run = bool(cfg.trainer.get("fast_dev_run"))
    last = checkpoint_dir(cfg) / LAST_CHECKPOINT
    resumed_from = str(last) if (cfg.get("resume", True) and not fast_dev_run and last.is_file()) else None
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=resumed_from)

    metrics = _float_metrics({k: v for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))})
    if not fast_dev_run:
        trainer.save_checkpoint(last)
        if cfg.get("final_validation", True) and val_loader is not None:
            module.generate_cases = settings["final_generate_cases"]
            results = trainer.validate(module, dataloaders=val_loader, verbose=False)
            metrics.update(_float_metrics(results[0] if results else {}))

    generator = module.generator.to("cpu").eval()
    generator.merge_lora()
    model.attach_head("report", generator)
    data = data_provenance(root, train_rows)
    provenance = _init_provenance(init_dir)
    if data["synthetic"]:
        provenance.update(synthetic=True, data_note=data["data_note"])
    provenance["heads"] = {
        **dict(provenance.get("heads") or {}),
        "report": {
            **data,
            "init_from": str(init_dir.resolve()),
            "global_step": int(trainer.global_step),
            "metrics": metrics,
            "training_config": OmegaConf.to_container(cfg, resolve=True),
        },
    }
    model_dir = None
    if cfg.get("model_dir") and trainer.is_global_zero:
        model_dir = model.save_pretrained(Path(str(cfg.model_dir)).expanduser(), provenance=provenance)

    if trainer.is_global_zero:
        samples = module.samples
        if samples:
            write_text_atomic(output_dir / SAMPLES_NAME, "".join(json.dumps(s) + "\n" for s in samples))
        summary = {
            "task": "report",
            "metrics": metrics,
            "global_step": int(trainer.global_step),
            "resumed_from": resumed_from,
            "init_from": str(init_dir.resolve()),
            "data": {"root": str(root), "train_cases": len(train_set), "val_cases": len(val_set or []),
                     "preprocess": model.preprocess.to_dict(), "precompute": bool(settings["precompute"])},
            "encoder_pass_s": round(encode_s, 1),
            "head_parameters": sum(p.numel() for p in generator.parameters()),
            "findings_classifier": findings_probe,
            "anatomy_head": anatomy_info,
            "samples": samples[:3],
            "model_dir": None if model_dir is None else str(model_dir),
            "device": str(trainer.strategy.root_device),
            "precision": str(trainer.precision),
            "elapsed_s": round(time.perf_counter() - started, 1),
            "versions": model.config_dict()["versions"],
            "note": f"{data['data_note']}. Generated text is not a clinical report. {NOT_FOR_CLINICAL_USE}",
        }
        write_text_atomic(output_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
    objects = {
        "cfg": cfg,
        "model": model,
        "generator": generator,
        "module": module,
        "trainer": trainer,
        "model_dir": model_dir,
        "resumed_from": resumed_from,
        "samples": module.samples,
    }
    return metrics, objects
