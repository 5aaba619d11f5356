"""``volumevlm demo``: the end-to-end demo on the embedded synthetic cohort.

Everything goes under ``--out`` (``demo-output/`` from ``make demo``):

1. ``cohort/``: the synthetic CT cohort (NOT clinical data); a summary is printed.
2. ``pretrain/``: the tiny VolumeVLM pretrained on it with ``experiment=demo``
   (checkpoints, CSV/TensorBoard logs, metrics.json); the validation figures
   (retrieval recall, zero-shot and phenotype AUROC, with chance levels) are printed.
3. ``segment/``: a segmentation head trained on the pretrained encoder
   (``task=segment experiment=segment_demo init_from=OUT/model``), written back into
   ``model/``.
4. ``report/``: a report-generation head on the frozen encoder
   (``task=report experiment=report_demo init_from=OUT/model``), written back into
   ``model/``: ONE checkpoint directory holds the model and all its heads.
5. ``eval/``: ``volumevlm evaluate`` of that checkpoint on the held-out synthetic cases
   (``metrics.json`` + plots); its table of headline figures and chance levels is printed.

``model/`` is the exported checkpoint directory, opened by ``volumevlm.load``.
``--no-heads`` skips stages 3 and 4, ``--no-eval`` stage 5. A rerun with the same
``--out`` reuses the cohort and resumes (or, when finished, only re-validates) each
training run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from volumevlm import NOT_FOR_CLINICAL_USE

# 420 training cases: on 140 the 300 demo steps are 34 epochs and the contrastive term
# memorizes the pairs; 600 cases lifted held-out zero-shot AUROC from 0.585 [0.52, 0.66]
# (60 cases) to 0.619 [0.59, 0.65] (180 cases) at the same step count (README).
DEMO_CASES = 600
DEMO_SEED = 0
# Every held-out case: no stage selects a model on "val" (each exports its last weights),
# so val is as unseen as test, and 180 cases fill several of Merlin's retrieval pools of 32.
EVAL_SPLIT = "val,test"


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
    parser.add_argument("--no-heads", action="store_true",
                        help="skip the segmentation and report heads (stages 3 and 4)")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation (stage 5)")
    parser.add_argument("--eval-split", default=EVAL_SPLIT,
                        help=f"cohort split(s) to evaluate, comma-separated (default {EVAL_SPLIT}: every held-out case)")


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
    plan = ["cohort"]
    if not args.no_train:
        plan.append("pretrain")
        if not args.no_heads:
            plan += ["segment", "report"]
        if not args.no_eval:
            plan.append("evaluate")
    stages = len(plan)
    if not args.force and _existing_cohort_matches(cohort_dir, args.n, args.seed):
        print(f"[1/{stages}] reusing the synthetic cohort in {cohort_dir} (use --force to regenerate)")
        summary = summarize_cohort(cohort_dir)
    else:
        print(f"[1/{stages}] synthesizing {args.n} cases (seed {args.seed}) into {cohort_dir}")
        summary = generate_cohort(cohort_dir, n=args.n, seed=args.seed, workers=args.workers, progress=True,
                                  overwrite=args.force)
    print(format_summary(summary))
    timings: dict[str, float] = {}
    for number, stage in enumerate(plan[1:], start=2):
        began = time.perf_counter()
        STAGES[stage](out, cohort_dir, args, f"[{number}/{stages}]")
        timings[stage] = time.perf_counter() - began
    if timings:
        print("stage times: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()))
    print(f"demo finished in {time.perf_counter() - started:.1f} s. {NOT_FOR_CLINICAL_USE}")
    return 0


def _pretrain(out: Path, cohort_dir: Path, args: argparse.Namespace, step: str = "[2/2]") -> None:
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
    print(f"{step} pretraining the tiny VolumeVLM: volumevlm train {' '.join(overrides)}")
    started = time.perf_counter()
    metrics, objects = train(cfg)
    datamodule = objects["datamodule"]
    print(f"pretraining: {objects['trainer'].global_step} steps in {time.perf_counter() - started:.1f} s; "
          f"validation on {len(datamodule.val_rows)} held-out synthetic cases "
          f"(trained on {len(datamodule.train_rows)}):")
    print(format_metrics(metrics))
    print(f"model: {objects['model_dir']} (open with volumevlm.load); logs and metrics.json: {out / 'pretrain'}")


def _head_stage(out: Path, cohort_dir: Path, step: str, task: str, experiment: str, what: str,
                extra: list[str] | None = None) -> None:
    """Train one head on OUT/model and write the model, head attached, back into OUT/model."""
    from volumevlm.train.cli import compose_config, format_metrics, run_task

    model_dir = (out / "model").resolve()
    overrides = [
        f"task={task}",
        f"experiment={experiment}",
        f"init_from={model_dir}",
        f"data.root={cohort_dir.resolve()}",
        f"output_dir={(out / task).resolve()}",
        f"model_dir={model_dir}",
        *(extra or []),
    ]
    print(f"{step} {what}: volumevlm train {' '.join(overrides)}")
    started = time.perf_counter()
    metrics, objects = run_task(compose_config(overrides))
    print(f"{task}: {objects['trainer'].global_step} steps in {time.perf_counter() - started:.1f} s; "
          f"validation figures (synthetic cases, not clinical):")
    print(format_metrics(metrics))
    print(f"model with the {task} head: {objects['model_dir']}")


def _segment(out: Path, cohort_dir: Path, args: argparse.Namespace, step: str) -> None:
    _head_stage(out, cohort_dir, step, "segment", "segment_demo", "segmentation head on the pretrained encoder")


def _report(out: Path, cohort_dir: Path, args: argparse.Namespace, step: str) -> None:
    # The report task reads images through the pretraining's preprocessing: reuse its cache.
    _head_stage(out, cohort_dir, step, "report", "report_demo", "report generator on the frozen encoder",
                [f"data.cache_dir={(out / 'pretrain' / 'cache').resolve()}"])


def _evaluate(out: Path, cohort_dir: Path, args: argparse.Namespace, step: str) -> None:
    import shlex

    from volumevlm.eval.evaluate import evaluate, format_table

    model_dir, eval_dir = (out / "model").resolve(), (out / "eval").resolve()
    cache_dir = (out / "pretrain" / "cache").resolve()
    command = shlex.join(["volumevlm", "evaluate", "--checkpoint", str(model_dir), "--data", str(cohort_dir.resolve()),
                          "--out", str(eval_dir), "--split", args.eval_split, "--cache-dir", str(cache_dir)])
    print(f"{step} evaluating every protocol of {model_dir}: {command}")
    metrics = evaluate(model_dir, cohort_dir, eval_dir, split=args.eval_split, cache_dir=cache_dir, command=command)
    print(format_table(metrics))
    print(f"metrics: {eval_dir / 'metrics.json'}; plots: {', '.join(metrics['plots'])}")


STAGES = {"pretrain": _pretrain, "segment": _segment, "report": _report, "evaluate": _evaluate}
