"""``volumevlm demo``: the end-to-end demo on the embedded synthetic cohort.

Everything goes under ``--out`` (``demo-output/`` from ``make demo``):

1. ``cohort/``: the synthetic CT cohort (NOT clinical data); a summary is printed.
2. ``pretrain/``: the tiny VolumeVLM pretrained on it with ``experiment=demo``
   (checkpoints, CSV/TensorBoard logs, metrics.json); the validation figures
   (retrieval recall, zero-shot and phenotype AUROC, with chance levels) are printed.
3. ``model/``: the exported checkpoint directory, opened by ``volumevlm.load``.

A rerun with the same ``--out`` reuses the cohort and resumes (or, when finished,
only re-validates) the training run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from volumevlm import NOT_FOR_CLINICAL_USE

DEMO_CASES = 200
DEMO_SEED = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default: demo-output)")
    parser.add_argument("--n", type=int, default=DEMO_CASES, help=f"synthetic cases (default {DEMO_CASES})")
    parser.add_argument("--seed", type=int, default=DEMO_SEED)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="regenerate the cohort even if a matching one exists")
    parser.add_argument("--no-train", action="store_true", help="stop after the cohort (no pretraining)")
    parser.add_argument("--max-steps", type=int, default=None, help="training steps (default: experiment=demo's)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Hydra override for the pretraining run (repeatable)")


def _existing_cohort_matches(cohort_dir: Path, n: int, seed: int) -> bool:
    """A cohort already on disk is reused only if it was made with the same n and seed."""
    info_path = cohort_dir / "cohort.json"
    if not (info_path.is_file() and (cohort_dir / "manifest.jsonl").is_file()):
        return False
    info = json.loads(info_path.read_text())
    return info.get("n") == n and info.get("seed") == seed and info.get("shape") is not None


def run(args: argparse.Namespace) -> int:
    from volumevlm.data.synthetic.cohort import format_summary, generate_cohort, summarize_cohort

    started = time.perf_counter()
    out = Path(args.out)
    cohort_dir = out / "cohort"
    print(f"volumevlm demo -> {out.resolve()}")
    print("The cohort is SYNTHETIC (procedural phantoms, generated reports and codes): not clinical data.")
    stages = 1 if args.no_train else 2
    if not args.force and _existing_cohort_matches(cohort_dir, args.n, args.seed):
        print(f"[1/{stages}] reusing the synthetic cohort in {cohort_dir} (use --force to regenerate)")
        summary = summarize_cohort(cohort_dir)
    else:
        print(f"[1/{stages}] synthesizing {args.n} cases (seed {args.seed}) into {cohort_dir}")
        summary = generate_cohort(cohort_dir, n=args.n, seed=args.seed, workers=args.workers, progress=True,
                                  overwrite=args.force)
    print(format_summary(summary))
    if not args.no_train:
        _pretrain(out, cohort_dir, args)
    print(f"demo finished in {time.perf_counter() - started:.1f} s. {NOT_FOR_CLINICAL_USE}")
    return 0


def _pretrain(out: Path, cohort_dir: Path, args: argparse.Namespace) -> None:
    """Stage 2: pretrain the tiny model (experiment=demo) and print the validation figures."""
    from volumevlm.train.cli import compose_config, format_metrics
    from volumevlm.train.train import train

    overrides = [
        "experiment=demo",
        f"data.root={cohort_dir.resolve()}",
        f"output_dir={(out / 'pretrain').resolve()}",
        f"model_dir={(out / 'model').resolve()}",
    ]
    if args.max_steps is not None:
        overrides.append(f"trainer.max_steps={int(args.max_steps)}")
    overrides += list(args.override)
    cfg = compose_config(overrides)
    print(f"[2/2] pretraining the tiny VolumeVLM: volumevlm train {' '.join(overrides)}")
    started = time.perf_counter()
    metrics, objects = train(cfg)
    datamodule = objects["datamodule"]
    print(f"pretraining: {objects['trainer'].global_step} steps in {time.perf_counter() - started:.1f} s; "
          f"validation on {len(datamodule.val_rows)} held-out synthetic cases "
          f"(trained on {len(datamodule.train_rows)}):")
    print(format_metrics(metrics))
    print(f"model: {objects['model_dir']} (open with volumevlm.load); logs and metrics.json: {out / 'pretrain'}")
