"""``volumevlm evaluate``: every evaluation protocol a checkpoint supports, on one split
of a cohort.

::

    volumevlm evaluate --checkpoint CKPT --data DIR --out OUT [--split test] [--prompts NAME]
                       [--batch-size N] [--cache-dir DIR] [--label-efficiency RUN ...]

``DIR`` holds a ``manifest.jsonl`` (what ``volumevlm synth`` or ``volumevlm adapt``
writes); ``--split`` names one split or several joined by commas (``val,test``).
Images go through the checkpoint's own preprocessing. Sections of ``OUT/metrics.json``:

zero_shot
    P(present) of each finding from the prompt set (``--prompts``; default: the
    checkpoint's, else ``synthetic``; template-averaged, pairwise softmax) against the
    manifest's finding labels: ``macro_auroc`` over findings with both classes in the
    split, ``per_finding`` AUROC (None: one class only). Plot: ``roc_curves.png``.
linear_probe
    the yardstick of the representation: a logistic regression per finding on the frozen
    image embeddings, fitted on the cohort's ``train`` split (encoded in the same run) and
    scored on the evaluated cases: ``macro_auroc`` with the same 95% bootstrap interval as
    zero-shot (``macro_auroc_ci95``), ``per_finding`` (:mod:`volumevlm.eval.probes`).
baseline
    ``voxel_probe``: the same regression on features that need no model (coarsely pooled
    voxel intensities plus an HU histogram of the preprocessed volume): the floor a
    foundation model's embedding must clear. Both probes are skipped when the evaluated
    split includes ``train``.
phenotypes
    sigmoid of the phenotype logits against the cases' phecodes: ``macro_auroc`` over the
    checkpoint's codes with positives and negatives in the split, ``per_code``; and
    ``macro_auroc_image_visible`` over the codes an image can show (``--visible-phecodes``;
    for the synthetic cohort by default the phecodes of its imaging findings, since
    hypertension or diabetes codes are invisible to any image model). With an anatomy
    head fitted with codes, the same figures for its classifiers on the organ features
    under ``anatomy`` (over the codes it was fitted for).
retrieval
    image and report embeddings of the cases with a report (section-mean report
    embeddings when the text tower was trained on sections). Merlin's protocol: recall@1/5/10
    in 100 random pools of 32, 64 and 128 cases (seed 0; None when the split has fewer
    cases), image -> report as the headline keys (``r1_pool32`` ...), both directions under
    ``image_to_report`` / ``report_to_image``, and recall@k over the whole split
    (``full_set``). With an anatomy head also ``anatomy``: the same protocol on the mean of
    the global cosine and the organ-system sections' mean cosine (the anatomy head's
    section embeddings of the image against the text tower's of each report section;
    :func:`volumevlm.models.anatomy.anatomy_retrieval_vectors`). Plots:
    ``retrieval_recall.png`` (image -> report, the whole split drawn as the largest pool)
    and ``retrieval_recall_t2i.png``.
text_retrieval
    text -> report-section search with free-phrased queries per finding
    (``--text-queries``; default: the bundled set of the checkpoint's finding set,
    :mod:`volumevlm.text.queries`) over the organ-system sections of the evaluated cases'
    reports (what ``volumevlm index build --sections`` indexes), judged by the findings
    labeler: ``precision_at_10`` (share of sections stating the finding among the top
    min(10, positives)), ``negated_positive_rate_at_10`` (for "No ..." queries, share of
    sections stating it among the top 10; lower is better), ``per_finding``,
    ``per_query`` (each query's top hit), ``queries``, ``chance``.
segmentation (needs the segmentation head)
    each labelled case segmented and brought back to its own geometry, compared with its
    label map there: ``per_label`` Dice and HD95 (mm, the input's voxel spacing),
    ``mean_dice`` and ``mean_hd95_mm`` over labels. Plots: ``dice_boxplot.png``,
    ``segmentation_overlay.png`` (the first case).
report (needs the report head)
    generated reports against the references (the sections the head writes):
    ``clinical_f1`` (macro over the checkpoint's findings the labeler knows), ``bleu4``,
    ``rouge_l``, ``distinct_ratio``; every case's pair in ``OUT/report_samples.jsonl``.
    A head conditioned on findings writes from the image's own findings calls; the same
    figures for reports it writes from the labeler's reading of the true report are under
    ``from_true_findings`` (what a perfect findings classifier would give), and the calls
    themselves scored as a report's findings are under ``calls`` (``clinical_f1``: what a
    decoder that wrote exactly its calls would give; each sample lists its ``calls``).
    A sectioned head reports under ``bank_sections`` the share of its sections taken from
    its section bank (``bank_fallback``; each sample lists them), for the image's calls
    and under ``from_true_findings``.
label_efficiency (``--label-efficiency``)
    segmentation runs (``volumevlm train experiment=segment_demo
    segmentation.label_fraction=F output_dir=RUN``) given by their output folders: the
    mean Dice each reports (its ``test/mean_dice``, else ``val/mean_dice``) against its
    label fraction. Plot: ``label_efficiency.png``.

A section the checkpoint or the data cannot support is still there, as
``{"skipped": "why"}``. ``metrics.json`` also names the device, versions, date,
command, checkpoint, data, split and case count; on a synthetic cohort it says
"synthetic data: not clinical": such figures are smoke tests, not clinical accuracy.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from volumevlm.errors import InputError, VolumeVLMError
from volumevlm.provenance import cpu_name, package_versions

MANIFEST_NAME = "manifest.jsonl"
METRICS_NAME = "metrics.json"
SAMPLES_NAME = "report_samples.jsonl"
SYNTHETIC_NOTE = "synthetic data: not clinical"
POOL_SIZES = (32, 64, 128)
K_VALUES = (1, 5, 10)
N_POOLS = 100
POOL_SEED = 0
PLOTS = {
    "zero_shot": "roc_curves.png",
    "retrieval": "retrieval_recall.png",
    "retrieval_t2i": "retrieval_recall_t2i.png",
    "dice": "dice_boxplot.png",
    "overlay": "segmentation_overlay.png",
    "label_efficiency": "label_efficiency.png",
}


# ---------------------------------------------------------------------- small helpers


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and inf become None, numpy/torch scalars become Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if torch.is_tensor(value) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(kept)) if kept else None


def device_description(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {"type": device.type, "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    else:
        info["name"] = cpu_name()
        info["cpu_count"] = os.cpu_count()
    return info


def read_split(data: Path, split: str) -> list[dict[str, Any]]:
    """The manifest rows of ``split`` (one name, or several joined by commas), in manifest order."""
    from volumevlm.data.manifest import read_manifest

    manifest = read_manifest(Path(data) / MANIFEST_NAME)
    names = [s.strip() for s in str(split).split(",") if s.strip()]
    if not names:
        raise VolumeVLMError(f"--split: no split named in {split!r}")
    for name in names:
        manifest.split(name)  # an unknown split name is a one-line error naming the manifest
    rows = [row for row in manifest.rows if row.get("split") in names]
    if not rows:
        raise InputError(manifest.path, f"no cases in split {split!r}")
    return rows


def is_synthetic(data: Path, rows: Sequence[Mapping[str, Any]]) -> bool:
    """True when the cohort says it is synthetic (every row, or its cohort.json)."""
    if rows and all(bool(row.get("synthetic")) for row in rows):
        return True
    info = Path(data) / "cohort.json"
    try:
        return bool(json.loads(info.read_text()).get("synthetic")) if info.is_file() else False
    except (OSError, ValueError, AttributeError):
        return False


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled, transient=False,
    )


# ---------------------------------------------------------------------- encoding pass


@torch.no_grad()
def encode_cases(model, rows: Sequence[Mapping[str, Any]], batch_size: int, cache_dir=None, progress=None,
                 generate: bool = False, texts: bool = True, what: str = "encoding") -> dict[str, Any]:
    """One pass of the image encoder over the cases (THE preprocessing, the checkpoint's config).

    Returns {"image_emb" [N, E], "phenotype_logits" [N, V], "text_emb" [N, E] (zero rows
    without a report, or everywhere when not ``texts``), "has_report" bool [N],
    "voxel_features" [N, D] (:func:`volumevlm.eval.probes.voxel_features` of the
    preprocessed volumes), "generated" list[str] (report head, when ``generate``), "ids"};
    with a segmentation head also "organ_tokens" [N, K*C] and "organ_histograms"
    [N, K*(1 + bins)] (:mod:`volumevlm.models.anatomy`, inside the organs that head finds,
    the current histogram recipe; the heads read theirs),
    and with an anatomy head "section_emb" [N, S, E] (its organ-system embeddings),
    "section_text_emb" [N, S, E] (the text tower's of each report's sections) and,
    when it has phenotype classifiers, "anatomy_phenotype_logits" [N, V'] (its codes).
    The encoder runs once per batch: embedding, phenotype logits and the report head's
    visual tokens all come from that one output, and the segmentation head once per batch
    too (the organ features and an ``organs`` report head's findings share it)."""
    from torch.utils.data import DataLoader

    from volumevlm.data.datasets import PretrainDataset, collate_cases
    from volumevlm.eval.probes import voxel_features
    from volumevlm.models.anatomy import (
        DEFAULT_ORGAN_STATISTICS,
        cached_organ_labels,
        organ_histograms_by,
        organ_token_means,
        report_section_embeddings,
    )
    from volumevlm.models.report import encoder_features, image_finding_features

    dataset = PretrainDataset(list(rows), model.preprocess, cache_dir=cache_dir)
    segmentation = model.heads["segmentation"] if "segmentation" in model.heads else None
    loader = DataLoader(dataset, batch_size=int(batch_size), shuffle=False, num_workers=0, collate_fn=collate_cases)
    head = model.head("report") if generate else None
    task = progress.add_task(what + (" + reports" if generate else ""), total=len(dataset)) if progress else None
    image_emb, logits, text_emb, has_report, generated, ids, voxels = [], [], [], [], [], [], []
    oracle: list[str | None] = []
    called: list[list[str]] = []  # a findings-conditioned report head's calls, per case
    banked: list[list[str]] = []  # the sections each report took from the head's section bank
    oracle_banked: list[list[str] | None] = []
    organ_tokens, organ_hist, section_emb, organ_logits, section_text_emb = [], [], [], [], []
    anatomy = model.heads["anatomy"] if "anatomy" in model.heads and segmentation is not None else None
    # The histogram recipes to compute: the probes' (the current one) and each head's own.
    recipes = {DEFAULT_ORGAN_STATISTICS}
    if anatomy is not None:
        recipes.add(anatomy.organ_statistics)
    if head is not None and head.config.findings and head.config.findings_features == "organs":
        recipes.add(head.config.organ_statistics)
    for batch in loader:
        voxels.append(voxel_features(batch["image"], model.preprocess.hu_window))
        images = batch["image"].to(model.device, dtype=torch.float32)
        out = model.encoder(images)
        image_emb.append(F.normalize(model.image_projection(out.pooled), dim=-1).float().cpu())
        logits.append(model.phenotype_head(out.pooled).float().cpu())
        reports = batch["report"]
        mask = [r is not None for r in reports]
        rows_text = torch.zeros(len(reports), model.embed_dim)
        if any(mask) and texts:
            rows_text[torch.tensor(mask)] = model.encode_reports([r for r in reports if r is not None]).cpu()
        text_emb.append(rows_text)
        has_report.extend(mask)
        ids.extend(batch["id"])
        tokens, grid = encoder_features(out)
        organs_by: dict[str, torch.Tensor] = {}  # organ features per histogram recipe, one segmentation pass
        if segmentation is not None:
            classes = int(segmentation.config.num_classes)
            labels = cached_organ_labels(segmentation, images, cache_dir)
            means = organ_token_means(tokens, grid, labels, classes)
            for statistics, histograms in organ_histograms_by(images, labels, classes, recipes,
                                                              model.preprocess.hu_window).items():
                organs_by[statistics] = torch.cat([means, histograms.to(means.device)], dim=-1)
            organ_tokens.append(means.flatten(1).float().cpu())
            organ_hist.append(organs_by[DEFAULT_ORGAN_STATISTICS][..., means.shape[-1]:].flatten(1).float().cpu())
            if anatomy is not None:
                section_emb.append(anatomy(organs_by[anatomy.organ_statistics]).float().cpu())
                section_text_emb.append(report_section_embeddings(model, reports if texts else [None] * len(reports),
                                                                  anatomy.sections))
                if anatomy.phecodes:
                    organ_logits.append(anatomy.phenotype_logits(organs_by[anatomy.organ_statistics]).float().cpu())
        if head is not None:
            calls = None
            if head.config.findings:
                if head.config.findings_features == "organs" and segmentation is None:
                    model.head("segmentation")  # the one-line error naming the recipe
                organs = organs_by.get(head.config.organ_statistics)
                features = image_finding_features(head, tokens, grid, organs=organs)
                calls = head.findings_calls(head.predict_findings(None, features=features))
                called.extend(head.present_findings(calls))
            sourced = head.config.sections  # whole reports written section by section say which came from the bank
            written = head.generate(tokens, grid=grid, findings=calls, return_sources=sourced)
            written = written if sourced else [(text, []) for text in written]
            generated.extend(text for text, _ in written)
            banked.extend(sections for _, sections in written)
            if head.config.findings:
                # The same decoder written from the labeler's reading of the true report:
                # separates what the image's findings calls cost from what the decoder does.
                rows_with = [i for i, r in enumerate(reports) if r is not None]
                from_truth = head.generate(tokens[rows_with], grid=grid, return_sources=sourced,
                                           findings=head.findings_readings([reports[i] for i in rows_with])) if rows_with else []
                pairs = iter(from_truth if sourced else [(text, []) for text in from_truth])
                for report in reports:
                    text, sections = next(pairs) if report is not None else (None, None)
                    oracle.append(text)
                    oracle_banked.append(sections)
        if progress is not None:
            progress.advance(task, len(reports))
    return {
        "image_emb": torch.cat(image_emb),
        "phenotype_logits": torch.cat(logits),
        "text_emb": torch.cat(text_emb),
        "has_report": torch.tensor(has_report, dtype=torch.bool),
        "voxel_features": torch.cat(voxels),
        **({"organ_tokens": torch.cat(organ_tokens), "organ_histograms": torch.cat(organ_hist)} if organ_tokens else {}),
        **({"section_emb": torch.cat(section_emb), "section_text_emb": torch.cat(section_text_emb)} if section_emb else {}),
        **({"anatomy_phenotype_logits": torch.cat(organ_logits)} if organ_logits else {}),
        "generated": generated,
        "generated_from_true_findings": oracle,
        "bank_sections": banked,
        "bank_sections_from_true_findings": oracle_banked,
        "findings_calls": called,
        "ids": ids,
    }


# ---------------------------------------------------------------------- protocols


def _scored_findings(model, rows, prompts):
    """(prompt set, the keys of its findings the rows label, targets float [N, F] with -1
    where a row does not label one) for the zero-shot sections; keys empty when none."""
    from volumevlm.models.zero_shot import resolve_prompt_set

    prompt_set = resolve_prompt_set(prompts, model)
    labelled = {str(k) for row in rows for k in (row.get("findings") or {})}
    keys = [k for k in prompt_set.keys if k in labelled]
    targets = np.array([[float((row.get("findings") or {}).get(k, -1)) for k in keys] for row in rows])
    return prompt_set, keys, targets


def _auroc_figures(scores: np.ndarray, targets: np.ndarray, keys: Sequence[str]) -> dict[str, Any]:
    """Macro AUROC with its bootstrap interval, per-finding AUROC and the findings scored."""
    from volumevlm.metrics import macro_auroc, macro_auroc_interval, per_finding_auroc

    macro, used = macro_auroc(scores, targets)
    return {"macro_auroc": macro, "macro_auroc_ci95": macro_auroc_interval(scores, targets),
            "per_finding": per_finding_auroc(scores, targets, keys), "findings_scored": used}


def zero_shot_anatomy_section(model, encoded, rows, prompts) -> dict[str, Any]:
    """Zero-shot read in the anatomy head's organ-system embeddings
    (:func:`volumevlm.models.zero_shot.zero_shot_from_sections`): the same prompts, cases
    and figures as ``zero_shot``, each finding scored in the section its head routes it
    to (``read_in``; the global embedding where none)."""
    from volumevlm.models.zero_shot import zero_shot_from_sections

    if "section_emb" not in encoded:
        return {"skipped": "no anatomy head (fitted by the report task with report.anatomy=true)"}
    prompt_set, keys, targets = _scored_findings(model, rows, prompts)
    if not keys:
        return {"skipped": f"no finding labels of prompt set {prompt_set.name!r} in the split's manifest rows"}
    scores, _, read_in = zero_shot_from_sections(model, encoded["image_emb"], encoded["section_emb"],
                                                 model.head("anatomy"), prompt_set, keys)
    return {**_auroc_figures(scores.numpy().astype(np.float64), targets, keys), "read_in": dict(zip(keys, read_in)),
            "prompt_set": prompt_set.name, "chance": 0.5}


def zero_shot_section(model, encoded, rows, prompts, out: Path, synthetic: bool) -> tuple[dict[str, Any], str | None]:
    from volumevlm.eval.plots import plot_roc_curves
    from volumevlm.models.zero_shot import zero_shot_from_embeddings

    prompt_set, keys, targets = _scored_findings(model, rows, prompts)
    if not keys:
        return {"skipped": f"no finding labels of prompt set {prompt_set.name!r} in the split's manifest rows"}, None
    scores, _ = zero_shot_from_embeddings(model, encoded["image_emb"], prompt_set, keys)
    scores = scores.numpy().astype(np.float64)
    section = {
        **_auroc_figures(scores, targets, keys),
        "findings": len(keys),
        "prompt_set": prompt_set.name,
        "prevalence": {k: _mean(v for v in targets[:, j] if v >= 0) for j, k in enumerate(keys)},
        "chance": 0.5,
    }
    plot = None
    if section["findings_scored"]:
        plot = str(plot_roc_curves(scores, targets, keys, out / PLOTS["zero_shot"],
                                   title=f"Zero-shot ROC ({prompt_set.name} prompts)", synthetic=synthetic))
    return section, plot


def _phenotype_figures(scores: np.ndarray, targets: np.ndarray, codes: Sequence[str],
                       visible_codes: Sequence[str] | None) -> dict[str, Any]:
    from volumevlm.metrics import macro_auroc, macro_auroc_interval, per_finding_auroc

    macro, used = macro_auroc(scores, targets)
    figures: dict[str, Any] = {
        "macro_auroc": macro if used else None,
        "macro_auroc_ci95": macro_auroc_interval(scores, targets) if used else None,
        "codes_scored": used,
        "codes": len(codes),
        "per_code": per_finding_auroc(scores, targets, list(codes)),
    }
    if visible_codes is not None:
        columns = [j for j, code in enumerate(codes) if code in set(visible_codes)]
        visible, visible_used = macro_auroc(scores[:, columns], targets[:, columns]) if columns else (math.nan, 0)
        figures["macro_auroc_image_visible"] = None if not visible_used else visible
        figures["macro_auroc_image_visible_ci95"] = (
            macro_auroc_interval(scores[:, columns], targets[:, columns]) if visible_used else None)
        figures["image_visible_codes_scored"] = visible_used
        figures["image_visible_codes"] = [codes[j] for j in columns]
    return figures


def phenotype_section(model, encoded, rows, visible_codes: Sequence[str] | None = None) -> dict[str, Any]:
    vocab = model.phecode_vocab
    codes = list(vocab.codes)
    if not codes:
        return {"skipped": "the checkpoint has no phecode vocabulary"}
    with_codes = [i for i, row in enumerate(rows) if row.get("phecodes") or row.get("icd10")]
    if not with_codes:
        return {"skipped": "no case of the split carries codes"}
    targets = np.array([vocab.encode(rows[i].get("phecodes") or []) for i in with_codes])
    scores = torch.sigmoid(encoded["phenotype_logits"][with_codes]).numpy().astype(np.float64)
    section = _phenotype_figures(scores, targets, codes, visible_codes)
    if not section["codes_scored"]:
        return {"skipped": "no phecode of the checkpoint has both positives and negatives in the split",
                "macro_auroc": None, "codes_scored": 0}
    section.update(cases=len(with_codes), descriptions={c: vocab.description(c) for c in codes}, chance=0.5)
    if "anatomy_phenotype_logits" in encoded:
        # The anatomy head's classifiers on the organ features: the codes it was fitted for.
        fitted = list(model.head("anatomy").phecodes)
        columns = [codes.index(c) for c in fitted]
        organ_scores = encoded["anatomy_phenotype_logits"][with_codes].numpy().astype(np.float64)
        section["anatomy"] = {
            **_phenotype_figures(organ_scores, targets[:, columns], fitted, visible_codes),
            "features": "organ features of the model's own segmentation (the anatomy head's classifiers)",
            "chance": 0.5,
        }
    return section


PROBE_SPLIT = "train"


def probe_sections(model, encoded, rows, data: Path, split: str, batch_size: int, cache_dir=None,
                   progress=None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The yardsticks (:mod:`volumevlm.eval.probes`): (``linear_probe``, ``organ_probe``,
    ``baseline``), each a logistic probe per finding fitted on the cohort's train split
    (encoded here, images only) and scored on the evaluated cases against the manifest's
    finding labels.

    ``organ_probe`` (models with a segmentation head): the same regression on the frozen
    encoder tokens averaged inside each organ the model's own segmentation head finds;
    ``baseline.organ_voxel_probe`` is its model-free companion inside the same organs
    (each organ's size and HU histogram), so the two compare on equal anatomical footing."""
    from volumevlm.data.manifest import read_manifest
    from volumevlm.eval.probes import probe_section

    if PROBE_SPLIT in [s.strip() for s in str(split).split(",")]:
        why = f"the evaluated split includes {PROBE_SPLIT!r}, the split the probes are fitted on"
        return {"skipped": why}, {"skipped": why}, {"voxel_probe": {"skipped": why}}
    train_rows = [row for row in read_manifest(Path(data) / MANIFEST_NAME).rows if row.get("split") == PROBE_SPLIT]
    labelled = [name for name in dict.fromkeys(str(k) for row in rows for k in (row.get("findings") or {}))
                if any(name in (row.get("findings") or {}) for row in train_rows)]
    if not labelled:
        why = f"no finding labelled in both the evaluated cases and the {PROBE_SPLIT!r} split of the manifest"
        return {"skipped": why}, {"skipped": why}, {"voxel_probe": {"skipped": why}}

    def targets(case_rows):
        return np.array([[float((row.get("findings") or {}).get(k, -1)) for k in labelled] for row in case_rows])

    fit = encode_cases(model, train_rows, batch_size, cache_dir=cache_dir, progress=progress, texts=False,
                       what="encoding train (probes)")
    train_y, eval_y = targets(train_rows), targets(rows)
    linear = probe_section(fit["image_emb"].numpy(), train_y, encoded["image_emb"].numpy(), eval_y, labelled,
                           features="frozen image embeddings (unit, shared space)")
    voxel = probe_section(fit["voxel_features"].numpy(), train_y, encoded["voxel_features"].numpy(), eval_y, labelled,
                          features="coarsely pooled voxel intensities + HU histogram of the preprocessed volume")
    baseline = {"voxel_probe": voxel}
    if "organ_tokens" not in encoded:
        return linear, {"skipped": "no segmentation head (the organs are the model's own)"}, baseline
    organ = probe_section(fit["organ_tokens"].numpy(), train_y, encoded["organ_tokens"].numpy(), eval_y, labelled,
                          features="frozen encoder tokens averaged inside each organ of the model's own segmentation")
    baseline["organ_voxel_probe"] = probe_section(
        fit["organ_histograms"].numpy(), train_y, encoded["organ_histograms"].numpy(), eval_y, labelled,
        features="size and HU histogram of each organ of the model's own segmentation (no encoder)")
    return linear, organ, baseline


def visible_phecodes(option: str | None, synthetic: bool) -> list[str] | None:
    """The image-visible phecodes: a comma-separated list or a file of one code per line
    (``--visible-phecodes``); by default the synthetic cohort's, else None (not scored)."""
    if option:
        path = Path(option).expanduser()
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        if os.sep in option or option.endswith((".txt", ".csv")):
            raise VolumeVLMError(f"--visible-phecodes: {option}: no such file")
        return [code.strip() for code in option.split(",") if code.strip()]
    if synthetic:
        from volumevlm.data.synthetic.codes import image_visible_phecodes

        return image_visible_phecodes()
    return None


def retrieval_section(encoded, out: Path, synthetic: bool) -> tuple[dict[str, Any], list[str]]:
    from volumevlm.eval.plots import plot_retrieval_recall
    from volumevlm.metrics import pool_recall, recall_at_k

    mask = encoded["has_report"]
    n = int(mask.sum())
    if n < 2:
        return {"skipped": f"{n} case(s) of the split have a report; retrieval needs at least 2"}, []
    image = encoded["image_emb"][mask].numpy().astype(np.float64)
    text = encoded["text_emb"][mask].numpy().astype(np.float64)
    i2t = pool_recall(image, text, POOL_SIZES, K_VALUES, n_pools=N_POOLS, seed=POOL_SEED, direction="i2t")
    t2i = pool_recall(image, text, POOL_SIZES, K_VALUES, n_pools=N_POOLS, seed=POOL_SEED, direction="t2i")
    full_i2t = recall_at_k(image @ text.T, K_VALUES)
    full_t2i = recall_at_k(text @ image.T, K_VALUES)
    section: dict[str, Any] = {
        "direction": "image -> report (headline keys); both under image_to_report / report_to_image",
        **i2t,
        "image_to_report": dict(i2t),
        "report_to_image": dict(t2i),
        "full_set": {"image_to_report": full_i2t, "report_to_image": full_t2i, "candidates": n},
        "pairs": n,
        "n_pools": N_POOLS,
        "pool_seed": POOL_SEED,
        "chance": {**{f"r{k}_pool{p}": min(k, p) / p for p in POOL_SIZES for k in K_VALUES},
                   **{f"r{k}_full": min(k, n) / n for k in K_VALUES}},
    }
    if "section_emb" in encoded and "section_text_emb" in encoded:
        from volumevlm.models.anatomy import anatomy_retrieval_vectors

        image_a = anatomy_retrieval_vectors(encoded["image_emb"][mask], encoded["section_emb"][mask]).double().numpy()
        text_a = anatomy_retrieval_vectors(encoded["text_emb"][mask], encoded["section_text_emb"][mask]).double().numpy()
        section["anatomy"] = {
            "score": "mean of the global cosine and the organ-system sections' mean cosine (anatomy head)",
            **pool_recall(image_a, text_a, POOL_SIZES, K_VALUES, n_pools=N_POOLS, seed=POOL_SEED, direction="i2t"),
            "report_to_image": pool_recall(image_a, text_a, POOL_SIZES, K_VALUES, n_pools=N_POOLS, seed=POOL_SEED,
                                           direction="t2i"),
            "full_set": {"image_to_report": recall_at_k(image_a @ text_a.T, K_VALUES),
                         "report_to_image": recall_at_k(text_a @ image_a.T, K_VALUES)},
        }
    if any(v is None for v in i2t.values()):
        section["note"] = f"pools larger than the {n} cases of the split are None"
    plots = []
    for name, pools, full, label in (("retrieval", i2t, full_i2t, "image -> report"),
                                     ("retrieval_t2i", t2i, full_t2i, "report -> image")):
        # The whole split is one more pool: the largest one.
        results = {**{k: v for k, v in pools.items() if not k.endswith(f"_pool{n}")},
                   **{f"{key}_pool{n}": value for key, value in full.items()}}
        plots.append(str(plot_retrieval_recall(results, out / PLOTS[name], title=f"Retrieval recall@k, {label}",
                                               synthetic=synthetic)))
    return section, plots


TEXT_RETRIEVAL_K = 10
TEXT_BATCH = 64


@torch.no_grad()
def _encode_texts(model, texts: Sequence[str]) -> torch.Tensor:
    """Unit text embeddings [N, E], in batches, as ``volumevlm index build`` embeds entries
    (``model.encode_text`` of each text, eval mode)."""
    was_training = model.training
    model.eval()
    try:
        parts = [model.encode_text(list(texts[lo:lo + TEXT_BATCH])).float().cpu() for lo in range(0, len(texts), TEXT_BATCH)]
    finally:
        model.train(was_training)
    return torch.cat(parts)


def text_retrieval_section(model, rows, queries: Any = None, k: int = TEXT_RETRIEVAL_K) -> dict[str, Any]:
    """Text -> report-section retrieval with free-phrased queries per finding
    (:mod:`volumevlm.text.queries`; ``queries``: a QuerySet, a bundled name or a YAML path,
    None for the bundled set of the model's findings), judged by the findings labeler.

    Corpus: the organ-system sections of the evaluated cases' reports, each "HEADER: text"
    (:func:`volumevlm.text.sections.report_sections`, what ``volumevlm index build
    --sections`` indexes), embedded with the model's text tower. Each section is read by
    the labeler on its own; one it reads as stating a finding present is a hit for that
    finding's positive queries and a miss-to-avoid for its negated ones. The figures are
    :func:`volumevlm.metrics.text_retrieval_precision`."""
    from volumevlm.data.datasets import case_report
    from volumevlm.metrics import text_retrieval_precision
    from volumevlm.text.labeler import POSITIVE, label_findings, resolve_findings
    from volumevlm.text.queries import QuerySet, load_query_set, query_set_for
    from volumevlm.text.sections import report_sections

    if getattr(model, "text", None) is None or not callable(getattr(model, "encode_text", None)):
        return {"skipped": "the checkpoint has no text tower"}
    if queries is None:
        query_set = query_set_for(model.findings)
    else:
        query_set = queries if isinstance(queries, QuerySet) else load_query_set(queries)
    if query_set is None:
        return {"skipped": "no bundled text-retrieval queries for the checkpoint's findings (give --text-queries FILE)"}
    reports = [report for report in (case_report(row) for row in rows) if report is not None]
    if not reports:
        return {"skipped": "no case of the split has a report (the corpus is their sections)"}
    corpus = [section for report in reports for section in report_sections(report)]
    names = query_set.keys
    labeler_keys = {name: resolve_findings([name])[0] for name in names}
    readings = [label_findings(section, list(dict.fromkeys(labeler_keys.values()))) for section in corpus]
    positive = np.array([[reading.get(labeler_keys[name]) == POSITIVE for name in names] for reading in readings])
    asked = [(name, text, False) for name, text in query_set.queries("positive")]
    asked += [(name, text, True) for name, text in query_set.queries("negated")]
    corpus_emb = _encode_texts(model, corpus)
    query_emb = _encode_texts(model, [text for _, text, _ in asked])
    figures = text_retrieval_precision(query_emb, corpus_emb, [a[0] for a in asked], [a[2] for a in asked], positive,
                                       names, k=k)
    per_query = []
    for (name, text, negated), result in zip(asked, figures.pop("per_query")):
        top = corpus[result["top"][0]]
        per_query.append({"finding": name, "query": text, "negated": negated, "value": result["value"],
                          "k": result["k"], "top_hit": top,
                          "top_hit_reading": readings[result["top"][0]].get(labeler_keys[name])})
    return {
        **figures,
        "queries": len([a for a in asked if not a[2]]),
        "negated_queries": len([a for a in asked if a[2]]),
        "query_set": query_set.name,
        "corpus_sections": len(corpus),
        "reports": len(reports),
        "k": k,
        "definition": (f"positive queries: share of sections the labeler reads as stating the finding among the top "
                       f"min({k}, positives); negated queries: share of such sections among the top {k}; "
                       "means over each finding's queries, then over findings with a positive section"),
        "per_query": per_query,
    }


def segmentation_section(model, rows, out: Path, synthetic: bool, progress=None) -> tuple[dict[str, Any], list[str]]:
    """Per-case masks in each case's own geometry against its label map there."""
    import nibabel as nib

    from volumevlm.data.datasets import load_case_volume
    from volumevlm.eval.plots import plot_dice_boxplot, plot_segmentation_overlay
    from volumevlm.io import check_same_geometry
    from volumevlm.metrics import dice_per_label, hd95_per_label
    from volumevlm.models.segmentation import segment_to_input

    net = model.head("segmentation")
    labelled = [row for row in rows if row.get("label")]
    if not labelled:
        return {"skipped": "no case of the split has a label map"}, []
    names = {k: v for k, v in sorted(net.config.label_names.items()) if k != 0}
    task = progress.add_task("segmentation", total=len(labelled)) if progress else None
    dice_cases: dict[str, list[float | None]] = {name: [] for name in names.values()}
    hd_cases: dict[str, list[float | None]] = {name: [] for name in names.values()}
    plots: list[str] = []
    for index, row in enumerate(labelled):
        volume = load_case_volume(row, "image")
        truth = load_case_volume(row, "label")
        check_same_geometry(volume, truth)
        mask, _ = segment_to_input(net, volume, model.preprocess)
        pred = np.asarray(mask.dataobj)
        dice = dice_per_label(pred, truth.array, names)
        hd95 = hd95_per_label(pred, truth.array, names, volume.spacing)
        for name in names.values():
            dice_cases[name].append(dice[name])
            hd_cases[name].append(hd95[name])
        if index == 0:
            # Drawn in RAS+ (what the overlay's axis conventions assume), whatever the file's order.
            image_ras = nib.as_closest_canonical(volume.to_nifti())
            mask_ras = nib.as_closest_canonical(nib.Nifti1Image(pred, volume.affine))
            plots.append(str(plot_segmentation_overlay(
                image_ras.get_fdata(dtype=np.float32), np.asarray(mask_ras.dataobj), out / PLOTS["overlay"], names,
                title=f"Segmentation overlay, case {row.get('id')} (prediction)", synthetic=synthetic,
                spacing_mm=image_ras.header.get_zooms()[:3],
            )))
        if progress is not None:
            progress.advance(task, 1)
    per_label: dict[str, Any] = {}
    for name in names.values():
        dices = [d for d in dice_cases[name] if d is not None]
        distances = [h for h in hd_cases[name] if h is not None]
        finite = [h for h in distances if math.isfinite(h)]
        if not dices:
            continue  # absent from every case, predicted nowhere
        per_label[name] = {
            "dice": float(np.mean(dices)),
            "dice_std": float(np.std(dices)),
            "hd95_mm": _mean(finite),
            "cases": len(dices),
            # Present in only one of prediction and truth: no surface to measure to.
            "hd95_undefined_cases": len(distances) - len(finite),
        }
    section = {
        "mean_dice": _mean(v["dice"] for v in per_label.values()),
        "mean_hd95_mm": _mean(v["hd95_mm"] for v in per_label.values()),
        "per_label": per_label,
        "cases": len(labelled),
        "labels_scored": len(per_label),
        "geometry": "each case's own voxel grid (masks brought back through the inverse preprocessing)",
    }
    plots.insert(0, str(plot_dice_boxplot({n: dice_cases[n] for n in per_label}, out / PLOTS["dice"],
                                          title=f"Dice per label ({len(labelled)} cases)", synthetic=synthetic)))
    return section, plots


def report_section(model, encoded, rows, out: Path) -> dict[str, Any]:
    from volumevlm.io.writers import write_text_atomic
    from volumevlm.metrics.report import findings_efficacy, present_findings, report_metrics
    from volumevlm.text.labeler import scored_findings

    head = model.head("report")
    keep = [i for i, flag in enumerate(encoded["has_report"].tolist()) if flag]
    if not keep:
        return {"skipped": "no case of the split has a reference report"}
    generated = [encoded["generated"][i] for i in keep]
    references = [head.reference_text(rows[i]["report"]) for i in keep]
    scored = scored_findings(model.findings)
    figures = report_metrics(generated, references, findings=scored)
    samples = [{"id": str(rows[i].get("id", i)), "reference": ref, "generated": gen}
               for i, ref, gen in zip(keep, references, generated)]
    oracle = encoded.get("generated_from_true_findings") or []
    if oracle:
        # Written from the true report's findings (the labeler's reading), not the image's calls.
        from_truth = [oracle[i] for i in keep]
        figures["from_true_findings"] = dict(report_metrics(from_truth, references, findings=scored))
        for sample, text in zip(samples, from_truth):
            sample["generated_from_true_findings"] = text
    calls = encoded.get("findings_calls") or []
    if calls:
        # The image's calls scored as a report's findings would be: what a decoder that
        # wrote exactly its calls would reach, so the F1 lost to the calls and the F1 lost
        # to the decoder can be told apart.
        keys = [k for k in (scored or head.config.findings) if k in set(head.config.findings)]
        case_calls = [set(calls[i]) for i in keep]
        efficacy = findings_efficacy(case_calls, [present_findings(r, keys) for r in references], keys)
        figures["calls"] = {"clinical_f1": efficacy["macro_f1"], "clinical_f1_micro": efficacy["micro_f1"],
                            "findings_scored": efficacy["findings_scored"]}
        for sample, case in zip(samples, case_calls):
            sample["calls"] = sorted(case)
    banked = encoded.get("bank_sections") or []
    if banked:
        # How much of the text the decoder wrote itself: a section whose candidates all
        # stated a finding wrongly came from the section bank (bank_fallback).
        sections = len(head.config.section_names)
        figures["bank_sections"] = {"share": sum(len(banked[i]) for i in keep) / (sections * len(keep)),
                                    "sections_per_report": sections}
        oracle_banked = encoded.get("bank_sections_from_true_findings") or []
        if oracle and oracle_banked:
            figures["from_true_findings"]["bank_sections"] = {
                "share": sum(len(oracle_banked[i] or []) for i in keep) / (sections * len(keep)),
                "sections_per_report": sections}
        for sample, i in zip(samples, keep):
            sample["bank_sections"] = banked[i]
    write_text_atomic(out / SAMPLES_NAME, "\n".join(json.dumps(s) for s in samples) + "\n")
    return {**figures, "cases": len(keep), "samples": SAMPLES_NAME}


def label_efficiency_section(runs: Sequence[str | Path], out: Path, synthetic: bool) -> tuple[dict[str, Any], str | None]:
    """Mean Dice against label fraction from segmentation runs' metrics.json files."""
    from volumevlm.eval.plots import plot_label_efficiency

    if not runs:
        return {"skipped": "no segmentation runs given (--label-efficiency RUN_DIR ...)"}, None
    points = []
    for run in runs:
        path = Path(run)
        path = path / METRICS_NAME if path.is_dir() else path
        try:
            summary = json.loads(path.read_text())
            fraction = float(summary["data"]["label_fraction"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InputError(path, f"not a segmentation run's metrics.json ({type(err).__name__}: {err})") from None
        metrics = summary.get("metrics") or {}
        key = "test/mean_dice" if metrics.get("test/mean_dice") is not None else "val/mean_dice"
        if metrics.get(key) is None:
            raise InputError(path, "holds no test/mean_dice or val/mean_dice (was the run's final validation skipped?)")
        points.append((fraction, float(metrics[key]), key, str(path)))
    points.sort()
    section = {
        "label_fraction": [p[0] for p in points],
        "mean_dice": [p[1] for p in points],
        "metric": sorted({p[2] for p in points}),
        "runs": [p[3] for p in points],
    }
    plot = str(plot_label_efficiency([p[0] for p in points], [p[1] for p in points], out / PLOTS["label_efficiency"],
                                     synthetic=synthetic))
    return section, plot


# ---------------------------------------------------------------------- the run


def evaluate(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    split: str = "test",
    prompts: Any = None,
    batch_size: int = 8,
    cache_dir: str | Path | None = None,
    label_efficiency: Sequence[str | Path] = (),
    device: str | None = None,
    progress: bool = True,
    command: str | None = None,
    visible_codes: str | None = None,
    text_queries: Any = None,
) -> dict[str, Any]:
    """Run every protocol (see the module docstring); write ``out/metrics.json`` and the
    plots; return the metrics dict (as written)."""
    import volumevlm
    from volumevlm.io.writers import write_text_atomic
    from volumevlm.models.vlm import VolumeVLM
    from volumevlm.text.queries import load_query_set

    started = time.perf_counter()
    if int(batch_size) < 1:
        raise VolumeVLMError(f"--batch-size: must be at least 1, got {batch_size}")
    data, out = Path(data).expanduser(), Path(out).expanduser()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = VolumeVLM.from_pretrained(checkpoint, device=device)  # what volumevlm.load does
    rows = read_split(data, split)
    synthetic = is_synthetic(data, rows)
    # A bad --text-queries file is reported before the long encoding pass, not after it.
    query_set = load_query_set(text_queries) if text_queries is not None else None
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    plots: list[str] = []
    metrics: dict[str, Any] = {}

    with _progress(progress) as bar:
        t0 = time.perf_counter()
        encoded = encode_cases(model, rows, batch_size, cache_dir=cache_dir, progress=bar,
                               generate=model.has_head("report"))
        timings["encode_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        metrics["zero_shot"], plot = zero_shot_section(model, encoded, rows, prompts, out, synthetic)
        plots += [plot] if plot else []
        metrics["zero_shot_anatomy"] = zero_shot_anatomy_section(model, encoded, rows, prompts)
        metrics["phenotypes"] = phenotype_section(model, encoded, rows, visible_phecodes(visible_codes, synthetic))
        metrics["retrieval"], more = retrieval_section(encoded, out, synthetic)
        plots += more
        timings["zero_shot_phenotypes_retrieval_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        metrics["text_retrieval"] = text_retrieval_section(model, rows, query_set)
        timings["text_retrieval_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        metrics["linear_probe"], metrics["organ_probe"], metrics["baseline"] = probe_sections(
            model, encoded, rows, data, split, batch_size, cache_dir=cache_dir, progress=bar)
        timings["probes_s"] = time.perf_counter() - t0

        if model.has_head("segmentation"):
            t0 = time.perf_counter()
            metrics["segmentation"], more = segmentation_section(model, rows, out, synthetic, progress=bar)
            plots += more
            timings["segmentation_s"] = time.perf_counter() - t0
        else:
            metrics["segmentation"] = {"skipped": f"no segmentation head in {checkpoint}"}
    if model.has_head("report"):
        metrics["report"] = report_section(model, encoded, rows, out)
    else:
        metrics["report"] = {"skipped": f"no report head in {checkpoint}"}
    metrics["label_efficiency"], plot = label_efficiency_section(label_efficiency, out, synthetic)
    plots += [plot] if plot else []

    split_counts: dict[str, int] = {}
    for row in rows:
        split_counts[str(row.get("split"))] = split_counts.get(str(row.get("split")), 0) + 1
    result = {
        **metrics,
        "checkpoint": str(Path(checkpoint).expanduser().resolve()),
        "data": str(data.resolve()),
        "split": split,
        "split_counts": split_counts,
        "n_cases": len(rows),
        "heads": sorted(name for name in ("segmentation", "report", "anatomy") if model.has_head(name)),
        "device": device_description(model.device),
        "versions": package_versions("volumevlm", "torch", "monai", "transformers", "numpy"),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command or _default_command(checkpoint, data, out, split, prompts, batch_size, text_queries),
        "plots": sorted(Path(p).name for p in plots),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "elapsed_s": round(time.perf_counter() - started, 1),
        "note": (f"{SYNTHETIC_NOTE}. " if synthetic else "") + volumevlm.NOT_FOR_CLINICAL_USE,
    }
    if synthetic:
        result["synthetic"] = SYNTHETIC_NOTE
    result = _clean(result)
    write_text_atomic(out / METRICS_NAME, json.dumps(result, indent=2, allow_nan=False) + "\n")
    return result


def _default_command(checkpoint, data, out, split, prompts, batch_size, text_queries=None) -> str:
    parts = ["volumevlm", "evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out),
             "--split", str(split), "--batch-size", str(batch_size)]
    if isinstance(prompts, str):
        parts += ["--prompts", prompts]
    if isinstance(text_queries, (str, os.PathLike)):
        parts += ["--text-queries", os.fspath(text_queries)]
    return shlex.join(parts)


# ---------------------------------------------------------------------- the table


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


def _fmt_ci(value: Any, interval: Any) -> str:
    """A figure with its 95% bootstrap interval over cases, when there is one."""
    if value is None or not interval:
        return _fmt(value)
    return f"{_fmt(value)} [{interval[0]:.2f}, {interval[1]:.2f}]"


def format_table(metrics: Mapping[str, Any]) -> str:
    """The headline figures as aligned lines with chance levels where they exist."""
    rows: list[tuple[str, str, str]] = []
    zs, ph, rt = metrics.get("zero_shot", {}), metrics.get("phenotypes", {}), metrics.get("retrieval", {})
    seg, rep = metrics.get("segmentation", {}), metrics.get("report", {})
    if "skipped" not in zs:
        rows.append((f"zero-shot AUROC (macro, {zs.get('findings_scored')} findings) [95% CI]",
                     _fmt_ci(zs.get("macro_auroc"), zs.get("macro_auroc_ci95")), "0.500"))
    za = metrics.get("zero_shot_anatomy", {})
    if za and "skipped" not in za:
        rows.append((f"zero-shot AUROC, organ-system embeddings ({za.get('findings_scored')} findings) [95% CI]",
                     _fmt_ci(za.get("macro_auroc"), za.get("macro_auroc_ci95")), "0.500"))
    probe, voxel = metrics.get("linear_probe", {}), metrics.get("baseline", {}).get("voxel_probe", {})
    if probe and "skipped" not in probe:
        rows.append((f"linear probe AUROC (image embeddings, {probe.get('findings_scored')} findings) [95% CI]",
                     _fmt_ci(probe.get("macro_auroc"), probe.get("macro_auroc_ci95")), "0.500"))
    if voxel and "skipped" not in voxel:
        rows.append((f"voxel probe AUROC (baseline, no model, {voxel.get('findings_scored')} findings) [95% CI]",
                     _fmt_ci(voxel.get("macro_auroc"), voxel.get("macro_auroc_ci95")), "0.500"))
    organ, organ_voxel = metrics.get("organ_probe", {}), metrics.get("baseline", {}).get("organ_voxel_probe", {})
    if organ and "skipped" not in organ:
        rows.append((f"organ probe AUROC (tokens in the model's organs, {organ.get('findings_scored')} findings) [95% CI]",
                     _fmt_ci(organ.get("macro_auroc"), organ.get("macro_auroc_ci95")), "0.500"))
    if organ_voxel and "skipped" not in organ_voxel:
        rows.append(("organ voxel probe AUROC (baseline, HU in the same organs) [95% CI]",
                     _fmt_ci(organ_voxel.get("macro_auroc"), organ_voxel.get("macro_auroc_ci95")), "0.500"))
    if "skipped" not in ph:
        rows.append((f"phenotype AUROC (macro, {ph.get('codes_scored')} codes) [95% CI]",
                     _fmt_ci(ph.get("macro_auroc"), ph.get("macro_auroc_ci95")), "0.500"))
        if ph.get("image_visible_codes_scored"):
            rows.append((f"phenotype AUROC (macro, {ph['image_visible_codes_scored']} image-visible codes) [95% CI]",
                         _fmt_ci(ph.get("macro_auroc_image_visible"), ph.get("macro_auroc_image_visible_ci95")), "0.500"))
        organ_codes = ph.get("anatomy") or {}
        if organ_codes.get("image_visible_codes_scored"):
            rows.append((f"phenotype AUROC, organ features ({organ_codes['image_visible_codes_scored']} image-visible "
                         "codes) [95% CI]", _fmt_ci(organ_codes.get("macro_auroc_image_visible"),
                                                    organ_codes.get("macro_auroc_image_visible_ci95")), "0.500"))
    if "skipped" not in rt:
        for direction, label in (("image_to_report", "image->report"), ("report_to_image", "report->image")):
            values = rt.get(direction, {})
            for pool in POOL_SIZES[:1]:
                rows.append((f"{label} R@1 / R@5 (pool {pool})",
                             f"{_fmt(values.get(f'r1_pool{pool}'))} / {_fmt(values.get(f'r5_pool{pool}'))}",
                             f"{1 / pool:.3f} / {5 / pool:.3f}"))
            full = rt.get("full_set", {}).get(direction, {})
            n = rt.get("pairs") or 1
            rows.append((f"{label} R@1 / R@5 (all {n})", f"{_fmt(full.get('r1'))} / {_fmt(full.get('r5'))}",
                         f"{min(1, n) / n:.3f} / {min(5, n) / n:.3f}"))
        anatomy_rt = rt.get("anatomy") or {}
        if anatomy_rt:
            rows.append(("image->report R@1 / R@5 (pool 32), global + organ-system embeddings",
                         f"{_fmt(anatomy_rt.get('r1_pool32'))} / {_fmt(anatomy_rt.get('r5_pool32'))}",
                         f"{1 / 32:.3f} / {5 / 32:.3f}"))
    tr = metrics.get("text_retrieval", {})
    if tr and "skipped" not in tr:
        chance = tr.get("chance") or {}
        k = tr.get("k", 10)
        rows.append((f"text->section precision@{k} ({tr.get('findings_scored')} findings, {tr.get('queries')} queries)",
                     _fmt(tr.get(f"precision_at_{k}")), _fmt(chance.get(f"precision_at_{k}"))))
        rows.append((f"text->section positives in top {k}, negated queries (lower is better)",
                     _fmt(tr.get(f"negated_positive_rate_at_{k}")), _fmt(chance.get(f"negated_positive_rate_at_{k}"))))
    if "skipped" not in seg:
        rows.append((f"segmentation mean Dice ({seg.get('labels_scored')} labels)", _fmt(seg.get("mean_dice")), "-"))
        hd = seg.get("mean_hd95_mm")
        rows.append(("segmentation mean HD95 (mm)", "n/a" if hd is None else f"{hd:.1f}", "-"))
    if "skipped" not in rep:
        rows.append(("report clinical F1 (macro)", _fmt(rep.get("clinical_f1")), "-"))
        if "from_true_findings" in rep:
            rows.append(("report clinical F1, true findings given", _fmt(rep["from_true_findings"].get("clinical_f1")), "-"))
        if "calls" in rep:
            rows.append(("findings calls' F1 (a decoder writing exactly its calls)", _fmt(rep["calls"].get("clinical_f1")), "-"))
        if "bank_sections" in rep:
            rows.append(("report sections taken from the section bank", _fmt(rep["bank_sections"].get("share")), "-"))
        rows.append(("report BLEU-4 / ROUGE-L", f"{_fmt(rep.get('bleu4'))} / {_fmt(rep.get('rouge_l'))}", "-"))
        rows.append(("report distinct ratio", _fmt(rep.get("distinct_ratio")), "-"))
    sections = {name: metrics.get(name, {}) for name in ("zero_shot", "zero_shot_anatomy", "linear_probe", "organ_probe", "phenotypes",
                                                          "retrieval", "text_retrieval", "segmentation", "report")}
    sections["baseline.voxel_probe"] = metrics.get("baseline", {}).get("voxel_probe", {})
    for name, section in sections.items():
        if "skipped" in section:
            rows.append((f"{name}", "skipped", section["skipped"]))
    width = max([len(r[0]) for r in rows] + [6])
    value_width = max([len(r[1]) for r in rows if r[1] != "skipped"] + [5])
    lines = [f"{'metric':<{width}}  {'value':>{value_width}}  chance"]
    for name, value, chance in rows:
        if value == "skipped":
            lines.append(f"{name:<{width}}  {'skipped':>{value_width}}  ({chance})")
        else:
            lines.append(f"{name:<{width}}  {value:>{value_width}}  {chance}")
    header = f"{metrics.get('n_cases')} cases of split {metrics.get('split')!r}"
    if metrics.get("synthetic"):
        header += f" ({SYNTHETIC_NOTE})"
    return header + "\n" + "\n".join(lines)


# ---------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (volumevlm.load opens it)")
    parser.add_argument("--data", required=True, type=Path, help="cohort folder holding manifest.jsonl")
    parser.add_argument("--out", required=True, type=Path, help="output folder: metrics.json and plots")
    parser.add_argument("--split", default="test", help="split to evaluate, or several joined by commas (default: test)")
    parser.add_argument("--prompts", default=None,
                        help="zero-shot prompt set: a bundled name (synthetic, merlin30, ctrate18) or a YAML path "
                             "(default: the checkpoint's, else synthetic)")
    parser.add_argument("--batch-size", type=int, default=8, help="cases per encoder batch (default 8)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="persistent cache of preprocessed volumes (e.g. a training run's OUT/cache)")
    parser.add_argument("--label-efficiency", nargs="+", default=[], metavar="RUN",
                        help="segmentation runs' output folders (or metrics.json files), one per label fraction, "
                             "for label_efficiency.png")
    parser.add_argument("--visible-phecodes", default=None, metavar="CODES|FILE",
                        help="phecodes an image can show, comma-separated or a file with one per line, scored as "
                             "phenotypes.macro_auroc_image_visible (default: the synthetic cohort's own)")
    parser.add_argument("--text-queries", default=None, metavar="NAME|YAML",
                        help="free-phrased text-retrieval queries per finding: a finding set's bundled queries "
                             "(synthetic) or a YAML file (default: the bundled set of the checkpoint's findings)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    command = "volumevlm " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["evaluate"] else None
    metrics = evaluate(
        args.checkpoint, args.data, args.out, split=args.split, prompts=args.prompts, batch_size=args.batch_size,
        cache_dir=args.cache_dir, label_efficiency=args.label_efficiency, device=args.device,
        progress=not args.no_progress, command=command, visible_codes=args.visible_phecodes,
        text_queries=args.text_queries,
    )
    print(format_table(metrics))
    print(f"metrics: {Path(args.out) / METRICS_NAME}; plots: {', '.join(metrics['plots']) or 'none'}")
    return 0
