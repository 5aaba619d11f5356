"""The pretraining LightningModule: contrastive image-report + phenotype objective.

Each training batch (see :class:`~volumevlm.train.datamodule.PretrainDataModule`) gives
images [B, 1, X, Y, Z], report texts and phecode lists. The loss is

    clip_weight * symmetric InfoNCE(image, report)  +  phenotype_weight * BCE(phecodes)

where a case without a report leaves the contrastive term (``pair_mask``) and a case
without codes leaves the phenotype term (``has_codes``), each still training on what
it has. ``schedule: staged`` trains the phenotype head first and the reports after
(Merlin compared both). Under DDP the contrastive term sees the features of every
rank (gathered with gradients), so its value equals single-process training on the
global batch.

Validation collects image and report embeddings of all validation cases and logs
``val/r1_i2t``, ``val/r5_i2t``, ``val/r1_t2i``, ``val/r5_t2i`` (retrieval recall),
``val/zero_shot_auroc`` (the model's prompt set, as ``volumevlm evaluate`` scores it)
and ``val/phenotype_auroc`` (macro over codes with both classes in validation).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch

from volumevlm.errors import VolumeVLMError
from volumevlm.metrics import macro_auroc, retrieval_recall
from volumevlm.train.targets import CaseReading, read_case

OBJECTIVE_DEFAULTS: dict[str, Any] = {
    "clip_weight": 1.0,
    "phenotype_weight": 1.0,
    "phenotype_pos_weight": None,
    "schedule": "joint",
    "stage_fraction": 0.5,
    "init_temperature": 0.07,
    # > 0: an image-side multi-label term on the findings the rule-based labeler reads in
    # each training report (volumevlm.text.labeler); a training-only head, not exported.
    "findings_weight": 0.0,
    # Where that head reads: "image" (pooled encoder features) or "shared" (the shared
    # embedding space, applied to the image AND to the text embeddings, so both put the
    # findings along the same directions, the ones zero-shot prompts are read along).
    "findings_space": "image",
    # > 0: a sigmoid image-sentence term on single finding sentences of the batch's reports,
    # each scored against every case by the labeler (training-only bias, not exported).
    "sentence_weight": 0.0,
    "sentences_per_case": 2,
    # > 0: a text-only supervised contrastive term on the organ-system sections of the
    # batch's reports, grouped by what the labeler reads in each ("SPLEEN: Splenomegaly."
    # with its kind, "SPLEEN: No splenomegaly." with the normal sections): the text tower
    # learns to place a section by the findings it states, negation included, which text
    # -> section retrieval needs (evaluate's text_retrieval).
    "section_text_weight": 0.0,
    "section_text_temperature": 0.1,
    # every section that states a finding, plus up to this many others per case
    "section_text_others_per_case": 2,
    # true: also each stating section with its findings denied ("SPLEEN: No splenomegaly,
    # 15 cm."), read by the labeler: hard negatives that differ by negation only
    "section_text_negations": False,
    # true (with negations): a denial worded after the finding ("... is not seen.") also
    # comes with its affirmed twin ("... is seen."), so those words are no negation cue
    "section_text_affirmations": False,
    # which sections are positives of each other in that term: "exact" (the same findings)
    # or "overlap" (weighted by the Jaccard overlap of their findings, so a section stating
    # two findings is pulled towards each one's sections; losses.overlap_supervised_contrastive)
    "section_text_positives": "exact",
}
OPTIMIZER_DEFAULTS: dict[str, Any] = {
    "lr": 5e-4,
    "weight_decay": 0.05,
    "betas": (0.9, 0.98),
    "warmup_steps": 50,
    "min_lr_ratio": 0.05,
}


def _merged(defaults: Mapping[str, Any], given: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    given = dict(given or {})
    unknown = set(given) - set(defaults)
    if unknown:
        raise ValueError(f"model.{what}: unknown keys {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **given}


def build_encoder_config(encoder: Mapping[str, Any]):
    """EncoderConfig from {"name": size, field: value or None (= the size's value), ...}."""
    from volumevlm.models.registry import encoder_config

    spec = dict(encoder)
    name = spec.pop("name", "tiny")
    overrides = {key: (tuple(value) if isinstance(value, list) else value) for key, value in spec.items() if value is not None}
    return encoder_config(name, **overrides)


def total_optimizer_steps(module: L.LightningModule) -> int:
    """Optimizer steps of the module's run (1 before it is attached to a trainer);
    unbounded runs (no max_steps, no max_epochs) keep the peak rate after warmup."""
    if module._trainer is None:
        return 1
    total = module.trainer.estimated_stepping_batches
    return max(1, int(total)) if math.isfinite(total) else 10**12


def configure_adamw(
    named_parameters,
    cfg: Mapping[str, Any],
    total_steps: int,
    *,
    exempt_from_decay: Callable[[str], bool] = lambda name: False,
    lr_scale: Callable[[str], float] = lambda name: 1.0,
) -> dict[str, Any]:
    """Every task's optimisation: AdamW (cfg lr, betas, weight_decay) over the trainable
    parameters, weight decay only on matrices (biases, norms and vectors, and the names
    ``exempt_from_decay`` picks, are not decayed), per-name learning-rate scales, and
    :func:`lr_factor` (warmup, cosine to cfg min_lr_ratio) stepped per optimizer step.
    Returns Lightning's configure_optimizers dict."""
    lr, weight_decay = float(cfg["lr"]), float(cfg["weight_decay"])
    groups: dict[tuple[float, bool], list] = {}
    for name, param in named_parameters:
        if param.requires_grad:
            decays = param.ndim >= 2 and not exempt_from_decay(name)
            groups.setdefault((float(lr_scale(name)), decays), []).append(param)
    if not groups:
        raise VolumeVLMError("optimizer: no trainable parameters")
    optimizer = torch.optim.AdamW(
        [{"params": params, "lr": lr * scale, "weight_decay": weight_decay if decays else 0.0}
         for (scale, decays), params in groups.items()],
        lr=lr,
        betas=tuple(float(b) for b in cfg["betas"]),
    )
    warmup = min(int(cfg["warmup_steps"]), max(0, total_steps - 1))
    min_ratio = float(cfg["min_lr_ratio"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total_steps, min_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier at optimizer step ``step``: linear warmup from 0 over
    ``warmup_steps``, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))



class PretrainModule(L.LightningModule):
    """Pretrains a :class:`~volumevlm.models.vlm.VolumeVLM`.

    encoder: {"name": "tiny"|"small"|"base", EncoderConfig field: value or None}.
    text: TextConfig fields. embed_dim: shared embedding size E.
    objective: see :data:`OBJECTIVE_DEFAULTS`; optimizer: see :data:`OPTIMIZER_DEFAULTS`
    (AdamW, lr warmup then cosine, stepped per optimizer step).
    tokenizer / phecode_vocab / preprocess / findings: from the datamodule (built on the
    training split).
    """

    def __init__(
        self,
        encoder: Mapping[str, Any],
        text: Mapping[str, Any],
        embed_dim: int = 128,
        objective: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        tokenizer=None,
        phecode_vocab=None,
        preprocess: Mapping[str, Any] | None = None,
        findings: Sequence[str] | None = None,
    ):
        super().__init__()
        from volumevlm.models.text import TextConfig
        from volumevlm.models.vlm import VolumeVLM
        from volumevlm.train.datamodule import as_preprocess_config

        if tokenizer is None or phecode_vocab is None:
            raise ValueError("PretrainModule needs the tokenizer and phecode vocabulary built by the datamodule")
        self.save_hyperparameters(ignore=["tokenizer", "phecode_vocab"])
        self.objective_config = _merged(OBJECTIVE_DEFAULTS, objective, "objective")
        self.optimizer_config = _merged(OPTIMIZER_DEFAULTS, optimizer, "optimizer")
        if self.objective_config["schedule"] not in ("joint", "staged"):
            raise ValueError(f"model.objective.schedule must be 'joint' or 'staged', got {self.objective_config['schedule']!r}")
        self.model = VolumeVLM(
            build_encoder_config(encoder),
            TextConfig(**dict(text)),
            tokenizer,
            phecode_vocab,
            embed_dim=embed_dim,
            preprocess=as_preprocess_config(preprocess),
            findings=list(findings) if findings else None,
            init_temperature=self.objective_config["init_temperature"],
        )
        self.sections = bool(self.model.text_config.sections)
        self.findings_weight = float(self.objective_config["findings_weight"])
        self.sentence_weight = float(self.objective_config["sentence_weight"])
        self.sentences_per_case = int(self.objective_config["sentences_per_case"])
        self.section_text_weight = float(self.objective_config["section_text_weight"])
        self.section_text_temperature = float(self.objective_config["section_text_temperature"])
        self.section_text_others = int(self.objective_config["section_text_others_per_case"])
        self.section_text_negations = bool(self.objective_config["section_text_negations"])
        self.section_text_affirmations = bool(self.objective_config["section_text_affirmations"])
        self.section_text_positives = str(self.objective_config["section_text_positives"])
        if self.section_text_positives not in ("exact", "overlap"):
            raise ValueError("model.objective.section_text_positives must be 'exact' or 'overlap', got "
                             f"{self.section_text_positives!r}")
        if self.section_text_temperature <= 0 or self.section_text_others < 0:
            raise ValueError("model.objective.section_text_temperature must be > 0 and section_text_others_per_case "
                             f">= 0, got {self.section_text_temperature} and {self.section_text_others}")
        for name in ("findings_weight", "sentence_weight", "section_text_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.objective.{name} must be >= 0, got {getattr(self, name)}")
        if self.sentences_per_case < 1:
            raise ValueError(f"model.objective.sentences_per_case must be >= 1, got {self.sentences_per_case}")
        if self.findings_weight or self.sentence_weight or self.section_text_weight:
            from volumevlm.text.labeler import resolve_findings

            try:
                self.report_finding_keys = resolve_findings(self.model.findings)
            except VolumeVLMError as err:
                which = next(name for name in ("findings_weight", "sentence_weight", "section_text_weight")
                             if getattr(self, name))
                raise ValueError(f"model.objective.{which}: the labeler cannot read the model's findings ({err})") from None
        self.findings_space = str(self.objective_config["findings_space"])
        if self.findings_space not in ("image", "shared"):
            raise ValueError(f"model.objective.findings_space must be 'image' or 'shared', got {self.findings_space!r}")
        if self.findings_weight:
            from volumevlm.models.heads import PhenotypeHead

            in_dim = self.model.embed_dim if self.findings_space == "shared" else self.model.encoder.embed_dim
            self.report_findings_head = PhenotypeHead(in_dim, len(self.report_finding_keys))
        if self.sentence_weight:
            # Sigmoid pairs need an offset: most (case, sentence) pairs are negatives
            # early on (SigLIP starts it at -10 for the same reason; our batches are small).
            self.sentence_bias = torch.nn.Parameter(torch.tensor(-2.0))
        self.configure_objective(rank=0, world_size=1)
        self._val_outputs: list[dict[str, torch.Tensor]] = []

    # ------------------------------------------------------------------ objective

    def configure_objective(self, rank: int, world_size: int) -> None:
        """(Re)build the loss for this process's place among ``world_size`` ranks."""
        from volumevlm.train.losses import PretrainObjective

        pos_weight = self.objective_config["phenotype_pos_weight"]
        self.objective = PretrainObjective(
            clip_weight=self.objective_config["clip_weight"],
            phenotype_weight=self.objective_config["phenotype_weight"],
            pos_weight=None if pos_weight is None else torch.full((len(self.model.phecode_vocab.codes),), float(pos_weight)),
            rank=rank,
            world_size=world_size,
        )

    def setup(self, stage: str) -> None:
        if self.trainer is not None and self.trainer.world_size > 1:
            self.configure_objective(rank=self.trainer.global_rank, world_size=self.trainer.world_size)

    def loss_weights(self, step: int) -> tuple[float, float]:
        """(clip weight, phenotype weight) at optimizer step ``step`` under the schedule."""
        clip_w = float(self.objective_config["clip_weight"])
        phen_w = float(self.objective_config["phenotype_weight"])
        if self.objective_config["schedule"] == "staged":
            total = total_optimizer_steps(self)
            if step < int(self.objective_config["stage_fraction"] * total):
                return 0.0, phen_w
            return clip_w, 0.0
        return clip_w, phen_w

    # ------------------------------------------------------------------ batches

    def reading_keys(self) -> tuple[str, ...]:
        """The labeler's finding keys the objective reads (empty without a labeler term)."""
        return tuple(getattr(self, "report_finding_keys", ()))

    def case_readings(self, batch: Mapping[str, Any]) -> list[CaseReading]:
        """Each case's :class:`~volumevlm.train.targets.CaseReading`: the batch's own (the
        datamodule computes them once), or, for a batch without them or made for other
        findings or codes, the same computed here."""
        keys, vocab = self.reading_keys(), self.model.phecode_vocab
        given = batch.get("reading")
        # Readings made for other findings serve a module without a labeler term (it reads
        # none of them); phenotype targets must be over this model's vocabulary.
        if given is not None and all(
            (not keys or r.keys == keys) and r.phenotype_targets is not None
            and len(r.phenotype_targets) == len(vocab.codes)
            for r in given
        ):
            return list(given)
        return [read_case(report, codes, keys, phecode_vocab=vocab) for report, codes in zip(batch["report"], batch["phecodes"])]

    def _tokens_usable(self, readings: Sequence[CaseReading]) -> bool:
        return all(r.token_length == self.model.text.max_length for r in readings)

    def training_pairs(self, reports: Sequence[str | None], readings: Sequence[CaseReading] | None = None):
        """(texts, token ids or None, findings float [F] or None per text): the text paired
        with each case (the whole report, or in sections mode one of its organ-system
        sections drawn at random; None where there is no report), with its token ids and
        the labeler's reading of it when ``readings`` carry them."""
        if readings is None:
            readings = [read_case(r, None, self.reading_keys()) for r in reports]
        tokens_ok = self._tokens_usable(readings)
        texts, ids, findings = [], [], []
        for report, reading in zip(reports, readings):
            if report is None:
                texts.append(None), ids.append(None), findings.append(None)
            elif not self.sections:
                texts.append(report), ids.append(reading.report_tokens), findings.append(reading.findings)
            else:
                text, section_findings, section_ids = random.choice(reading.sections)
                texts.append(text), ids.append(section_ids), findings.append(section_findings)
        return texts, (ids if tokens_ok else None), findings

    def training_texts(self, reports: Sequence[str | None]) -> list[str | None]:
        """The text paired with each case (see :meth:`training_pairs`)."""
        return self.training_pairs(reports)[0]

    def text_embeddings(self, texts: Sequence[str | None], dtype: torch.dtype,
                        token_ids: Sequence | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit text embeddings [B, E] (zero rows where text is None) and pair_mask bool [B];
        ``token_ids`` (one per text) spare the tokenizer."""
        mask = torch.tensor([t is not None for t in texts], dtype=torch.bool, device=self.device)
        emb = torch.zeros(len(texts), self.model.embed_dim, device=self.device, dtype=dtype)
        present = [i for i, t in enumerate(texts) if t is not None]
        if present:
            ids = None if token_ids is None else [token_ids[i] for i in present]
            emb[mask] = self.model.encode_text([texts[i] for i in present], token_ids=ids).to(dtype)
        return emb, mask

    def phenotype_targets(self, batch: Mapping[str, Any],
                          readings: Sequence[CaseReading] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Multi-hot phecode targets float [B, V] and has_codes bool [B]."""
        readings = self.case_readings(batch) if readings is None else readings
        targets = torch.stack([torch.as_tensor(r.phenotype_targets, dtype=torch.float32) for r in readings])
        return targets.to(self.device), torch.as_tensor(batch["has_codes"], dtype=torch.bool, device=self.device)

    def compute_losses(self, batch: Mapping[str, Any], texts: Sequence[str | None] | None = None) -> dict[str, torch.Tensor]:
        """The objective on one (local) batch: {"loss", "clip", "phenotype"} scalars."""
        readings = self.case_readings(batch)
        if texts is None:
            texts, token_ids, text_findings = self.training_pairs(batch["report"], readings)
        else:
            token_ids, text_findings = None, None
        out = self.model(batch["image"])
        image_emb = out["image_emb"]
        text_emb, pair_mask = self.text_embeddings(texts, image_emb.dtype, token_ids)
        targets, has_codes = self.phenotype_targets(batch, readings)
        clip_w, phen_w = self.loss_weights(self.global_step if self._trainer is not None else 0)
        self.objective.clip_weight = clip_w
        self.objective.phenotype_weight = phen_w
        losses = self.objective(
            image_emb=image_emb,
            text_emb=text_emb,
            logit_scale=out["logit_scale"],
            phenotype_logits=out["phenotype_logits"],
            phenotype_targets=targets,
            pair_mask=pair_mask,
            codes_mask=has_codes,
        )
        if self.findings_weight:
            losses["findings"] = self.report_findings_loss(self.findings_head_input(out), batch["report"], readings)
            if self.findings_space == "shared":
                # the text side reads the text it was given (a section in sections mode)
                text_targets = None
                if text_findings is not None:
                    text_targets = self._findings_tensor(text_findings, texts)
                text_loss = self.report_findings_loss(text_emb, texts, targets=text_targets)
                losses["findings"] = 0.5 * (losses["findings"] + text_loss)
            losses["loss"] = losses["loss"] + self.findings_weight * losses["findings"]
        if self.sentence_weight:
            losses["sentences"] = self.sentence_loss(image_emb, out["logit_scale"], batch["report"], readings)
            losses["loss"] = losses["loss"] + self.sentence_weight * losses["sentences"]
        if self.section_text_weight:
            losses["section_text"] = self.section_text_loss(batch["report"], readings).to(losses["loss"].dtype)
            losses["loss"] = losses["loss"] + self.section_text_weight * losses["section_text"]
        return losses

    def section_texts(self, reports: Sequence[str | None], readings: Sequence[CaseReading] | None = None,
                      rng: random.Random | None = None) -> tuple[list[str], torch.Tensor, list | None]:
        """The sections the text-only term reads: (texts [N], the labeler's readings float
        [N, F] (1 present or hedged), token ids or None). Every section of the batch's
        reports that states a finding, plus up to ``section_text_others_per_case`` others
        of each report drawn at random (most sections state nothing; all of them would
        drown the few that do), plus with ``section_text_negations`` the stating sections'
        negated counterparts (:func:`~volumevlm.train.targets.negated_section`) and, with
        ``section_text_affirmations`` too, where a denial is worded after the finding ("... is
        not seen."), its affirmed twin (:func:`~volumevlm.train.targets.affirmed_section`,
        "... is seen.")."""
        rng = rng or random
        if readings is None:
            readings = [read_case(r, None, self.report_finding_keys) for r in reports]
        tokens_ok = self._tokens_usable(readings)
        texts, findings, ids = [], [], []
        for report, reading in zip(reports, readings):
            if report is None:
                continue
            stating = [s for s in reading.sections if s[1] is not None and float(np.sum(s[1])) > 0]
            others = [s for s in reading.sections if s[1] is not None and float(np.sum(s[1])) == 0]
            drawn = stating + rng.sample(others, min(self.section_text_others, len(others)))
            if self.section_text_negations:
                drawn += list(reading.negations)
                if self.section_text_affirmations:
                    drawn += list(reading.affirmations)
            for text, section_findings, token_ids in drawn:
                texts.append(text), findings.append(section_findings), ids.append(token_ids)
        width = len(self.report_finding_keys)
        table = torch.as_tensor(np.stack(findings), dtype=torch.float32) if findings else torch.zeros(0, width)
        return texts, table.to(self.device), (ids if tokens_ok else None)

    def section_text_loss(self, reports: Sequence[str | None], readings: Sequence[CaseReading] | None = None,
                          rng: random.Random | None = None) -> torch.Tensor:
        """:func:`~volumevlm.train.losses.supervised_contrastive` of the text embeddings of
        :meth:`section_texts`, sections with the same reading being positives of each other
        (``section_text_positives="overlap"``: :func:`~volumevlm.train.losses.overlap_supervised_contrastive`,
        weighted by how many findings they share)."""
        from volumevlm.train.losses import overlap_supervised_contrastive, supervised_contrastive

        texts, findings, ids = self.section_texts(reports, readings, rng)
        if len(texts) < 2:
            return sum(p.sum() * 0.0 for p in self.model.text_projection.parameters())
        emb = self.model.encode_text(texts, token_ids=ids)
        loss = overlap_supervised_contrastive if self.section_text_positives == "overlap" else supervised_contrastive
        return loss(emb.float(), findings, self.section_text_temperature)

    def finding_sentences(self, reports: Sequence[str | None], per_case: int | None = None,
                          rng: random.Random | None = None,
                          readings: Sequence[CaseReading] | None = None) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Up to ``per_case`` sentences drawn from each report among those that state a
        finding, and whether each is TRUE of each case: (sentences [S], targets float
        [B, S], known bool [B, S]). A sentence is true of a case when the labeler reads
        the same status (hedged counts as present) for every finding the sentence states
        in that case's report; unknown where the case has no report or does not mention
        one of them. Why per sentence and not per report: a report is unique, so a
        contrastive model can match it by what makes it unique; "No splenomegaly." is
        shared by most cases, and this says by which. ``readings``: the cases'
        precomputed labeler readings (computed here when None)."""
        return self._finding_sentences(reports, per_case, rng, readings)[:3]

    def _finding_sentences(self, reports, per_case=None, rng=None, readings=None):
        """:meth:`finding_sentences` plus the drawn sentences' token ids (None when the
        readings carry none usable)."""
        rng = rng or random
        per_case = self.sentences_per_case if per_case is None else per_case
        keys = self.report_finding_keys
        if readings is None:
            readings = [read_case(r, None, keys) for r in reports]
        tokens_ok = self._tokens_usable(readings)
        case_labels = [reading.statuses if report is not None else None for report, reading in zip(reports, readings)]
        sentences: list[str] = []
        stated: list[dict[str, bool]] = []
        ids: list = []
        for report, reading in zip(reports, readings):
            if report is None:
                continue
            candidates = list(reading.sentences)
            for text, labels, token_ids in rng.sample(candidates, min(per_case, len(candidates))):
                sentences.append(text)
                stated.append(labels)
                ids.append(token_ids)
        targets = torch.zeros(len(reports), len(sentences))
        known = torch.zeros(len(reports), len(sentences), dtype=torch.bool)
        for i, labels in enumerate(case_labels):
            for j, claim in enumerate(stated):
                if labels is not None and all(key in labels for key in claim):
                    known[i, j] = True
                    targets[i, j] = float(all(labels[key] == value for key, value in claim.items()))
        return sentences, targets.to(self.device), known.to(self.device), (ids if tokens_ok else None)

    def sentence_loss(self, image_emb: torch.Tensor, logit_scale: torch.Tensor,
                      reports: Sequence[str | None], readings: Sequence[CaseReading] | None = None) -> torch.Tensor:
        """Mean sigmoid BCE over the (case, sentence) pairs whose truth the labeler knows
        (this rank's cases and sentences)."""
        sentences, targets, known, ids = self._finding_sentences(reports, readings=readings)
        if not sentences or not bool(known.any()):
            return image_emb.sum() * 0.0 + self.sentence_bias * 0.0
        text_emb = self.model.encode_text(sentences, token_ids=ids).to(image_emb.dtype)
        logits = logit_scale.to(image_emb.dtype) * image_emb @ text_emb.T + self.sentence_bias.to(image_emb.dtype)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits[known].to(dtype), targets[known])

    def _findings_tensor(self, findings: Sequence, reports: Sequence[str | None]) -> torch.Tensor:
        width = len(self.report_finding_keys)
        rows = [torch.as_tensor(f, dtype=torch.float32) if (r is not None and f is not None) else torch.zeros(width)
                for f, r in zip(findings, reports)]
        return torch.stack(rows).to(self.device)

    def report_findings_targets(self, reports: Sequence[str | None],
                                readings: Sequence[CaseReading] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Findings the labeler reads in each report, float [B, F] (a hedged finding counts
        as present), and has_report bool [B]; from ``readings`` when given."""
        if readings is None:
            readings = [read_case(r, None, self.report_finding_keys) for r in reports]
        targets = self._findings_tensor([r.findings for r in readings], reports)
        return targets, torch.tensor([r is not None for r in reports], dtype=torch.bool, device=self.device)

    def start_report_findings_at_prevalence(self, reports: Sequence[str | None]) -> None:
        """Start the findings head's biases at each finding's share of the training reports
        (the labeler's reading), as the phenotype head starts at the code prevalence."""
        targets, has_report = self.report_findings_targets(reports)
        if not bool(has_report.any()):
            return
        present = targets[has_report].sum(dim=0)
        self.report_findings_head.start_at_prevalence(((present + 0.5) / (int(has_report.sum()) + 1)).tolist())

    def findings_head_input(self, out: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """What the findings head reads of a model output: pooled features or the unit embedding."""
        return out["image_emb"] if self.findings_space == "shared" else out["image_features"]

    def report_findings_loss(self, inputs: torch.Tensor, reports: Sequence[str | None],
                             readings: Sequence[CaseReading] | None = None,
                             targets: torch.Tensor | None = None) -> torch.Tensor:
        """Mean BCE of the training-only findings head on inputs [B, D] (image features, or
        in the shared space image or text embeddings) over the cases with a report (this
        rank's mean: under DDP ranks with equal batches average to the global mean).
        Targets: ``targets`` [B, F] when given, else the labeler's reading of ``reports``
        (from ``readings`` when given)."""
        logits = self.report_findings_head(inputs)
        if targets is None:
            targets, has_report = self.report_findings_targets(reports, readings)
        else:
            has_report = torch.tensor([r is not None for r in reports], dtype=torch.bool, device=self.device)
        if not bool(has_report.any()):
            return logits.sum() * 0.0
        dtype = torch.promote_types(logits.dtype, torch.float32)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits[has_report].to(dtype), targets[has_report])

    # ------------------------------------------------------------------ training

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch)
        size = batch["image"].shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=size)
        self.log("train/clip", losses["clip"], batch_size=size)
        self.log("train/phenotype", losses["phenotype"], batch_size=size)
        for name in ("findings", "sentences", "section_text"):
            if name in losses:
                self.log(f"train/{name}", losses[name], batch_size=size)
        self.log("train/temperature", 1.0 / self.model.scale().detach(), batch_size=size)
        return losses["loss"]

    # ------------------------------------------------------------------ validation

    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []

    def validation_text_embeddings(self, reports: Sequence[str | None], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Report embeddings [B, E] for retrieval: the whole report, or (sections mode) the
        normalised mean of its section embeddings; zero rows and mask False without report."""
        if not self.sections:
            return self.text_embeddings(reports, dtype)
        mask = torch.tensor([r is not None for r in reports], dtype=torch.bool, device=self.device)
        emb = torch.zeros(len(reports), self.model.embed_dim, device=self.device, dtype=dtype)
        if bool(mask.any()):
            emb[mask] = self.model.encode_reports([r for r in reports if r is not None]).to(dtype)
        return emb, mask

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        out = self.model(batch["image"])
        text_emb, pair_mask = self.validation_text_embeddings(batch["report"], out["image_emb"].dtype)
        readings = self.case_readings(batch)
        targets, has_codes = self.phenotype_targets(batch, readings)
        names = self.model.findings
        findings = torch.full((len(batch["report"]), len(names)), -1.0, device=self.device)
        for i, case in enumerate(batch["findings"]):
            if case:
                findings[i] = torch.tensor([float(case.get(n, -1)) for n in names], device=self.device)
        self._val_outputs.append(
            {
                "image_emb": out["image_emb"].float(),
                "text_emb": text_emb.float(),
                "pair_mask": pair_mask,
                "phenotype_logits": out["phenotype_logits"].float(),
                "phenotype_targets": targets,
                "has_codes": has_codes,
                "findings": findings,
            }
        )
        if self.findings_weight:
            # The training-only head against the labeler's reading of the validation
            # reports: does the encoder learn the findings at all, apart from the text?
            head_targets, has_report = self.report_findings_targets(batch["report"], readings)
            self._val_outputs[-1].update(
                report_findings_logits=self.report_findings_head(self.findings_head_input(out)).float(),
                report_findings_targets=head_targets,
                has_report=has_report,
            )

    def _gathered_val_outputs(self) -> dict[str, torch.Tensor]:
        joined = {key: torch.cat([o[key] for o in self._val_outputs]) for key in self._val_outputs[0]}
        if self.trainer.world_size > 1:
            # Every rank holds the same number of validation cases (the distributed
            # sampler pads), so an all_gather of [n, ...] gives [world, n, ...].
            # Booleans travel as floats: not every backend gathers bool tensors.
            joined = {
                key: (self.all_gather(value.float()).flatten(0, 1) > 0.5) if value.dtype == torch.bool
                else self.all_gather(value).flatten(0, 1)
                for key, value in joined.items()
            }
        return joined

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs:
            return
        data = self._gathered_val_outputs()
        self._val_outputs = []
        metrics = self.validation_metrics(data)
        for key, value in metrics.items():
            if not math.isnan(value):
                self.log(f"val/{key}", value, prog_bar=key in ("r1_i2t", "zero_shot_auroc"), sync_dist=False)

    @torch.no_grad()
    def validation_metrics(self, data: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Figures over the whole validation set (tensors as collected by validation_step)."""
        metrics: dict[str, float] = {}
        paired = data["pair_mask"]
        image_emb, text_emb = data["image_emb"][paired], data["text_emb"][paired]
        n = int(paired.sum())
        for k, value in retrieval_recall(image_emb, text_emb, ks=(1, 5)).items():
            metrics[f"r{k}_i2t"] = value
            metrics[f"chance_r{k}"] = min(1.0, k / n) if n else math.nan
        for k, value in retrieval_recall(text_emb, image_emb, ks=(1, 5)).items():
            metrics[f"r{k}_t2i"] = value
        metrics["pairs"] = float(n)

        has_codes = data["has_codes"]
        metrics["phenotype_auroc"], metrics["phenotype_codes"] = macro_auroc(
            data["phenotype_logits"][has_codes], data["phenotype_targets"][has_codes]
        )

        findings = data["findings"]
        known = (findings >= 0).all(dim=1)
        if bool(known.any()) and findings.shape[1] > 0:
            probs = self.model.zero_shot_from_embeddings(data["image_emb"][known])
            metrics["zero_shot_auroc"], metrics["zero_shot_findings"] = macro_auroc(probs.float(), findings[known])
        else:
            metrics["zero_shot_auroc"], metrics["zero_shot_findings"] = math.nan, 0
        if "report_findings_logits" in data:
            has_report = data["has_report"]
            metrics["findings_head_auroc"], metrics["findings_head_findings"] = macro_auroc(
                data["report_findings_logits"][has_report], data["report_findings_targets"][has_report]
            )
        metrics = {key: float(value) for key, value in metrics.items()}
        return metrics

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self):
        # The temperature is a scalar already; named here so a reshaped one stays undecayed.
        return configure_adamw(self.named_parameters(), self.optimizer_config, total_optimizer_steps(self),
                               exempt_from_decay=lambda name: name.endswith("logit_scale"))

