"""Features pooled inside the organs the model segments itself.

Why: a CT's findings are small and local (a stone in a kidney, calcium in the aorta, a
lesion in the liver), and a mean over the whole body washes them out. A global embedding
of the demo's encoder reads the 18 synthetic findings no better than a probe on pooled
voxels; the same frozen tokens averaged inside each organ of the model's own segmentation
read them far better (docs/learning.md). So wherever the model has a segmentation head,
its findings classifiers can look where a radiologist looks.

``organ_labels``      the segmentation head's argmax on the grid the encoder reads.
``organ_token_means`` the encoder's grid tokens averaged inside each organ [B, K, C].
``organ_histograms``  model-free companions: each organ's share of the volume and the HU
                      histogram of its voxels [B, K, 1 + bins] (the organ-wise counterpart
                      of the voxel probe, :mod:`volumevlm.eval.probes`), by one of the
                      :data:`ORGAN_STATISTICS` recipes.

K = the segmentation head's classes minus background (label 0). An organ the head does
not find in a case gives zeros, so the feature vector keeps its layout.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from volumevlm.errors import VolumeVLMError

# How each organ's voxels are summarised (the model-free half of the organ features):
# "hu_fine_dilated" (the default): the organ's mask grown by one voxel in every direction,
#   so what the segmentation leaves just outside or inside the organ still counts (a stone,
#   a cyst or a dilated renal pelvis the head labels background, calcium in the aortic
#   wall), binned at ORGAN_HU_EDGES: 10-25 HU wide over soft tissue, where fluid, fat,
#   parenchyma and a hypodense lesion differ, coarse elsewhere. On the demo's held-out
#   cases a probe on these reads the findings at 0.838 vs 0.777 for "hu16"
#   (docs/research-log.md).
# "hu16": the mask as segmented, 16 equal bins over the window (125 HU each, so fluid and
#   parenchyma share a bin): heads fitted before "hu_fine_dilated" existed.
# "hu_fine_dilated_sqrt": "hu_fine_dilated" with every value (share and bin fractions)
#   replaced by its square root. A stone or a small lesion moves a bin's fraction from 0 to
#   a few thousandths, which a linear classifier on standardised features barely weighs
#   against the large bins' case-to-case spread; the root spreads small fractions apart.
#   The demo's report head's calls: held-out F1 0.598 -> 0.617 (seed-1 cohort 0.597 ->
#   0.624; docs/research-log.md).
ORGAN_STATISTICS = ("hu_fine_dilated", "hu16", "hu_fine_dilated_sqrt")
DEFAULT_ORGAN_STATISTICS = "hu_fine_dilated"
LEGACY_ORGAN_STATISTICS = "hu16"  # what a saved head without the setting used
ORGAN_HU_BINS = 16
ORGAN_HU_EDGES = (-1000.0, -600.0, -300.0, -150.0, -80.0, -40.0, -15.0, 0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                  70.0, 80.0, 90.0, 100.0, 115.0, 130.0, 150.0, 175.0, 200.0, 250.0, 300.0, 400.0, 550.0, 700.0,
                  850.0, 1000.0)
ORGAN_DILATION = 1  # voxels
NO_PHENOTYPES = ("anatomy head: fitted without phecodes, so it predicts no phenotypes; refit it with "
                 "volumevlm train experiment=report_demo init_from=CKPT data.root=DIR on a cohort whose training "
                 "cases carry codes")


@torch.no_grad()
def organ_labels(segmentation: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """int64 [B, X, Y, Z]: the argmax of ``segmentation`` (a SegmentationNet, run once in
    eval mode, without autograd) on preprocessed images float [B, 1, X, Y, Z] in [0, 1].
    The images are the ones the encoder reads (the centre pad/crop), not the whole field
    the mask verbs segment, so the labels line up with the encoder's token grid."""
    if images.ndim != 5 or images.shape[1] != 1:
        raise VolumeVLMError(f"organ labels: images must be [B, 1, X, Y, Z], got {list(images.shape)}")
    was_training = segmentation.training
    segmentation.eval()
    try:
        device = next(segmentation.parameters()).device
        return segmentation(images.to(device, dtype=torch.float32)).argmax(dim=1).to(images.device)
    finally:
        segmentation.train(was_training)


def _fingerprint(module: nn.Module) -> str:
    """sha1 of a module's weights (computed once per module object): the organs it finds."""
    cached = getattr(module, "_organ_fingerprint", None)
    if cached is None:
        digest = hashlib.sha1()
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        cached = digest.hexdigest()[:16]
        module._organ_fingerprint = cached
    return cached


@torch.no_grad()
def cached_organ_labels(segmentation: nn.Module, images: torch.Tensor, cache_dir=None) -> torch.Tensor:
    """:func:`organ_labels`, kept on disk under ``cache_dir/organs-<weights sha1>/``, one
    compressed uint8 file per image named by the sha1 of its voxels: the report task and
    ``volumevlm evaluate`` segment the same training cases, and the second pass reads the
    first's labels (about 0.2 s of CPU per case saved). Without ``cache_dir``, no cache."""
    if cache_dir is None or segmentation.config.num_classes > 256:
        return organ_labels(segmentation, images)
    folder = Path(cache_dir) / f"organs-{_fingerprint(segmentation)}"
    keys = [hashlib.sha1(image.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest() for image in images]
    found: dict[int, torch.Tensor] = {}
    for i, key in enumerate(keys):
        path = folder / f"{key}.npz"
        if path.is_file():
            try:
                with np.load(path) as data:
                    found[i] = torch.from_numpy(data["labels"].astype(np.int64))
            except (OSError, ValueError, KeyError):  # a damaged entry is recomputed
                pass
    missing = [i for i in range(len(keys)) if i not in found or found[i].shape != images.shape[2:]]
    if missing:
        computed = organ_labels(segmentation, images[missing])
        folder.mkdir(parents=True, exist_ok=True)
        for i, labels in zip(missing, computed):
            found[i] = labels.cpu()
            handle, tmp = tempfile.mkstemp(dir=folder, suffix=".npz.tmp")
            with os.fdopen(handle, "wb") as file:
                np.savez_compressed(file, labels=labels.cpu().numpy().astype(np.uint8))
            os.replace(tmp, folder / f"{keys[i]}.npz")
    return torch.stack([found[i] for i in range(len(keys))]).to(images.device)


def _organ_masks(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    if labels.ndim != 4:
        raise VolumeVLMError(f"organ features: labels must be [B, X, Y, Z], got {list(labels.shape)}")
    if num_classes < 2:
        raise VolumeVLMError(f"organ features: need background and at least one organ, got {num_classes} classes")
    return F.one_hot(labels.long().clamp(0, num_classes - 1), num_classes).permute(0, 4, 1, 2, 3)[:, 1:].float()


def organ_token_means(tokens: torch.Tensor, grid: Sequence[int], labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Encoder grid tokens averaged inside each organ: float [B, K, C].

    tokens [B, N (+ R), C] x-major over ``grid`` = (gx, gy, gz) (registers after the grid
    are left out); labels int [B, X, Y, Z] on the image grid the tokens were computed from.
    Each token weighs by the share of its cell that the organ fills (the label map
    average-pooled onto the token grid), so a token half inside the liver counts half."""
    gx, gy, gz = (int(g) for g in grid)
    n = gx * gy * gz
    if tokens.ndim != 3 or tokens.shape[1] < n or tokens.shape[0] != labels.shape[0]:
        raise VolumeVLMError(f"organ features: tokens {list(tokens.shape)} do not match grid {list(grid)} "
                             f"and labels {list(labels.shape)}")
    masks = _organ_masks(labels.to(tokens.device), num_classes)
    weights = F.adaptive_avg_pool3d(masks, (gx, gy, gz)).flatten(2)  # [B, K, N]
    grid_tokens = tokens[:, :n].float()
    total = weights.sum(dim=-1, keepdim=True)
    return torch.bmm(weights, grid_tokens) / total.clamp_min(1e-6) * (total > 0)


def check_organ_statistics(statistics: str) -> str:
    if statistics not in ORGAN_STATISTICS:
        raise VolumeVLMError(f"organ statistics must be one of {list(ORGAN_STATISTICS)}, got {statistics!r}")
    return statistics


def organ_statistics_width(statistics: str = DEFAULT_ORGAN_STATISTICS) -> int:
    """Width of one organ's row of :func:`organ_histograms`: its share of the volume, then its bins."""
    bins = ORGAN_HU_BINS if check_organ_statistics(statistics) == "hu16" else len(ORGAN_HU_EDGES) - 1
    return 1 + bins


def organ_histograms(images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     statistics: str = DEFAULT_ORGAN_STATISTICS, hu_window: Sequence[float] | None = None) -> torch.Tensor:
    """Model-free organ statistics: float [B, K, 1 + bins] (:func:`organ_statistics_width`):
    each organ's share of the voxels, then the fraction of its voxels in each intensity bin.

    images: preprocessed float [B, 1, X, Y, Z] in [0, 1], the window ``hu_window`` = (low,
    high) HU mapped onto [0, 1] (needed by "hu_fine_dilated", whose bins are in HU; a bin
    outside the window stays empty). ``statistics``: "hu_fine_dilated" (the organ's mask
    grown by :data:`ORGAN_DILATION` voxels, bins at :data:`ORGAN_HU_EDGES`),
    "hu_fine_dilated_sqrt" (the same, every value's square root) or "hu16" (the
    mask as segmented, 16 equal bins over [0, 1]); a value at a bin's upper edge counts in
    the next bin, the top edge in the last. An organ absent from a case gives zeros."""
    check_organ_statistics(statistics)
    x = images.float()
    if x.ndim == 5:
        if x.shape[1] != 1:
            raise VolumeVLMError(f"organ histograms: images must be [B, 1, X, Y, Z], got {list(images.shape)}")
        x = x[:, 0]
    if x.shape != labels.shape:
        raise VolumeVLMError(f"organ histograms: images {list(images.shape)} and labels {list(labels.shape)} differ")
    batch, voxels = x.shape[0], math.prod(x.shape[1:])
    values = x.flatten(1).clamp(0.0, 1.0)
    if statistics == "hu16":
        bins = ORGAN_HU_BINS
        label = labels.long().clamp(0, num_classes - 1).flatten(1)
        level = (values * bins).floor().clamp(0, bins - 1).long()
        counts = torch.zeros(batch, num_classes * bins, device=x.device)
        counts.scatter_add_(1, label * bins + level, torch.ones_like(values))
        counts = counts.view(batch, num_classes, bins)[:, 1:]
    else:
        if hu_window is None:
            raise VolumeVLMError(f"organ histograms: {statistics!r} needs the preprocessing's hu_window")
        low, high = float(hu_window[0]), float(hu_window[1])
        inner = (torch.tensor(ORGAN_HU_EDGES[1:-1], device=x.device) - low) / (high - low)
        bins = len(ORGAN_HU_EDGES) - 1
        level = torch.bucketize(values, inner, right=True)  # [B, V]
        size = 2 * ORGAN_DILATION + 1
        masks = F.max_pool3d(_organ_masks(labels.to(x.device), num_classes), size, stride=1, padding=ORGAN_DILATION)
        counts = torch.zeros(batch, num_classes - 1, bins, device=x.device)
        for k in range(num_classes - 1):  # one organ at a time: grown masks overlap
            counts[:, k].scatter_add_(1, level, masks[:, k].flatten(1))
    size = counts.sum(dim=-1, keepdim=True)
    statistics_row = torch.cat([size / voxels, counts / size.clamp_min(1.0)], dim=-1)
    return statistics_row.sqrt() if statistics == "hu_fine_dilated_sqrt" else statistics_row


def organ_histograms_by(images: torch.Tensor, labels: torch.Tensor, num_classes: int, recipes,
                        hu_window: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """:func:`organ_histograms` of several recipes at once, {recipe: [B, K, 1 + bins]}: the
    rooted recipe is the root of its plain one, so the voxels are counted once for both."""
    out: dict[str, torch.Tensor] = {}
    for statistics in sorted(set(recipes), key=lambda r: r.endswith("_sqrt")):  # plain ones first
        plain = statistics.removesuffix("_sqrt")
        if statistics != plain and plain in out:
            out[statistics] = out[plain].sqrt()
        else:
            out[statistics] = organ_histograms(images, labels, num_classes, statistics, hu_window)
    return out


def organ_features(tokens: torch.Tensor, grid: Sequence[int], images: torch.Tensor, labels: torch.Tensor,
                   num_classes: int, statistics: str = DEFAULT_ORGAN_STATISTICS,
                   hu_window: Sequence[float] | None = None) -> torch.Tensor:
    """Per organ of ``labels``, the encoder's token means then the organ's share of the volume
    and HU histogram (:func:`organ_histograms` with ``statistics`` and ``hu_window``):
    float [B, K, C + 1 + bins], what the anatomy head and an ``organs`` findings probe read.
    The HU histograms carry what a token mean loses of a small bright or dark spot (a
    stone, calcium, a cyst) inside the organ."""
    means = organ_token_means(tokens, grid, labels, num_classes)
    histograms = organ_histograms(images, labels, num_classes, statistics, hu_window)
    return torch.cat([means, histograms.to(means.device)], dim=-1)


def section_texts(report: str, sections: Sequence[str]) -> list[str | None]:
    """The text the anatomy head's embedding of each of ``sections`` is fitted to: the
    report's section as "NAME: text" (what the text tower embeds), None where the report
    has none."""
    from volumevlm.text.sections import split_report

    parts = split_report(report)
    return [f"{name}: {parts[name]}" if parts.get(name, "").strip() else None for name in sections]


def report_section_embeddings(model, reports: Sequence[str | None], sections: Sequence[str]) -> torch.Tensor:
    """[B, S, E]: the text tower's unit embedding of each report's ``sections`` (their
    :func:`section_texts`, what the anatomy head's section embeddings are fitted to), zero
    rows where a report has none or is None. ``model``: the VolumeVLM (no autograd here)."""
    out = torch.zeros(len(reports), len(sections), model.embed_dim)
    where = [(i, s, text) for i, report in enumerate(reports) if report is not None
             for s, text in enumerate(section_texts(report, sections)) if text is not None]
    if where:
        with torch.no_grad():
            embedded = model.encode_text([text for _, _, text in where]).float().cpu()
        for (i, s, _), row in zip(where, embedded):
            out[i, s] = row
    return out


def report_retrieval_vectors(model, head: "AnatomyHead", reports: Sequence[str]) -> torch.Tensor:
    """:func:`anatomy_retrieval_vectors` of whole reports (a text without section headers
    is its global embedding alone): what an anatomy retrieval index stores for a report."""
    with torch.no_grad():
        global_emb = model.encode_reports(list(reports)).float().cpu()
    return anatomy_retrieval_vectors(global_emb, report_section_embeddings(model, reports, head.sections))


def anatomy_retrieval_vectors(global_emb: torch.Tensor, section_emb: torch.Tensor) -> torch.Tensor:
    """[N, (1 + S) * E] vectors whose dot product between an image's and a report's is the
    mean of two cosines: of their global embeddings [N, E], and of their organ-system
    embeddings [N, S, E] averaged over the S sections (the anatomy head's for an image, the
    text tower's of each section of the report for a report, zero rows for a section it
    lacks). A small finding is one section's change: the global embedding averages it away
    and the section's embedding keeps it, while the global one still tells cases apart by
    everything else. Unit vectors when every section is present."""
    if global_emb.ndim != 2 or section_emb.ndim != 3 or section_emb.shape[0] != global_emb.shape[0] \
            or section_emb.shape[2] != global_emb.shape[1]:
        raise VolumeVLMError(f"anatomy retrieval: global embeddings {list(global_emb.shape)} and section embeddings "
                             f"{list(section_emb.shape)} do not match ([N, E] and [N, S, E])")
    sections = section_emb.shape[1]
    return torch.cat([F.normalize(global_emb, dim=-1) / math.sqrt(2),
                      (F.normalize(section_emb, dim=-1) / math.sqrt(2 * sections)).flatten(1)], dim=1)


# ---------------------------------------------------------------------- the anatomy head


class AnatomyHead(nn.Module):
    """Organ-system embeddings in the shared image-text space.

    For each report section s (an organ system: "SPLEEN", "KIDNEYS AND URETERS", ...) a
    linear map takes the case's organ features [K, F] (:func:`organ_features`: per organ of
    the model's own segmentation head, the encoder's token means, the organ's share of the
    volume and its HU histogram, by the recipe ``organ_statistics`` names) to the embedding
    its report's section s would have in the text tower: [B, S, E], unit rows. It is fitted by ridge regression
    on the training cases' section embeddings (:func:`volumevlm.train.anatomy.fit_anatomy_head`),
    the text tower frozen, so it learns from report text only, as the contrastive image
    embedding does, but per organ system, where a small finding is not averaged away.

    Zero-shot reads a finding in its own section's embedding (``finding_sections``: the
    section of the training reports that states it most often); a finding without one is
    read in the global image embedding.

    Phenotypes organ by organ (``phecodes``, optional; :meth:`phenotype_logits`), fitted
    on the training cases' codes (:func:`volumevlm.train.anatomy.fit_anatomy_head`). With
    ``phenotype_findings`` they are read through the findings: a logistic regression per
    finding on the organ features (fitted on the labeler's reading of the training
    reports: every case teaches every finding) gives P(finding), and per code a logistic
    regression on those probabilities (fitted on out-of-fold probabilities) gives the
    code; a code is 10-40 noisy positives in a few hundred cases, too few to fit a
    thousand organ features directly. Without them (heads fitted before), per code a
    logistic regression on the organ features. The pretraining's phenotype head reads the
    global embedding, where an organ's code is as diluted as its finding.
    """

    head_type: ClassVar[str] = "anatomy"

    def __init__(self, sections: Sequence[str], finding_sections: dict[str, str], organ_classes: int,
                 feature_dim: int, embed_dim: int, alpha: dict[str, float] | None = None,
                 phecodes: Sequence[str] = (), organ_statistics: str = DEFAULT_ORGAN_STATISTICS,
                 phenotype_findings: Sequence[str] = ()):
        super().__init__()
        self.sections = tuple(str(s) for s in sections)
        if not self.sections or len(set(self.sections)) != len(self.sections):
            raise VolumeVLMError(f"anatomy head: sections must be distinct names, got {list(sections)}")
        stray = sorted(set(finding_sections.values()) - set(self.sections))
        if stray:
            raise VolumeVLMError(f"anatomy head: finding_sections names sections it does not have: {stray}")
        if int(organ_classes) < 2:
            raise VolumeVLMError(f"anatomy head: organ_classes must be >= 2, got {organ_classes}")
        self.finding_sections = {str(k): str(v) for k, v in finding_sections.items()}
        self.organ_classes, self.feature_dim, self.embed_dim = int(organ_classes), int(feature_dim), int(embed_dim)
        self.alpha = dict(alpha or {})
        width = (self.organ_classes - 1) * self.feature_dim
        self.weight = nn.Parameter(torch.zeros(len(self.sections), self.embed_dim, width), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(len(self.sections), self.embed_dim), requires_grad=False)
        self.organ_statistics = check_organ_statistics(organ_statistics)
        self.phecodes = tuple(str(c) for c in phecodes)
        if len(set(self.phecodes)) != len(self.phecodes):
            raise VolumeVLMError(f"anatomy head: phecodes must be distinct, got {list(phecodes)}")
        self.phenotype_findings = tuple(str(f) for f in phenotype_findings)
        if self.phenotype_findings and not self.phecodes:
            raise VolumeVLMError("anatomy head: phenotype_findings without phecodes")
        if self.phecodes:  # heads fitted without codes (or saved before them) carry no such weights
            inputs = width
            if self.phenotype_findings:  # codes read through the findings' probabilities
                inputs = len(self.phenotype_findings)
                self.findings_weight = nn.Parameter(torch.zeros(inputs, width), requires_grad=False)
                self.findings_bias = nn.Parameter(torch.zeros(inputs), requires_grad=False)
            self.phenotype_weight = nn.Parameter(torch.zeros(len(self.phecodes), inputs), requires_grad=False)
            self.phenotype_bias = nn.Parameter(torch.zeros(len(self.phecodes)), requires_grad=False)

    def _flat(self, features: torch.Tensor) -> torch.Tensor:
        expected = (self.organ_classes - 1, self.feature_dim)
        if features.ndim != 3 or tuple(features.shape[1:]) != expected:
            raise VolumeVLMError(f"anatomy head: organ features {list(features.shape)}, expected [B, {expected[0]}, "
                                 f"{expected[1]}]")
        return features.flatten(1).to(self.weight.dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Organ features float [B, K, F] (:func:`organ_features`) -> section embeddings
        float [B, S, E], unit rows."""
        return F.normalize(torch.einsum("bd,sed->bse", self._flat(features), self.weight) + self.bias, dim=-1)

    def phenotype_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Organ features float [B, K, F] -> logits float [B, V] of :attr:`phecodes`."""
        if not self.phecodes:
            raise VolumeVLMError(NO_PHENOTYPES)
        x = self._flat(features)
        if self.phenotype_findings:
            x = torch.sigmoid(x @ self.findings_weight.T + self.findings_bias)
        return x @ self.phenotype_weight.T + self.phenotype_bias

    def section_index(self, finding: str) -> int | None:
        """Index of the section a finding is read in, or None (read it globally)."""
        section = self.finding_sections.get(finding)
        return None if section is None else self.sections.index(section)

    def head_config(self) -> dict:
        return {"sections": list(self.sections), "finding_sections": dict(self.finding_sections),
                "organ_classes": self.organ_classes, "feature_dim": self.feature_dim, "embed_dim": self.embed_dim,
                "alpha": dict(self.alpha), "phecodes": list(self.phecodes), "organ_statistics": self.organ_statistics,
                "phenotype_findings": list(self.phenotype_findings)}

    @classmethod
    def from_head_config(cls, config, folder=None, vlm=None) -> "AnatomyHead":
        optional = {"alpha", "phecodes", "organ_statistics", "phenotype_findings"}
        known = {"sections", "finding_sections", "organ_classes", "feature_dim", "embed_dim", *optional}
        config = {"organ_statistics": LEGACY_ORGAN_STATISTICS, **dict(config)}  # saved before the setting: hu16
        missing, unknown = sorted(known - set(config) - optional), sorted(set(config) - known)
        if missing or unknown:
            raise VolumeVLMError(f"{folder or 'anatomy head'}: head config missing {missing}, unknown {unknown}")
        return cls(**config)
