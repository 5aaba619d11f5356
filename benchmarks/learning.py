"""A supervised yardstick: a MONAI 3D classifier trained from scratch on the findings.

What could a network learn about the findings from the same training cases, in the
same wall-clock budget as the demo's pretraining, if it were told the labels? This
benchmark trains a MONAI 3D classification network (``--net``: ``resnet10`` (default),
``resnet18`` or ``densenet121``, ``spatial_dims=3``, random weights) on the manifest's
``findings`` of the cohort's ``train`` split and scores it on the held-out cases (the
``val`` and ``test`` splits by default), with the functions ``volumevlm evaluate`` uses
for zero-shot: macro AUROC with its 95% bootstrap interval over cases and per-finding
AUROC (:mod:`volumevlm.metrics`).

Input: THE preprocessing (:class:`volumevlm.data.datasets.PretrainDataset`) with the
parameters of ``experiment=demo`` (composed from the Hydra config: 4x4x6 mm, HU window
[-1000, 1000], 96x96x48), or those of a checkpoint (``--checkpoint DIR``: its
config.json); the network sees the volume through the same HU windows as our encoder
(input channels), so both models get the same input. Volumes are held in memory as
float16 after their first read, as the demo's datamodule does (``data.in_memory``).

Training: batch 16 (the demo's), AdamW, binary cross-entropy over the labelled entries,
the output layer's bias started at each finding's training prevalence (logit of it: the
loss starts at the labels' entropy instead of at log 2), linear warm-up then a cosine
decay over the budget (the fraction of ``--budget-s`` or ``--max-steps`` spent, whichever
is further along), no augmentation. The budget (``--budget-s``; by default the demo
pretraining's ``elapsed_s`` from ``--budget-from PRETRAIN/metrics.json``, else 500 s)
counts the training loop, data reading included, and stops after the step that crosses it;
with ``--compare`` on a demo output folder the pretraining's metrics.json beside the
compared checkpoint is found without ``--budget-from``.

``--compare METRICS_JSON`` (``volumevlm evaluate``'s metrics.json of our model on the same
cohort and splits) puts our zero-shot, ``linear_probe`` and ``baseline.voxel_probe``
figures (and, when the checkpoint has the heads, ``zero_shot_anatomy``, ``organ_probe``
and ``baseline.organ_voxel_probe``) beside the supervised one, macro and per finding.

Prints a table and writes ``benchmarks/results/learning-<device>-<date>[-TAG].json``
naming the device, versions, date, command, budget, steps done and seconds per step.

The synthetic cohort (``volumevlm synth``) is NOT clinical data: figures on it are a
yardstick for this package's models, not a clinical accuracy::

    volumevlm demo --out demo-output            # cohort, pretrained model, its evaluation
    nice -n 10 python benchmarks/learning.py --data demo-output/cohort \\
        --cache-dir demo-output/pretrain/cache --budget-from demo-output/pretrain/metrics.json \\
        --compare demo-output/eval/metrics.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NETS = ("resnet10", "resnet18", "densenet121")
DEFAULT_NET = "resnet10"
DEFAULT_BUDGET_S = 500.0
TRAIN_SPLIT = "train"
EVAL_SPLITS = "val,test"
SYNTHETIC_NOTE = "synthetic cohort, NOT clinical data"
# Sections of a ``volumevlm evaluate`` metrics.json shown beside the supervised figures.
LABELS = {"zero_shot": "zero-shot\n(ours)", "zero_shot_anatomy": "zero-shot,\norgan systems",
          "linear_probe": "linear probe\n(ours)", "organ_probe": "organ probe\n(ours)",
          "baseline.voxel_probe": "voxel probe\n(no model)", "baseline.organ_voxel_probe": "organ HU\n(no encoder)"}
COMPARED = (("zero_shot", ("zero_shot",)), ("zero_shot_anatomy", ("zero_shot_anatomy",)),
            ("linear_probe", ("linear_probe",)), ("organ_probe", ("organ_probe",)),
            ("baseline.voxel_probe", ("baseline", "voxel_probe")),
            ("baseline.organ_voxel_probe", ("baseline", "organ_voxel_probe")))


# ---------------------------------------------------------------------- input


def input_from_experiment(experiment: str = "demo", overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The preprocessing, HU windows and batch size of a Hydra experiment (composed from
    conf/, as ``volumevlm train experiment=NAME`` would)."""
    from omegaconf import OmegaConf

    from volumevlm.data.transforms import PreprocessConfig
    from volumevlm.train.cli import compose_config

    cfg = compose_config([f"experiment={experiment}", *overrides])
    preprocess = PreprocessConfig.from_dict(OmegaConf.to_container(cfg.data.preprocess, resolve=True))
    windows = OmegaConf.to_container(cfg.model.encoder.get("input_windows") or [], resolve=True)
    return {
        "source": f"experiment={experiment}" + (f" with {' '.join(overrides)}" if overrides else ""),
        "preprocess": preprocess.to_dict(),
        "input_windows": [[float(a), float(b)] for a, b in windows],
        # The encoder's windows re-window what the preprocessing mapped to [0, 1].
        "input_range": list(preprocess.hu_window),
        "batch_size": int(cfg.data.batch_size),
    }


def input_from_checkpoint(checkpoint: Path) -> dict[str, Any]:
    """The preprocessing and HU windows a checkpoint directory's config.json records."""
    from volumevlm.data.transforms import PreprocessConfig
    from volumevlm.errors import InputError

    path = checkpoint / "config.json" if checkpoint.is_dir() else checkpoint
    try:
        config = json.loads(path.read_text())
        preprocess = PreprocessConfig.from_dict(config["preprocess"])
        encoder = config["encoder"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(path, f"not a checkpoint config.json with 'preprocess' and 'encoder' ({type(err).__name__}: {err})") from None
    return {
        "source": f"checkpoint {path}",
        "preprocess": preprocess.to_dict(),
        "input_windows": [[float(a), float(b)] for a, b in encoder.get("input_windows") or []],
        "input_range": [float(v) for v in encoder.get("input_range") or preprocess.hu_window],
        "batch_size": None,
    }


# ---------------------------------------------------------------------- labels


def finding_targets(findings: Sequence[Mapping[str, Any] | None], names: Sequence[str]) -> np.ndarray:
    """float64 [N, F]: each case's 0/1 label per finding, -1 where the case does not label
    it (as ``volumevlm evaluate`` builds its targets)."""
    return np.array([[float((case or {}).get(name, -1)) for name in names] for case in findings],
                    dtype=np.float64).reshape(len(findings), len(names))


def train_prevalence(targets: np.ndarray) -> np.ndarray:
    """Share of positives among the labelled entries of each column (NaN: none labelled)."""
    labelled = targets >= 0
    positives = np.where(labelled, targets, 0.0).sum(axis=0)
    counts = labelled.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, positives / np.maximum(counts, 1), np.nan)


def prevalence_bias(targets: np.ndarray) -> torch.Tensor:
    """float32 [F]: the logit of each finding's training prevalence, the bias at which the
    sigmoid outputs it for every case. A finding with no positives (or no negatives) is
    held half a case away from 0 (1): the logit of 0.5 / (n + 1), finite."""
    counts = (targets >= 0).sum(axis=0)
    prevalence = np.nan_to_num(train_prevalence(targets), nan=0.5)
    floor = 0.5 / (counts + 1.0)
    p = np.clip(prevalence, floor, 1.0 - floor)
    return torch.tensor(np.log(p / (1.0 - p)), dtype=torch.float32)


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the labelled entries (targets 0/1; -1 left out)."""
    labelled = (targets >= 0).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, targets.clamp(min=0).to(logits.dtype), weight=labelled,
                                              reduction="sum")
    return loss / labelled.sum().clamp(min=1.0)


# ---------------------------------------------------------------------- the network


class FindingsClassifier(nn.Module):
    """The preprocessed CT [B, 1, X, Y, Z] -> finding logits [B, F]: our encoder's HU
    windows (one input channel each; none: the volume as is) in front of a MONAI 3D
    classification network trained from scratch."""

    def __init__(self, net: str, num_findings: int, input_windows: Sequence[Sequence[float]] = (),
                 input_range: Sequence[float] = (-1000.0, 1000.0)):
        super().__init__()
        from monai.networks import nets

        from volumevlm.models.encoder import HUWindows

        windows = tuple(tuple(float(v) for v in w) for w in input_windows)
        self.windows = HUWindows(windows, tuple(float(v) for v in input_range)) if windows else nn.Identity()
        channels = len(windows) or 1
        if net in ("resnet10", "resnet18"):
            # The standard ResNet stem (7x7x7 convolution at stride 2, then max-pooling):
            # MONAI's default stride 1 runs the whole network at 2x the resolution per axis,
            # 8x the compute, which a CPU budget cannot pay.
            self.net = getattr(nets, net)(spatial_dims=3, n_input_channels=channels, num_classes=num_findings,
                                          conv1_t_stride=2)
        elif net == "densenet121":
            self.net = nets.DenseNet121(spatial_dims=3, in_channels=channels, out_channels=num_findings)
        else:
            raise ValueError(f"--net: known networks are {', '.join(NETS)}, got {net!r}")
        self.name = net

    @property
    def head(self) -> nn.Linear:
        """The output layer (the last Linear of the network)."""
        return [m for m in self.net.modules() if isinstance(m, nn.Linear)][-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.windows(x))


# ---------------------------------------------------------------------- training


def lr_factor(step: int, progress: float, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from 1 to 0 over the budget's
    ``progress`` (0..1)."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    return warm * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def train_classifier(model: FindingsClassifier, loader, names: Sequence[str], *, budget_s: float | None,
                     max_steps: int | None, lr: float, weight_decay: float, warmup_steps: int, device: torch.device,
                     progress=None) -> dict[str, Any]:
    """Train until the budget (seconds of this loop) or ``max_steps`` is reached, whichever
    comes first. Returns steps, seconds, per-step seconds and the loss curve."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    task = progress.add_task("training", total=1000) if progress is not None else None
    steps, epochs, losses, step_times = 0, 0, [], []
    stopped_by = None
    started = time.perf_counter()
    while stopped_by is None:
        epochs += 1
        for batch in loader:
            elapsed = time.perf_counter() - started
            done = max(elapsed / budget_s if budget_s else 0.0, steps / max_steps if max_steps else 0.0)
            if steps and done >= 1.0:  # at least one step, whatever the budget
                stopped_by = "max_steps" if max_steps and steps >= max_steps else "budget"
                break
            step_start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(steps, done, warmup_steps)
            images = batch["image"].to(device)
            targets = torch.as_tensor(finding_targets(batch["findings"], names), dtype=torch.float32, device=device)
            loss = masked_bce(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            losses.append(float(loss.detach()))
            step_times.append(time.perf_counter() - step_start)
            if progress is not None:
                elapsed = time.perf_counter() - started
                done = max(elapsed / budget_s if budget_s else 0.0, steps / max_steps if max_steps else 0.0)
                progress.update(task, completed=min(1000, round(1000 * done)),
                                description=f"training: step {steps}, loss {losses[-1]:.3f}")
        else:
            if steps == 0:
                raise SystemExit("training: the train split gave no batch (fewer cases than --batch-size?)")
            continue
    seconds = time.perf_counter() - started
    return {
        "steps": steps,
        "epochs_started": epochs,
        "train_s": round(seconds, 2),
        "s_per_step": seconds / max(steps, 1),
        "s_per_step_median_compute": float(np.median(step_times)) if step_times else None,
        "stopped_by": stopped_by,
        "first_loss": losses[0] if losses else None,
        "final_loss_mean_last_10": float(np.mean(losses[-10:])) if losses else None,
        "loss_every_10_steps": [round(v, 4) for v in losses[::10]],
    }


@torch.no_grad()
def predict(model: nn.Module, dataset, batch_size: int, device: torch.device, progress=None) -> np.ndarray:
    """Logits float64 [N, F] of the dataset's cases (eval mode, in order)."""
    model.eval()
    task = progress.add_task("scoring held-out cases", total=len(dataset)) if progress is not None else None
    out = []
    for start in range(0, len(dataset), batch_size):
        images = torch.stack([dataset.image(i) for i in range(start, min(start + batch_size, len(dataset)))])
        out.append(model(images.to(device)).float().cpu().numpy().astype(np.float64))
        if progress is not None:
            progress.advance(task, images.shape[0])
    return np.concatenate(out) if out else np.zeros((0, 0))


def score(scores: np.ndarray, targets: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Macro AUROC (findings with both classes among the scored cases), its 95% bootstrap
    interval over cases and per-finding AUROC: the functions zero-shot is scored with."""
    from volumevlm.metrics import macro_auroc, macro_auroc_interval, per_finding_auroc

    macro, used = macro_auroc(scores, targets)
    return {
        "macro_auroc": macro if used else None,
        "macro_auroc_ci95": macro_auroc_interval(scores, targets) if used else None,
        "per_finding": per_finding_auroc(scores, targets, names),
        "findings_scored": used,
        "findings": len(names),
        "chance": 0.5,
    }


# ---------------------------------------------------------------------- comparison


def split_names(split: str) -> list[str]:
    return sorted(s.strip() for s in str(split).split(",") if s.strip())


def compared_figures(path: Path, splits: str, n_cases: int) -> dict[str, Any]:
    """Our model's figures from a ``volumevlm evaluate`` metrics.json made on the same
    splits and cases: {section: {macro_auroc, macro_auroc_ci95, per_finding} | {skipped}}."""
    from volumevlm.errors import InputError

    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(path, f"not a readable metrics.json ({type(err).__name__}: {err})") from None
    if not isinstance(metrics, dict) or "split" not in metrics:
        raise InputError(path, "not a volumevlm evaluate metrics.json (no 'split')")
    if split_names(metrics["split"]) != split_names(splits) or metrics.get("n_cases") != n_cases:
        raise InputError(path, f"evaluated split {metrics['split']!r} ({metrics.get('n_cases')} cases), not the "
                               f"benchmark's {splits!r} ({n_cases} cases): the figures would not compare")
    out: dict[str, Any] = {"source": str(path), "checkpoint": metrics.get("checkpoint"), "date": metrics.get("date"),
                           "command": metrics.get("command")}
    for name, keys in COMPARED:
        section: Any = metrics
        for key in keys:
            section = section.get(key, {}) if isinstance(section, dict) else {}
        if not section or "skipped" in section:
            out[name] = {"skipped": section.get("skipped", "not in the metrics file") if section else "not in the metrics file"}
            continue
        out[name] = {key: section.get(key) for key in ("macro_auroc", "macro_auroc_ci95", "per_finding",
                                                        "findings_scored")}
    return out


# ---------------------------------------------------------------------- report


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3f}"


def _fmt_interval(interval: Any) -> str:
    return "-" if not interval else f"[{interval[0]:.2f}, {interval[1]:.2f}]"


def format_table(results: Mapping[str, Any]):
    """A Rich table: per finding, the training prevalence and each model's AUROC; the macro
    row with its 95% bootstrap interval."""
    from rich.table import Table

    compare = results.get("compare") or {}
    columns = [(f"supervised\n{results['settings']['net']}", results["supervised"])]
    columns += [(LABELS[name], compare[name]) for name, _ in COMPARED if name in compare and "skipped" not in compare[name]]
    data = results["data"]
    title = (f"Held-out AUROC, {data['eval_cases']} cases of {data['eval_splits']!r}; supervised: "
             f"{results['training']['steps']} steps in {results['training']['train_s']:.0f} s")
    table = Table(title=title, caption=SYNTHETIC_NOTE if data.get("synthetic") else None)
    table.add_column("finding", no_wrap=True)
    table.add_column("train\nprevalence", justify="right")
    for label, _ in columns:
        table.add_column(label, justify="right")
    for name, prevalence in results["prevalence"].items():
        table.add_row(name, _fmt(prevalence), *(_fmt((section.get("per_finding") or {}).get(name))
                                                for _, section in columns))
    table.add_section()
    table.add_row("macro AUROC", "", *(_fmt(section.get("macro_auroc")) for _, section in columns))
    table.add_row("95% CI (bootstrap over cases)", "", *(_fmt_interval(section.get("macro_auroc_ci95"))
                                                          for _, section in columns))
    table.add_row("chance", "", *("0.500" for _ in columns))
    return table


def device_slug(device: torch.device) -> str:
    """File-name form of the device: "cpu", or the GPU's name ("nvidia-h100-80gb-hbm3")."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


# ---------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="cohort folder holding manifest.jsonl")
    parser.add_argument("--net", choices=NETS, default=DEFAULT_NET, help=f"MONAI network (default {DEFAULT_NET})")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="training wall-clock budget in seconds (default: --budget-from's, else "
                             f"{DEFAULT_BUDGET_S:g}; 0 with --max-steps: steps only)")
    parser.add_argument("--budget-from", type=Path, default=None, metavar="PRETRAIN_METRICS_JSON",
                        help="a pretraining run's metrics.json (the demo's OUT/pretrain/metrics.json): its "
                             "elapsed_s is the budget (default: the one beside --compare's checkpoint, if any)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--splits", default=EVAL_SPLITS, help=f"held-out splits scored (default {EVAL_SPLITS})")
    parser.add_argument("--compare", type=Path, default=None, metavar="METRICS_JSON",
                        help="volumevlm evaluate's metrics.json of our model on the same cohort and splits")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="take preprocessing and HU windows from this checkpoint's config.json "
                             "instead of experiment=demo")
    parser.add_argument("--experiment", default="demo", help="Hydra experiment whose preprocessing is used")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Hydra override for that composition (repeatable)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the experiment's (demo: 16)")
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="preprocessed-volume cache (the demo's OUT/pretrain/cache is reused as is)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder of the results JSON")
    parser.add_argument("--tag", default="", help="suffix of the results file name (e.g. smoke)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.max_steps is not None and args.max_steps < 1:
        parser.error("--max-steps must be at least 1")
    if args.budget_s is not None and args.budget_s < 0:
        parser.error("--budget-s must be >= 0")
    if args.budget_s == 0 and args.max_steps is None:
        parser.error("--budget-s 0 needs --max-steps")
    return args


def demo_pretrain_metrics(compare: Mapping[str, Any] | None) -> Path | None:
    """The pretraining metrics.json of the demo output the compared checkpoint sits in
    (``OUT/model`` beside ``OUT/pretrain/metrics.json``), when there is one."""
    if not compare or not compare.get("checkpoint"):
        return None
    path = Path(compare["checkpoint"]).parent / "pretrain" / "metrics.json"
    return path if path.is_file() else None


def resolve_budget(args: argparse.Namespace, compare: Mapping[str, Any] | None = None) -> tuple[float | None, str]:
    """(seconds or None for steps only, where the figure came from): ``--budget-s``, else
    the ``elapsed_s`` of ``--budget-from`` or of the compared demo's pretraining, else
    steps only when ``--max-steps`` is given, else the default."""
    from volumevlm.errors import InputError

    if args.budget_s is not None:
        return (args.budget_s or None), "--budget-s"
    source = args.budget_from or demo_pretrain_metrics(compare)
    if source is not None:
        try:
            seconds = float(json.loads(Path(source).read_text())["elapsed_s"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InputError(source, f"no pretraining elapsed_s to take the budget from ({type(err).__name__}: {err})") from None
        return seconds, f"elapsed_s of {source}"
    if args.max_steps is not None:
        return None, "--max-steps only"
    return DEFAULT_BUDGET_S, "default"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from rich.console import Console

    import volumevlm
    from volumevlm.data.datasets import PretrainDataset, collate_cases
    from volumevlm.eval.evaluate import _progress, device_description, is_synthetic, read_split
    from volumevlm.io.writers import write_text_atomic
    from volumevlm.provenance import package_versions
    from volumevlm.train.datamodule import CaseDataset, findings_of

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spec = input_from_checkpoint(args.checkpoint) if args.checkpoint else input_from_experiment(args.experiment, args.override)
    batch_size = int(args.batch_size or spec["batch_size"] or 16)

    train_rows = read_split(args.data, TRAIN_SPLIT)
    eval_rows = read_split(args.data, args.splits)
    if set(split_names(args.splits)) & {TRAIN_SPLIT}:
        raise SystemExit(f"--splits {args.splits!r}: the held-out splits must not include {TRAIN_SPLIT!r}")
    names = findings_of(train_rows)
    if not names:
        raise SystemExit(f"{args.data}: the {TRAIN_SPLIT!r} cases carry no 'findings' labels")
    train_targets = finding_targets([row.get("findings") for row in train_rows], names)
    eval_targets = finding_targets([row.get("findings") for row in eval_rows], names)
    synthetic = is_synthetic(args.data, train_rows + eval_rows)
    compare = compared_figures(args.compare, args.splits, len(eval_rows)) if args.compare else None
    budget_s, budget_source = resolve_budget(args, compare)

    torch.manual_seed(args.seed)
    model = FindingsClassifier(args.net, len(names), spec["input_windows"], spec["input_range"])
    with torch.no_grad():
        model.head.bias.copy_(prevalence_bias(train_targets))
    model.to(device)

    train_set = CaseDataset(PretrainDataset(train_rows, spec["preprocess"], cache_dir=args.cache_dir), in_memory=True)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=batch_size, shuffle=True, num_workers=0, collate_fn=collate_cases,
        drop_last=len(train_set) >= batch_size, generator=torch.Generator().manual_seed(args.seed))
    eval_set = PretrainDataset(eval_rows, spec["preprocess"], cache_dir=args.cache_dir)

    with _progress(not args.no_progress) as bar:
        training = train_classifier(model, loader, names, budget_s=budget_s, max_steps=args.max_steps, lr=args.lr,
                                    weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, device=device,
                                    progress=bar)
        started = time.perf_counter()
        scores = predict(model, eval_set, args.eval_batch_size, device, progress=bar)
        eval_s = time.perf_counter() - started
    supervised = score(scores, eval_targets, names)

    date = dt.datetime.now(dt.timezone.utc)
    prevalence = train_prevalence(train_targets)
    results = {
        "benchmark": "learning (supervised yardstick)",
        "device": device_description(device),
        "versions": package_versions("volumevlm", "torch", "monai", "numpy"),
        "date": date.isoformat(timespec="seconds"),
        "command": (shlex.join(["python", "benchmarks/learning.py", *sys.argv[1:]]) if argv is None
                    else shlex.join(["python", "benchmarks/learning.py", *argv])),
        "data": {"root": str(args.data), "train_split": TRAIN_SPLIT, "train_cases": len(train_rows),
                 "eval_splits": args.splits, "eval_cases": len(eval_rows), "synthetic": synthetic,
                 "note": SYNTHETIC_NOTE if synthetic else "user data"},
        "input": spec,
        "settings": {"net": args.net, "parameters": sum(p.numel() for p in model.parameters()),
                     "batch_size": batch_size, "optimizer": "AdamW", "lr": args.lr,
                     "weight_decay": args.weight_decay, "warmup_steps": args.warmup_steps,
                     "schedule": "linear warm-up, then cosine to 0 over the budget's fraction spent",
                     "loss": "binary cross-entropy over labelled entries",
                     "head_bias": "logit of each finding's train prevalence", "augmentation": None,
                     "volumes_in_memory": "float16 after the first read", "seed": args.seed,
                     "threads": torch.get_num_threads()},
        "budget": {"budget_s": budget_s, "source": budget_source, "max_steps": args.max_steps,
                   "counts": "the training loop, data reading included; evaluation excluded"},
        "training": training,
        "eval_s": round(eval_s, 1),
        "findings": names,
        "prevalence": {name: (None if math.isnan(p) else float(p)) for name, p in zip(names, prevalence)},
        "supervised": supervised,
        "compare": compare,
        "note": (f"{SYNTHETIC_NOTE}. " if synthetic else "") + volumevlm.NOT_FOR_CLINICAL_USE,
    }
    console = Console()
    # Piped to a file, Rich would wrap the table at 80 columns.
    (console if console.is_terminal else Console(width=120)).print(format_table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"learning-{device_slug(device)}-{date.date().isoformat()}" + (f"-{args.tag}" if args.tag else "")
    path = write_text_atomic(args.out / f"{stem}.json", json.dumps(results, indent=2, allow_nan=False) + "\n")
    print(f"results: {path}" + (f" ({SYNTHETIC_NOTE})" if synthetic else ""))
    return results


if __name__ == "__main__":
    from volumevlm.errors import VolumeVLMError

    try:
        main()
    except VolumeVLMError as err:  # bad input: one line, no traceback
        raise SystemExit(f"error: {err}") from None
