"""Segmentation fine-tuning: a UNETR-style head on a pretrained VolumeVLM's encoder.

``train_segmentation(cfg) -> (metrics, objects)`` is what ``volumevlm train
experiment=segment_demo`` runs (``task: segment``). It

1. loads the pretrained checkpoint ``cfg.init_from`` (its preprocessing config is THE
   preprocessing here too: never re-typed in the segmentation config),
2. builds :class:`~volumevlm.models.segmentation.SegmentationNet` with a copy of the
   pretrained encoder (fine-tuned, or frozen with ``segmentation.freeze_encoder``),
3. trains it with DiceCE on the manifest's ``train`` cases that have label maps
   (``segmentation.label_fraction`` keeps the first share of them, for label-efficiency
   curves), validating by sliding-window inference (``val/mean_dice`` over foreground
   labels, ``val/dice_<name>`` per label, ``val/mean_dice_large`` over the large organs),
4. attaches the net to the loaded VolumeVLM as its "segmentation" head and saves the
   whole model to ``cfg.model_dir`` (one directory accumulates heads), and writes
   ``output_dir/metrics.json``.

Data from ``volumevlm synth`` is SYNTHETIC, not clinical data; the saved provenance
says so when the cohort says it is synthetic.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from volumevlm.data.labels import LARGE_ORGANS  # noqa: F401 (public here too)
from volumevlm.errors import InputError, VolumeVLMError
from volumevlm.metrics import (  # noqa: F401 (dice_from_counts: public here too)
    dice_counts,
    dice_from_counts,
    hd95_per_class,
    summarize_dice,
    summarize_hd95,
)

MANIFEST_NAME = "manifest.jsonl"
OPTIMIZER_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "betas": (0.9, 0.999),
    "warmup_steps": 20,
    "min_lr_ratio": 0.05,
    # The pretrained encoder's learning rate relative to the decoder's.
    "encoder_lr_ratio": 1.0,
}


# ---------------------------------------------------------------------- module


class SegmentationModule(L.LightningModule):
    """Trains a :class:`~volumevlm.models.segmentation.SegmentationNet`.

    net: the net (its encoder initialised from the pretrained one).
    optimizer: see :data:`OPTIMIZER_DEFAULTS` (AdamW, linear warmup then cosine to
        lr * min_lr_ratio at max_steps; encoder parameters at lr * encoder_lr_ratio).
    freeze_encoder: keep the encoder fixed (no gradients, eval mode) and train the
        decoder only.
    crop_size: train on random crops of this many voxels (X, Y, Z; clipped to the
        volume); None: whole volumes. Validation always sees whole volumes through the
        sliding window.
    foreground_crop: probability that a training crop is centred on a voxel of one
        foreground class present in the case, the class drawn uniformly (MONAI's
        RandCropByLabelClasses idea); else the crop is uniform. Why: with uniform crops
        the small structures (gallbladder, pancreas, inferior vena cava) are a fraction of a
        percent of the voxels a step sees, and a short run learns "background only".
    flip_axes / flip_prob: random flips of the batch along these spatial axes (0, 1, 2
        = X, Y, Z of the RAS grid); flipping X mirrors left and right, so the
        ``*_left`` / ``*_right`` labels are swapped with it.
    spacing: voxel size (mm) of the preprocessed grid, X, Y, Z; needed for HD95.
    compute_hd95: also measure per-organ HD95 in validation/test (``val/hd95_<name>``,
        ``val/mean_hd95``...); an attribute, so that a run can switch it on for its
        final evaluation only (distance transforms cost more than the Dice counts).
    Batches: {"image" float [B, 1, X, Y, Z] in [0, 1], "label" int64 [B, 1, X, Y, Z]}.
    """

    def __init__(
        self,
        net,
        optimizer: Mapping[str, Any] | None = None,
        freeze_encoder: bool = False,
        crop_size: Sequence[int] | None = None,
        foreground_crop: float = 0.0,
        flip_axes: Sequence[int] = (),
        flip_prob: float = 0.5,
        spacing: Sequence[float] | None = None,
        compute_hd95: bool = False,
    ):
        super().__init__()
        from monai.losses import DiceCELoss

        from volumevlm.models.segmentation import label_swap_table

        self.save_hyperparameters(ignore=["net"])
        given = dict(optimizer or {})
        unknown = set(given) - set(OPTIMIZER_DEFAULTS)
        if unknown:
            raise VolumeVLMError(f"segmentation optimizer: unknown keys {sorted(unknown)}; known: {sorted(OPTIMIZER_DEFAULTS)}")
        self.optimizer_config = {**OPTIMIZER_DEFAULTS, **given}
        self.net = net
        self.freeze_encoder = bool(freeze_encoder)
        net.config.freeze_encoder = self.freeze_encoder
        if self.freeze_encoder:
            net.encoder.requires_grad_(False)
            net.encoder.eval()
        self.crop_size = None if crop_size is None else tuple(int(v) for v in crop_size)
        if self.crop_size is not None and (len(self.crop_size) != 3 or min(self.crop_size) < 1):
            raise VolumeVLMError(f"segmentation.crop_size: need 3 positive ints or null, got {list(crop_size)}")
        self.foreground_crop = float(foreground_crop)
        if not 0.0 <= self.foreground_crop <= 1.0:
            raise VolumeVLMError(f"segmentation.foreground_crop: a probability in [0, 1], got {foreground_crop}")
        self.flip_axes = tuple(int(a) for a in flip_axes)
        if any(a not in (0, 1, 2) for a in self.flip_axes):
            raise VolumeVLMError(f"segmentation.flip_axes: axes are 0, 1, 2 (X, Y, Z), got {list(flip_axes)}")
        self.flip_prob = float(flip_prob)
        self.spacing = None if spacing is None else tuple(float(v) for v in spacing)
        if compute_hd95 and self.spacing is None:
            raise VolumeVLMError("segmentation: HD95 needs the voxel spacing of the preprocessed grid")
        self.compute_hd95 = bool(compute_hd95)
        # DiceCE with soft Dice over the whole batch: a structure missing from one crop
        # does not turn that crop's Dice term into noise.
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
        self.register_buffer("swap", label_swap_table(net.config.label_names, net.config.num_classes), persistent=False)
        self._eval_counts: list[torch.Tensor] = []
        self._eval_hd95: list[torch.Tensor] = []

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:
            self.net.encoder.eval()  # a frozen encoder keeps its inference behaviour
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    # ------------------------------------------------------------------ training

    def augment(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Random crop (per case) and flips (per batch) of image/label [B, 1, X, Y, Z]."""
        if self.crop_size is not None:
            size = [min(c, s) for c, s in zip(self.crop_size, image.shape[2:])]
            if size != list(image.shape[2:]):
                images, labels = [], []
                for i in range(image.shape[0]):
                    start = self.crop_start(label[i, 0], size)
                    window = (slice(None),) + tuple(slice(a, a + c) for a, c in zip(start, size))
                    images.append(image[i][window])
                    labels.append(label[i][window])
                image, label = torch.stack(images), torch.stack(labels)
        for axis in self.flip_axes:
            if float(torch.rand(())) < self.flip_prob:
                image, label = image.flip(2 + axis), label.flip(2 + axis)
                if axis == 0:
                    label = self.swap[label]
        return image, label

    def crop_start(self, label: torch.Tensor, size: Sequence[int]) -> list[int]:
        """Corner of one training crop of ``size`` in a label map [X, Y, Z]: centred on a
        voxel of a random present foreground class with probability ``foreground_crop``
        (clipped to the volume), else uniform."""
        shape = label.shape
        if self.foreground_crop > 0 and float(torch.rand(())) < self.foreground_crop:
            present = [int(k) for k in torch.unique(label) if int(k) > 0]
            if present:
                k = present[int(torch.randint(0, len(present), ()))]
                voxels = (label == k).nonzero()
                centre = voxels[int(torch.randint(0, voxels.shape[0], ()))].tolist()
                return [min(max(0, c - z // 2), s - z) for c, z, s in zip(centre, size, shape)]
        return [int(torch.randint(0, s - z + 1, ())) for s, z in zip(shape, size)]

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        image, label = self.augment(batch["image"], batch["label"])
        logits = self.net(image)
        loss = self.loss_fn(logits, label)
        self.log("train/loss", loss, prog_bar=True, batch_size=image.shape[0])
        return loss

    # ------------------------------------------------------------------ evaluation

    def _eval_step(self, batch: Mapping[str, Any]) -> None:
        from volumevlm.models.segmentation import sliding_window_segment

        pred = sliding_window_segment(self.net, batch["image"])
        num_classes = self.net.config.num_classes
        self._eval_counts.append(dice_counts(pred, batch["label"], num_classes))
        if self.compute_hd95:
            self._eval_hd95.append(hd95_per_class(pred, batch["label"], num_classes, self.spacing).to(pred.device))

    def _eval_end(self, prefix: str) -> dict[str, float]:
        if not self._eval_counts:
            return {}
        counts = torch.cat(self._eval_counts)
        hd95 = torch.cat(self._eval_hd95) if self._eval_hd95 else None
        self._eval_counts, self._eval_hd95 = [], []
        if self._trainer is not None and self.trainer.world_size > 1:
            counts = self.all_gather(counts).flatten(0, 1)
            hd95 = None if hd95 is None else self.all_gather(hd95).flatten(0, 1)
        metrics = summarize_dice(counts.cpu(), self.net.config.label_names)
        if hd95 is not None:
            metrics.update(summarize_hd95(hd95.cpu(), self.net.config.label_names))
        for key, value in metrics.items():
            if not math.isnan(value):
                self.log(f"{prefix}/{key}", value, prog_bar=key == "mean_dice", sync_dist=False)
        return metrics

    def on_validation_epoch_start(self) -> None:
        self._eval_counts, self._eval_hd95 = [], []

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_counts, self._eval_hd95 = [], []

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self):
        from volumevlm.train.module import configure_adamw, total_optimizer_steps

        # The pretrained encoder moves more slowly than the new decoder.
        encoder_ratio = float(self.optimizer_config["encoder_lr_ratio"])
        return configure_adamw(self.net.named_parameters(), self.optimizer_config, total_optimizer_steps(self),
                               lr_scale=lambda name: encoder_ratio if name.startswith("encoder.") else 1.0)


# ---------------------------------------------------------------------- data


class SegmentationDataModule(L.LightningDataModule):
    """Train/val/test loaders of labelled cases from ``root/manifest.jsonl``.

    root: the manifest folder (e.g. a synthetic cohort; synthetic data is NOT clinical data).
    preprocess: the pretrained model's PreprocessConfig (``model.preprocess``).
    label_fraction: keep the first ceil(label_fraction * n) of the n labelled training
        cases in manifest order (deterministic, at least 1), 0 < label_fraction <= 1.
    val_limit: validate on at most this many labelled validation cases (None: all).
    cache_dir: persistent cache of preprocessed volumes (None: none).
    Batches: :func:`~volumevlm.data.datasets.collate_cases` of SegmentationDataset items:
    "image" float32 [B, 1, X, Y, Z], "label" int64 [B, 1, X, Y, Z], "id" list[str].
    """

    def __init__(
        self,
        root: str | os.PathLike,
        preprocess,
        batch_size: int = 2,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        cache_dir: str | os.PathLike | None = None,
        label_fraction: float = 1.0,
        val_limit: int | None = None,
    ):
        super().__init__()
        from volumevlm.train.datamodule import as_preprocess_config

        self.root = Path(root).expanduser()
        self.preprocess = as_preprocess_config(preprocess)
        if int(batch_size) < 1:
            raise InputError("segmentation.batch_size", f"must be at least 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        fraction = float(label_fraction)
        if not 0.0 < fraction <= 1.0:
            raise InputError("segmentation.label_fraction", f"must be in (0, 1], got {label_fraction}")
        self.label_fraction = fraction
        self.val_limit = None if val_limit is None else int(val_limit)
        self.train_rows: list[dict] | None = None
        self.val_rows: list[dict] = []
        self.test_rows: list[dict] = []
        self.labelled_train_cases = 0

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows is not None:
            return
        from volumevlm.data.manifest import read_manifest

        manifest = read_manifest(self.root / MANIFEST_NAME)
        labelled = [row for row in manifest.split("train") if row.get("label")]
        if not labelled:
            raise InputError(manifest.path, "no 'train' cases with a label map to train segmentation on")
        self.labelled_train_cases = len(labelled)
        keep = max(1, math.ceil(self.label_fraction * len(labelled) - 1e-9))
        self.train_rows = labelled[:keep]
        self.val_rows = [row for row in manifest.split("val") if row.get("label")]
        if self.val_limit is not None:
            self.val_rows = self.val_rows[: self.val_limit]
        self.test_rows = [row for row in manifest.split("test") if row.get("label")]

    def _loader(self, rows: list[dict], batch_size: int, shuffle: bool) -> DataLoader:
        from volumevlm.data.datasets import SegmentationDataset, collate_cases

        return DataLoader(
            SegmentationDataset(rows, self.preprocess, cache_dir=self.cache_dir),
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_cases,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_rows, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_rows, self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_rows, self.val_batch_size, shuffle=False)

    def describe(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "label_fraction": self.label_fraction,
            "labelled_train_cases": self.labelled_train_cases,
            "train_cases": len(self.train_rows or []),
            "val_cases": len(self.val_rows),
            "test_cases": len(self.test_rows),
            "preprocess": self.preprocess.to_dict(),
        }


# ---------------------------------------------------------------------- entry point

# cfg.segmentation keys and their defaults (anything else is an error).
SEGMENTATION_DEFAULTS: dict[str, Any] = {
    "feature_size": 16,
    # SegmentationConfig.decoder; auto: "fused" (a U-Net on the image with the pretrained
    # tokens added at its bottleneck), for any encoder.
    "decoder": "auto",
    # The unetr decoder's conv path on the image (SegmentationConfig.image_path); null:
    # on for "unetr"; "unet" (the stem's maps) and "fused" (itself a conv net on the
    # image) refuse it.
    "image_path": None,
    "freeze_encoder": False,
    "label_fraction": 1.0,
    "lr": OPTIMIZER_DEFAULTS["lr"],
    "weight_decay": OPTIMIZER_DEFAULTS["weight_decay"],
    "warmup_steps": OPTIMIZER_DEFAULTS["warmup_steps"],
    "min_lr_ratio": OPTIMIZER_DEFAULTS["min_lr_ratio"],
    "encoder_lr_ratio": OPTIMIZER_DEFAULTS["encoder_lr_ratio"],
    "max_steps": None,
    "batch_size": 2,
    "val_batch_size": None,
    "crop_size": None,
    "foreground_crop": 0.0,
    "flip_axes": [],
    "flip_prob": 0.5,
    "sw_overlap": 0.25,
    # Sliding-window ROI at inference (SegmentationConfig.roi_size); null: the encoder's
    # nominal image size.
    "roi_size": None,
    "val_limit": None,
    "test": False,
    # Per-organ HD95 (mm) in the final validation and the test evaluation.
    "hd95": True,
}


def segmentation_settings(cfg) -> dict[str, Any]:
    """cfg.segmentation merged over :data:`SEGMENTATION_DEFAULTS` (plain Python values)."""
    from omegaconf import OmegaConf

    given = cfg.get("segmentation") or {}
    given = OmegaConf.to_container(given, resolve=True) if OmegaConf.is_config(given) else dict(given)
    unknown = set(given) - set(SEGMENTATION_DEFAULTS)
    if unknown:
        raise VolumeVLMError(f"segmentation: unknown keys {sorted(unknown)}; known: {sorted(SEGMENTATION_DEFAULTS)}")
    return {**SEGMENTATION_DEFAULTS, **given}


def _pretrained_provenance(folder: Path) -> dict[str, Any]:
    """The provenance block of the checkpoint we start from (kept in the new config.json)."""
    try:
        return dict(json.loads((folder / "config.json").read_text()).get("provenance") or {})
    except (OSError, ValueError, AttributeError):
        return {}


def train_segmentation(cfg, callbacks: Sequence[L.Callback] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fine-tune a segmentation head per ``cfg`` (see the module docstring).

    Reads cfg.init_from, cfg.data.root / cache / cache_dir / num_workers,
    cfg.segmentation.*, cfg.trainer, cfg.callbacks, cfg.logger, cfg.output_dir,
    cfg.model_dir, cfg.seed, cfg.resume, cfg.final_validation.
    Returns (metrics, objects): metrics are floats (train/*, val/*, test/*), also
    written to ``output_dir/metrics.json``; objects: {"cfg", "model" (the VolumeVLM,
    head attached), "net", "datamodule", "module", "trainer", "model_dir",
    "resumed_from"}.
    """
    from omegaconf import OmegaConf

    from volumevlm import NOT_FOR_CLINICAL_USE
    from volumevlm.io.writers import write_text_atomic
    from volumevlm.models.segmentation import SegmentationConfig, SegmentationNet
    from volumevlm.models.vlm import VolumeVLM
    from volumevlm.train.train import LAST_CHECKPOINT, _float_metrics, build_trainer, checkpoint_dir, data_provenance

    started = time.perf_counter()
    settings = segmentation_settings(cfg)
    if not cfg.get("init_from"):
        raise VolumeVLMError("init_from: not set; give the pretrained checkpoint directory, e.g. init_from=demo-output/model")
    data_cfg = cfg.get("data") or {}
    if OmegaConf.is_config(data_cfg) and OmegaConf.is_missing(data_cfg, "root"):
        raise VolumeVLMError("data.root: not set; give the labelled dataset folder, e.g. data.root=demo-output/cohort")
    output_dir = Path(cfg.output_dir).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)

    init_from = Path(str(cfg.init_from)).expanduser()
    model = VolumeVLM.from_pretrained(init_from)
    from volumevlm.data.labels import LABELS

    decoder = settings["decoder"]
    if decoder == "auto":
        decoder = "fused"
    if settings["image_path"] and decoder != "unetr":
        raise VolumeVLMError(f"segmentation.image_path: applies to decoder=unetr only, not {decoder!r} "
                             "(the fused decoder is itself a conv net on the image); leave it null")
    image_path = settings["image_path"] if settings["image_path"] is not None else decoder == "unetr"
    config = SegmentationConfig(
        num_classes=max(LABELS) + 1,
        label_names=dict(LABELS),
        feature_size=settings["feature_size"],
        decoder=decoder,
        image_path=image_path,
        roi_size=tuple(settings["roi_size"] or model.encoder_config.image_size),
        sw_overlap=settings["sw_overlap"],
        freeze_encoder=settings["freeze_encoder"],
    )
    net = SegmentationNet.from_encoder(model.encoder, config)

    cache = data_cfg.get("cache", True)
    datamodule = SegmentationDataModule(
        root=data_cfg.root,
        preprocess=model.preprocess,
        batch_size=settings["batch_size"],
        val_batch_size=settings["val_batch_size"],
        num_workers=data_cfg.get("num_workers", 0),
        cache_dir=data_cfg.get("cache_dir") if cache else None,
        label_fraction=settings["label_fraction"],
        val_limit=settings["val_limit"],
    )
    datamodule.setup("fit")
    module = SegmentationModule(
        net,
        optimizer={key: settings[key] for key in ("lr", "weight_decay", "warmup_steps", "min_lr_ratio", "encoder_lr_ratio")},
        freeze_encoder=settings["freeze_encoder"],
        crop_size=settings["crop_size"],
        foreground_crop=settings["foreground_crop"],
        flip_axes=settings["flip_axes"] or (),
        flip_prob=settings["flip_prob"],
        spacing=model.preprocess.target_spacing,
    )
    trainer_overrides = {}
    if settings["max_steps"] is not None:
        trainer_overrides["max_steps"] = int(settings["max_steps"])
    trainer = build_trainer(cfg, callbacks, **trainer_overrides)
    fast_dev_run = bool(cfg.trainer.get("fast_dev_run"))
    last = checkpoint_dir(cfg) / LAST_CHECKPOINT
    resumed_from = str(last) if (cfg.get("resume", True) and not fast_dev_run and last.is_file()) else None
    trainer.fit(module, datamodule=datamodule, ckpt_path=resumed_from)

    metrics = _float_metrics(
        {k: v for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/", "test/"))}
    )
    if not fast_dev_run:
        trainer.save_checkpoint(last)
        module.compute_hd95 = bool(settings["hd95"])
        if cfg.get("final_validation", True) and datamodule.val_rows:
            results = trainer.validate(module, datamodule=datamodule, verbose=False)
            metrics.update(_float_metrics(results[0] if results else {}))
        if settings["test"] and datamodule.test_rows:
            results = trainer.test(module, datamodule=datamodule, verbose=False)
            metrics.update(_float_metrics(results[0] if results else {}))

    net.eval()
    model.attach_head("segmentation", net)
    data_info = data_provenance(datamodule.root, datamodule.train_rows)
    head_provenance = {
        **data_info,
        "init_from": str(init_from.resolve()),
        "label_fraction": datamodule.label_fraction,
        "labelled_train_cases": datamodule.labelled_train_cases,
        "global_step": int(trainer.global_step),
        "metrics": metrics,
        "training_config": OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg),
    }
    model_dir = None
    if cfg.get("model_dir") and trainer.is_global_zero:
        provenance = _pretrained_provenance(init_from)
        provenance["heads"] = {**dict(provenance.get("heads") or {}), "segmentation": head_provenance}
        model_dir = model.save_pretrained(Path(str(cfg.model_dir)).expanduser(), provenance=provenance)

    if trainer.is_global_zero:
        summary = {
            "task": "segment",
            "metrics": metrics,
            "global_step": int(trainer.global_step),
            "resumed_from": resumed_from,
            "init_from": str(init_from),
            "data": datamodule.describe(),
            "segmentation": config.to_dict(),
            "model_dir": None if model_dir is None else str(model_dir),
            "device": str(trainer.strategy.root_device),
            "precision": str(trainer.precision),
            "elapsed_s": round(time.perf_counter() - started, 1),
            "versions": model.config_dict()["versions"],
            "note": f"{data_info['data_note']}. {NOT_FOR_CLINICAL_USE}",
        }
        write_text_atomic(output_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
    objects = {
        "cfg": cfg,
        "model": model,
        "net": net,
        "datamodule": datamodule,
        "module": module,
        "trainer": trainer,
        "model_dir": model_dir,
        "resumed_from": resumed_from,
    }
    return metrics, objects
