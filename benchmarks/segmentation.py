"""Segmentation against a dedicated network, and label efficiency.

Trains, on the same labelled cases, with the same crops, augmentation, loss (DiceCE),
optimizer and number of steps (one :class:`volumevlm.train.segment.SegmentationModule`
drives both):

* ``ours``: the pretrained encoder of ``--checkpoint`` + the segmentation decoder the
  demo trains (:class:`volumevlm.models.segmentation.SegmentationNet`, ``decoder="fused"``:
  a U-Net on the image, shaped as the yardstick, whose bottleneck adds the pretrained
  encoder's tokens);
* ``unet``: a MONAI ``UNet`` (3D, residual units) trained from scratch, given the same
  input channels (the checkpoint encoder's HU windows, a fixed preprocessing step);

at each label fraction (default 1.0, 0.25, 0.1: the first share of the labelled
training cases, the rule of ``segmentation.label_fraction``), then scores both on the
same held-out cases (the cohort's ``val`` split) on the preprocessed grid with
``volumevlm.metrics`` (per-label Dice and HD95 in mm).

Prints a table, writes ``benchmarks/results/segmentation-cpu-<date>-<steps>steps.json``
(device, versions, date, command) and a PNG plot of mean Dice against label fraction.

The synthetic cohort is NOT clinical data; nothing here is a clinical accuracy.

Small defaults are sized for a shared 2-core CPU (30 steps on 48x48x32 crops, a
MONAI UNet of widths 8..64, 4 held-out cases); ``--full`` is the demo's budget (400
steps on 64x64x48 crops, decoder width 16, UNet widths 16..128, every held-out case)::

    volumevlm demo --no-heads --no-eval --out demo-output        # cohort + pretrained model
    nice -n 10 python benchmarks/segmentation.py --checkpoint demo-output/model \\
        --data demo-output/cohort [--full]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
FRACTIONS = (1.0, 0.25, 0.1)
NETS = ("ours", "unet")
# Optional (--nets ours,unet,stem,tokens,image): the decoders the head had before, to
# compare: "stem" the U-Net decoder on the encoder's conv stem (decoder="unet"),
# "tokens" / "image" the UNETR-style one on tokens alone / with a conv path on the image.
EXTRA_NETS = ("stem", "tokens", "image")
DECODER_OF = {"ours": "fused", "stem": "unet", "tokens": "unetr", "image": "unetr"}
# The bar: >= 0.90 on these, >= 0.85 mean over all structures.
HEADLINE = ("liver", "spleen", "lung_left", "lung_right", "heart")


# ---------------------------------------------------------------------- the yardstick


class ScratchUNet(nn.Module):
    """MONAI ``UNet`` (3D) from scratch, shaped like the head for the training module.

    encoder_config: the pretrained encoder's config; only its HU windows (input channels)
        are used, so the yardstick sees the same input as our decoder's image path.
    config: the head's :class:`SegmentationConfig` (classes, names, sliding-window ROI).
    channels: UNet widths per level (each level halves the grid: the input is padded to
        a multiple of 2 ** (levels - 1) and the logits cropped back).
    """

    def __init__(self, encoder_config, config, channels: Sequence[int] = (16, 32, 64, 128)):
        super().__init__()
        from monai.networks.nets import UNet

        from volumevlm.models.encoder import HUWindows

        self.config = config
        self.windows = (HUWindows(encoder_config.input_windows, encoder_config.input_range)
                        if encoder_config.input_windows else nn.Identity())
        self.multiple = 2 ** (len(channels) - 1)
        self.unet = UNet(
            spatial_dims=3, in_channels=encoder_config.embed_channels, out_channels=config.num_classes,
            channels=tuple(channels), strides=(2,) * (len(channels) - 1), num_res_units=2, norm="instance",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[2:]
        pad = [0] * 6
        for axis in range(3):
            pad[2 * (2 - axis) + 1] = (-spatial[axis]) % self.multiple
        x = torch.nn.functional.pad(self.windows(x), pad)
        return self.unet(x)[:, :, : spatial[0], : spatial[1], : spatial[2]]


# ---------------------------------------------------------------------- scoring


def score_case(pred: np.ndarray, target: np.ndarray, label_names: Mapping[int, str],
               spacing: Sequence[float]) -> dict[str, dict[str, float | None]]:
    """{"dice": {name: Dice | None}, "hd95": {name: mm | inf | None}} of one case's
    [X, Y, Z] label maps (foreground labels only), by volumevlm.metrics."""
    from volumevlm.metrics import dice_per_label, hd95_per_label

    names = {k: v for k, v in label_names.items() if k != 0}
    return {"dice": dice_per_label(pred, target, names), "hd95": hd95_per_label(pred, target, names, spacing)}


def summarize(cases: Sequence[Mapping[str, Mapping[str, float | None]]]) -> dict[str, Any]:
    """Per-label mean Dice over the cases where the label is in the prediction or the
    truth, mean HD95 over the cases where it is finite (a structure missed or invented
    has no distance: its Dice says so), and means over labels (``mean_dice``; the
    issue's headline organs ``mean_dice_headline``)."""
    names = list(cases[0]["dice"]) if cases else []
    per_label: dict[str, dict[str, Any]] = {}
    for name in names:
        dice = [c["dice"][name] for c in cases if c["dice"][name] is not None]
        hd = [c["hd95"][name] for c in cases if c["hd95"][name] is not None and math.isfinite(c["hd95"][name])]
        if dice:
            per_label[name] = {"dice": float(np.mean(dice)), "hd95_mm": float(np.mean(hd)) if hd else None,
                               "cases": len(dice), "hd95_cases": len(hd)}

    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    return {
        "mean_dice": mean(v["dice"] for v in per_label.values()),
        "mean_hd95_mm": mean(v["hd95_mm"] for v in per_label.values()),
        "mean_dice_headline": mean(per_label[n]["dice"] for n in HEADLINE if n in per_label),
        "per_label": per_label,
        "cases": len(cases),
    }


def evaluate_net(net: nn.Module, rows: list[dict], preprocess, cache_dir) -> dict[str, Any]:
    """Sliding-window labels of each held-out case on its preprocessed grid, scored
    against the case's preprocessed label map."""
    from volumevlm.data.datasets import SegmentationDataset
    from volumevlm.models.segmentation import segment_probabilities

    dataset = SegmentationDataset(rows, preprocess, cache_dir=cache_dir)
    cases = []
    for i in range(len(dataset)):
        item = dataset[i]
        pred = segment_probabilities(net, item["image"]).argmax(0).numpy()
        target = np.asarray(item["label"][0], dtype=np.int64)
        cases.append(score_case(pred, target, net.config.label_names, preprocess.target_spacing))
    return summarize(cases)


# ---------------------------------------------------------------------- training


def train_net(net: nn.Module, datamodule, args: argparse.Namespace, spacing) -> float:
    """Fit ``net`` for ``args.steps`` steps with the head's training module; seconds."""
    import lightning as L

    from volumevlm.train.segment import SegmentationModule

    module = SegmentationModule(
        net,
        optimizer={"lr": args.lr, "warmup_steps": min(20, args.steps // 5), "encoder_lr_ratio": args.encoder_lr_ratio},
        crop_size=args.crop,
        foreground_crop=args.foreground_crop,
        spacing=spacing,
    )
    trainer = L.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        deterministic=False,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    return time.perf_counter() - started


def build_net(kind: str, model, args: argparse.Namespace) -> nn.Module:
    from volumevlm.data.labels import LABELS
    from volumevlm.models.segmentation import SegmentationConfig, SegmentationNet

    config = SegmentationConfig(num_classes=max(LABELS) + 1, label_names=dict(LABELS), feature_size=args.feature_size,
                                roi_size=tuple(model.encoder_config.image_size), image_path=kind == "image",
                                decoder=DECODER_OF.get(kind, "unetr"))
    if kind in DECODER_OF:
        return SegmentationNet.from_encoder(model.encoder, config)
    return ScratchUNet(model.encoder_config, config, channels=args.unet_channels)


# ---------------------------------------------------------------------- report


def format_table(results: Mapping[str, Any]) -> str:
    """Per-label Dice (and HD95) of both nets at each fraction, as a text table."""
    runs = results["runs"]
    keys = [(f, n) for f in results["fractions"] for n in NETS + EXTRA_NETS if f"{n}@{f:g}" in runs]
    names = sorted({name for r in runs.values() for name in r["metrics"]["per_label"]})
    head = "label".ljust(18) + "".join(f"{n}@{f:g}".rjust(12) for f, n in keys)
    lines = ["Dice (HD95 mm below the means), held-out synthetic cases (NOT clinical data)", head]
    for name in names:
        row = name.ljust(18)
        for f, n in keys:
            v = runs[f"{n}@{f:g}"]["metrics"]["per_label"].get(name)
            row += (f"{v['dice']:.3f}" if v else "-").rjust(12)
        lines.append(row)
    for label, key in (("mean Dice", "mean_dice"), ("headline Dice", "mean_dice_headline"), ("mean HD95 mm", "mean_hd95_mm")):
        row = label.ljust(18)
        for f, n in keys:
            v = runs[f"{n}@{f:g}"]["metrics"][key]
            row += ("-" if v is None else f"{v:.3f}" if "dice" in key else f"{v:.1f}").rjust(12)
        lines.append(row)
    row = "train s".ljust(18)
    for f, n in keys:
        row += f"{runs[f'{n}@{f:g}']['train_s']:.0f}".rjust(12)
    lines.append(row)
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="pretrained model directory")
    parser.add_argument("--data", type=Path, required=True, help="labelled cohort folder (manifest.jsonl)")
    parser.add_argument("--fractions", default=",".join(f"{f:g}" for f in FRACTIONS))
    parser.add_argument("--nets", default=",".join(NETS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-cases", type=int, default=4, help="held-out (val) cases scored; 0: all")
    parser.add_argument("--crop", default="48,48,32", help="training crop X,Y,Z (--full: the demo's 64,64,48)")
    parser.add_argument("--unet-channels", default="8,16,32,64",
                        help="MONAI UNet widths per level (--full: 16,32,64,128)")
    parser.add_argument("--foreground-crop", type=float, default=0.5)
    parser.add_argument("--feature-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--encoder-lr-ratio", type=float, default=1.0,
                        help="our pretrained encoder's lr = lr * this (segmentation.encoder_lr_ratio)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None, help="preprocessed-volume cache")
    parser.add_argument("--full", action="store_true", help="the demo's budget: 400 steps, every held-out case")
    parser.add_argument("--merge", type=Path, action="append", default=[], metavar="JSON",
                        help="add the runs of an earlier results file made with the same settings and "
                             "held-out cases (e.g. the nets trained in separate processes); repeatable")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to the JSON)")
    args = parser.parse_args(argv)
    if args.full:
        args.steps, args.eval_cases, args.crop, args.unet_channels = 400, 0, "64,64,48", "16,32,64,128"
        args.feature_size = 16
    args.fractions = [float(f) for f in args.fractions.split(",")]
    args.nets = [n for n in args.nets.split(",") if n]
    if set(args.nets) - set(NETS + EXTRA_NETS):
        parser.error(f"--nets: known nets are {', '.join(NETS + EXTRA_NETS)}")
    args.crop = [int(v) for v in args.crop.split(",")]
    args.unet_channels = [int(v) for v in args.unet_channels.split(",")]
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import lightning as L
    import monai

    import volumevlm
    from volumevlm.eval.plots import plot_label_efficiency
    from volumevlm.io.writers import write_text_atomic
    from volumevlm.train.segment import SegmentationDataModule

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = volumevlm.load(args.checkpoint)
    rows_module = SegmentationDataModule(args.data, model.preprocess, label_fraction=1.0)
    rows_module.setup()
    eval_rows = rows_module.val_rows[: args.eval_cases or None]
    if not eval_rows:
        raise SystemExit(f"{args.data}: no labelled 'val' cases to score")
    cohort_info = args.data / "cohort.json"
    synthetic = bool(json.loads(cohort_info.read_text()).get("synthetic")) if cohort_info.is_file() else False
    # What every net sees: the checkpoint's preprocessing and its encoder's HU windows.
    input_spec = json.loads(json.dumps({"preprocess": model.preprocess.to_dict(),
                                        "input_windows": model.encoder_config.to_dict()["input_windows"]}))
    runs: dict[str, Any] = {}
    merged: list[str] = []
    for path in args.merge:
        earlier = json.loads(path.read_text())
        if earlier.get("settings", {}).get("steps") != args.steps or earlier["data"]["eval_cases"] != len(eval_rows) \
                or earlier["settings"].get("crop") != args.crop or earlier.get("input") != input_spec:
            raise SystemExit(f"{path}: made with other steps / crop / held-out cases / input; not comparable")
        runs.update(earlier["runs"])
        merged.append(f"{path.name}: {earlier['command']}")
    for fraction in args.fractions:
        for kind in args.nets:
            if f"{kind}@{fraction:g}" in runs:
                continue  # merged from an earlier file
            L.seed_everything(args.seed, verbose=False)
            datamodule = SegmentationDataModule(args.data, model.preprocess, batch_size=args.batch_size,
                                                cache_dir=args.cache_dir, label_fraction=fraction)
            datamodule.setup()
            net = build_net(kind, model, args)
            seconds = train_net(net, datamodule, args, model.preprocess.target_spacing)
            metrics = evaluate_net(net, eval_rows, model.preprocess, args.cache_dir)
            runs[f"{kind}@{fraction:g}"] = {
                "net": kind, "label_fraction": fraction, "train_cases": len(datamodule.train_rows),
                "train_s": round(seconds, 1), "parameters": sum(p.numel() for p in net.parameters()),
                "metrics": metrics,
            }
            print(f"{kind} @ {fraction:g} ({len(datamodule.train_rows)} cases, {seconds:.0f} s): "
                  f"mean Dice {metrics['mean_dice']:.3f}", flush=True)
    date = dt.datetime.now(dt.timezone.utc)
    results = {
        "benchmark": "segmentation",
        "device": f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads; no GPU",
        "date": date.isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["benchmarks/segmentation.py", *argv]),
        "versions": {"volumevlm": getattr(volumevlm, "__version__", None), "torch": torch.__version__,
                     "monai": monai.__version__, "lightning": L.__version__, "python": platform.python_version()},
        "data": {"root": str(args.data), "labelled_train_cases": rows_module.labelled_train_cases,
                 "eval_cases": len(eval_rows), "eval_split": "val", "synthetic": synthetic,
                 "note": "synthetic cohort, NOT clinical data" if synthetic else "user data"},
        "checkpoint": str(args.checkpoint),
        "input": input_spec,
        "settings": {"steps": args.steps, "crop": args.crop, "foreground_crop": args.foreground_crop,
                     "batch_size": args.batch_size, "lr": args.lr, "feature_size": args.feature_size,
                     "encoder_lr_ratio": args.encoder_lr_ratio,
                     "loss": "DiceCE (MONAI, batch Dice)", "grid": "preprocessed", "seed": args.seed,
                     "unet_channels": args.unet_channels},
        "fractions": args.fractions,
        "merged_from": merged,
        "runs": runs,
    }
    print(format_table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"segmentation-cpu-{date.date().isoformat()}-{args.steps}steps"
    complete = all(f"{n}@{f:g}" in runs for n in NETS for f in args.fractions)
    if not complete:  # a partial run does not overwrite the comparison
        stem += "-" + "-".join(args.nets)
    path = write_text_atomic(args.out / f"{stem}.json", json.dumps(results, indent=2) + "\n")
    print(f"results: {path}")
    if complete:
        ours = [runs[f"ours@{f:g}"]["metrics"]["mean_dice"] or 0.0 for f in args.fractions]
        unet = [runs[f"unet@{f:g}"]["metrics"]["mean_dice"] or 0.0 for f in args.fractions]
        plot = plot_label_efficiency(
            args.fractions, ours, args.plot or args.out / f"{stem}.png", synthetic=synthetic, baseline=unet,
            title=f"Mean Dice, {len(eval_rows)} held-out cases, {args.steps} steps (dashed: MONAI UNet from scratch)",
        )
        print(f"plot: {plot}")
    return results


if __name__ == "__main__":
    main()
