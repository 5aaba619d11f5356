"""``volumevlm train [key=value ...]``: pretraining from the Hydra configs in ``conf/``.

Arguments are Hydra overrides of ``conf/train.yaml``, e.g.::

    volumevlm train experiment=demo data.root=demo-output/cohort output_dir=OUT
    volumevlm train experiment=merlin_like data.root=DIR trainer.devices=2 trainer=ddp
    volumevlm train experiment=demo data.root=DIR debug=fdr        # fast_dev_run smoke test

The config folder is :func:`volumevlm.resources.conf_dir` (``$VOLUMEVLM_CONF``, else the
installed package's ``volumevlm/conf``, else the repository's top-level ``conf/``). The
composed config is printed with ``--print-config``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from volumevlm.errors import VolumeVLMError
from volumevlm.resources import CONF_ENV, TRAIN_CONFIG_NAME, conf_dir  # noqa: F401 (CONF_ENV: public here too)

CONFIG_NAME = TRAIN_CONFIG_NAME


def compose_config(overrides: Sequence[str] = (), config_dir: str | os.PathLike | None = None):
    """The composed ``train`` config (an OmegaConf DictConfig) with ``overrides`` applied."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    folder = Path(config_dir).resolve() if config_dir else conf_dir()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(folder), version_base="1.3", job_name="volumevlm_train"):
            return compose(config_name=CONFIG_NAME, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        raise VolumeVLMError(f"{folder / (CONFIG_NAME + '.yaml')}: {message}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="Hydra overrides, e.g. experiment=demo data.root=DIR output_dir=OUT")
    parser.add_argument("--print-config", action="store_true", help="print the composed config and exit")


def run(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    cfg = compose_config(args.overrides)
    if args.print_config:
        print(OmegaConf.to_yaml(cfg))
        return 0
    if OmegaConf.is_missing(cfg.data, "root"):
        raise VolumeVLMError("data.root: not set; give the dataset folder, e.g. volumevlm train experiment=demo data.root=DIR")
    metrics, objects = run_task(cfg)
    print(format_metrics(metrics))
    if objects.get("model_dir") is not None:
        print(f"model: {objects['model_dir']}")
    return 0


TASKS = {
    "pretrain": "volumevlm.train.train:train",
    "segment": "volumevlm.train.segment:train_segmentation",
    "report": "volumevlm.train.report:train_report",
}


def run_task(cfg) -> tuple[dict, dict]:
    """Run the training ``cfg.task`` names; returns its (metrics, objects)."""
    import importlib

    task = str(cfg.get("task") or "pretrain")
    if task not in TASKS:
        raise VolumeVLMError(f"task={task}: unknown task (known: {', '.join(TASKS)})")
    if task != "pretrain" and not cfg.get("init_from"):
        raise VolumeVLMError(f"task={task}: init_from is not set; "
                             "give the pretrained checkpoint directory, e.g. init_from=demo-output/model")
    module_name, function_name = TASKS[task].split(":")
    return getattr(importlib.import_module(module_name), function_name)(cfg)


def format_metrics(metrics: dict) -> str:
    """Validation figures as aligned lines, chance levels alongside."""
    chance = {"val/r1_i2t": metrics.get("val/chance_r1"), "val/r1_t2i": metrics.get("val/chance_r1"),
              "val/r5_i2t": metrics.get("val/chance_r5"), "val/r5_t2i": metrics.get("val/chance_r5"),
              "val/zero_shot_auroc": 0.5, "val/phenotype_auroc": 0.5,
              "val/mean_dice": None, "val/loss": None, "val/clinical_f1": None, "val/bleu4": None}
    lines = [f"{'metric':<24}{'value':>8}{'chance':>9}"]
    for key, level in chance.items():
        value = metrics.get(key)
        if value is None:
            continue
        lines.append(f"{key:<24}{value:>8.3f}{'' if level is None else format(level, '>9.3f')}")
    return "\n".join(lines)
