"""Pretraining as a plain function: ``train(cfg) -> (metrics, objects)``.

``cfg`` is the composed Hydra config of ``conf/train.yaml`` (see
:func:`volumevlm.train.cli.compose_config`); ``volumevlm train key=value ...`` is a
thin wrapper. Everything goes under ``cfg.output_dir``::

    checkpoints/last.ckpt   Lightning training state (every N steps and at the end);
                            a rerun with the same output_dir resumes from it
    csv/, tensorboard/      logs (train/loss, val/r1_i2t, val/zero_shot_auroc, ...)
    cache/                  preprocessed volumes (data.cache_dir)
    model/                  the exported checkpoint directory (cfg.model_dir; volumevlm.load opens it)
    metrics.json            final validation figures, with the data, device and versions
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from volumevlm import NOT_FOR_CLINICAL_USE
from volumevlm.io.writers import write_text_atomic

LAST_CHECKPOINT = "last.ckpt"


def checkpoint_dir(cfg: DictConfig) -> Path:
    """Where Lightning checkpoints go (the ModelCheckpoint callback's dirpath)."""
    callback = (cfg.get("callbacks") or {}).get("model_checkpoint") or {}
    return Path(callback.get("dirpath") or Path(cfg.output_dir) / "checkpoints")


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    """Objects of every member of a callbacks/logger group that has a _target_."""
    if not group:
        return []
    return [instantiate(member) for member in group.values() if member and "_target_" in member]


def build_trainer(cfg: DictConfig, callbacks: Sequence[L.Callback] = (), **overrides: Any) -> L.Trainer:
    """The Lightning Trainer of cfg.trainer with cfg.callbacks + ``callbacks`` and cfg.logger
    (every task builds its trainer here). ``trainer.enable_progress_bar=false`` also drops
    the progress-bar callbacks, which Lightning would otherwise refuse with a traceback."""
    from lightning.pytorch.callbacks import ProgressBar

    built = [*_instantiate_all(cfg.get("callbacks")), *callbacks]
    if cfg.trainer.get("enable_progress_bar") is False:
        built = [c for c in built if not isinstance(c, ProgressBar)]
    return instantiate(cfg.trainer, callbacks=built, logger=_instantiate_all(cfg.get("logger")) or False, **overrides)


def data_provenance(root: Path, rows: Sequence[dict]) -> dict[str, Any]:
    """What the model was trained on, for config.json: the root and whether the data is synthetic."""
    synthetic = bool(rows) and all(bool(row.get("synthetic")) for row in rows)
    info_path = root / "cohort.json"
    if info_path.is_file():
        try:
            synthetic = synthetic or bool(json.loads(info_path.read_text()).get("synthetic"))
        except (OSError, json.JSONDecodeError):
            pass
    note = "synthetic-data: trained on a SYNTHETIC cohort, NOT clinical data" if synthetic else "trained on user data"
    return {"data_root": str(root), "synthetic": synthetic, "data_note": note, "train_cases": len(rows)}


def _float_metrics(values: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        value = float(value.detach().cpu()) if torch.is_tensor(value) else float(value)
        out[key] = value if math.isfinite(value) else None
    return out


def build(cfg: DictConfig):
    """(datamodule, module) from cfg.data and cfg.model; the datamodule is set up, so its
    tokenizer and phecode vocabulary (from the training split) are in the module."""
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    module = instantiate(
        cfg.model,
        tokenizer=datamodule.tokenizer,
        phecode_vocab=datamodule.phecode_vocab,
        preprocess=datamodule.preprocess.to_dict(),
        findings=datamodule.findings,
        _convert_="all",
    )
    if module.findings_weight:
        module.start_report_findings_at_prevalence(datamodule.train_reports())
    return datamodule, module


def train(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pretrain per ``cfg``; returns (metrics, objects).

    metrics: final figures (train/* and val/* keys, floats) also written to
    ``output_dir/metrics.json``. objects: {"cfg", "datamodule", "module", "trainer",
    "model_dir" (None unless exported), "resumed_from" (checkpoint path or None)}.
    callbacks: extra Lightning callbacks (besides cfg.callbacks), e.g. for tests.
    """
    started = time.perf_counter()
    output_dir = Path(cfg.output_dir).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    datamodule, module = build(cfg)
    trainer = build_trainer(cfg, callbacks)
    fast_dev_run = bool(cfg.trainer.get("fast_dev_run"))
    last = checkpoint_dir(cfg) / LAST_CHECKPOINT
    resumed_from = str(last) if (cfg.get("resume", True) and not fast_dev_run and last.is_file()) else None
    trainer.fit(module, datamodule=datamodule, ckpt_path=resumed_from)

    metrics = _float_metrics({k: v for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))})
    if not fast_dev_run:
        # The run's end is a checkpoint too, whatever the interval.
        trainer.save_checkpoint(last)
        if cfg.get("final_validation", True) and datamodule.val_rows:
            results = trainer.validate(module, datamodule=datamodule, verbose=False)
            metrics.update(_float_metrics(results[0] if results else {}))

    provenance = data_provenance(datamodule.root, datamodule.train_rows)
    model_dir = None
    if cfg.get("model_dir") and trainer.is_global_zero:
        provenance.update(
            global_step=int(trainer.global_step),
            metrics=metrics,
            training_config=OmegaConf.to_container(cfg, resolve=True),
        )
        model_dir = module.model.save_pretrained(Path(cfg.model_dir).expanduser(), provenance=provenance)

    if trainer.is_global_zero:
        summary = {
            "metrics": metrics,
            "global_step": int(trainer.global_step),
            "resumed_from": resumed_from,
            "data": datamodule.describe(),
            "model_dir": None if model_dir is None else str(model_dir),
            "device": str(trainer.strategy.root_device),
            "precision": str(trainer.precision),
            "elapsed_s": round(time.perf_counter() - started, 1),
            "versions": module.model.config_dict()["versions"],
            "note": f"{provenance['data_note']}. {NOT_FOR_CLINICAL_USE}",
        }
        write_text_atomic(output_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
    objects = {
        "cfg": cfg,
        "datamodule": datamodule,
        "module": module,
        "trainer": trainer,
        "model_dir": model_dir,
        "resumed_from": resumed_from,
    }
    return metrics, objects
