"""Where the demo's pretraining step spends its time (torch.profiler, CPU).

Builds the run of ``volumevlm train experiment=demo`` on a cohort (the datamodule and the
LightningModule exactly as :func:`volumevlm.train.train.build` makes them), fills the
preprocessing cache with one pass over the training cases, then times training steps as
the Lightning loop runs them (next batch from the train dataloader, the module's
``training_step``, backward, AdamW step):

1. ``--steps`` steps without the profiler: wall seconds per step and steps per second;
2. ``--profile-steps`` more under ``torch.profiler`` with a labelled range around each part
   of the step (loading the batch, image encoder, text tower, tokenization, the labeler's
   targets and sentences, backward, optimizer), printed as a table of CPU time per step.

    python benchmarks/pretrain_profile.py --data demo-output/cohort --work /tmp/profile

Results: a table, and benchmarks/results/pretrain-profile-<device>-<date>.json naming the
device, versions, date and command. The cohort is synthetic: not clinical data.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The parts of a step timed as labelled ranges: (object path on the module, method, label).
PARTS = (
    ("model.encoder", "forward", "image encoder"),
    ("model.text", "forward", "text tower"),
    ("model.text", "tokenize", "tokenization"),
    ("", "report_findings_targets", "labeler: report findings targets"),
    ("", "finding_sentences", "labeler: finding sentences"),
    ("", "phenotype_targets", "phenotype targets"),
    ("", "training_texts", "report sections / texts"),
)


def _labelled(method, label: str):
    @functools.wraps(method)
    def run(*args, **kwargs):
        with record_function(label):
            return method(*args, **kwargs)

    return run


def label_parts(module) -> list[str]:
    """Wrap the step's parts (those the module has) in profiler ranges; returns their labels."""
    labels = []
    for path, name, label in PARTS:
        target = module
        for attribute in filter(None, path.split(".")):
            target = getattr(target, attribute)
        if hasattr(target, name):
            setattr(target, name, _labelled(getattr(target, name), label))
            labels.append(label)
    return labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="cohort folder (manifest.jsonl), e.g. demo-output/cohort")
    parser.add_argument("--work", required=True, type=Path, help="scratch output_dir (vocabulary, preprocessing cache)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps without the profiler")
    parser.add_argument("--profile-steps", type=int, default=10, help="steps under torch.profiler")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="extra Hydra override")
    parser.add_argument("--tag", default="", help="suffix of the results file name (e.g. before / after)")
    args = parser.parse_args(argv)

    import lightning as L

    from volumevlm.provenance import cpu_name, package_versions
    from volumevlm.train.cli import compose_config
    from volumevlm.train.train import build

    overrides = ["experiment=demo", f"data.root={args.data.resolve()}", f"output_dir={args.work.resolve()}",
                 *args.override]
    cfg = compose_config(overrides)
    L.seed_everything(int(cfg.seed), verbose=False)
    started = time.perf_counter()
    datamodule, module = build(cfg)
    build_s = time.perf_counter() - started
    optimizer = module.configure_optimizers()["optimizer"]
    loader = datamodule.train_dataloader()

    started = time.perf_counter()
    for _ in loader:  # one epoch: fills the preprocessing cache, as the demo's first epoch does
        pass
    first_epoch_s = time.perf_counter() - started

    module.train()
    batches = iter(loader)

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(loader)
            return next(batches)

    def step(index: int) -> None:
        with record_function("data: next batch"):
            batch = next_batch()
        with record_function("training_step (forward + losses)"):
            loss = module.compute_losses(batch)["loss"]
        with record_function("backward"):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with record_function("optimizer"):
            optimizer.step()

    step(0)  # warm-up
    started = time.perf_counter()
    for index in range(args.steps):
        step(index)
    step_s = (time.perf_counter() - started) / max(1, args.steps)

    labels = label_parts(module)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for index in range(args.profile_steps):
            step(index)
    events = {e.key: e for e in prof.key_averages()}
    ranges = ["data: next batch", "training_step (forward + losses)", "backward", "optimizer", *labels]
    per_step = {name: events[name].cpu_time_total / 1e6 / args.profile_steps for name in ranges if name in events}
    total = sum(per_step[name] for name in ranges[:4] if name in per_step)
    print(f"pretraining step of experiment=demo, batch {cfg.data.batch_size}, {torch.get_num_threads()} threads, "
          f"{cpu_name()} (synthetic data, not clinical)")
    print(f"without the profiler: {step_s:.3f} s/step = {1 / step_s:.3f} steps/s over {args.steps} steps; "
          f"first epoch (preprocessing into the cache) {first_epoch_s:.1f} s; build {build_s:.1f} s")
    print(f"{'part (profiled, per step)':<40} {'s':>8} {'share':>7}")
    for name in ranges:
        if name in per_step:
            indent = "  " if name in labels else ""
            print(f"{indent + name:<40} {per_step[name]:8.3f} {per_step[name] / total:7.1%}")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    print(table)

    result = {
        "benchmark": "pretrain step profile (experiment=demo)",
        "device": {"type": "cpu", "name": cpu_name(), "threads": torch.get_num_threads()},
        "versions": package_versions("volumevlm", "torch", "monai", "lightning", "transformers"),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "data": str(args.data), "train_cases": len(datamodule.train_rows), "batch_size": int(cfg.data.batch_size),
        "step_s": step_s, "steps_per_s": 1 / step_s, "timed_steps": args.steps,
        "first_epoch_s": first_epoch_s, "build_s": build_s,
        "profiled_steps": args.profile_steps, "profiled_s_per_step": per_step,
        "top_ops_self_cpu": table,
        "note": "synthetic data, not clinical; CPU timings on a shared machine",
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    name = f"pretrain-profile-cpu-{dt.date.today().isoformat()}{'-' + args.tag if args.tag else ''}.json"
    (RESULTS_DIR / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {RESULTS_DIR / name}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
