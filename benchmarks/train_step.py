"""Training throughput of the image encoder: ours against Merlin's I3D ResNet-152.

One training step = forward of the image encoder with its pretraining heads
(ours: pooled -> projection + phenotype head; Merlin: its contrastive and phenotype
1x1x1 conv heads, 1692 phecodes), a scalar loss on both outputs, backward, fused
AdamW step. The text towers are left out on both sides: this measures the image
encoders, where the two models differ. Merlin's code comes from ``pip install
merlin-vlm`` (its ``I3ResNet``, gradient checkpointing as it ships); its weights
cannot be downloaded here, random ones serve for speed.

GPU mode (default): 224x224x160 voxels (Merlin's input), bf16 autocast, our sizes
``small`` (14x14x20 tokens) and ``base`` (28x28x20 tokens) and Merlin; for each, the
batch is doubled until it no longer fits (or --max-batch), and volumes/s and peak
memory are reported per batch. CPU mode (``--cpu``): reduced input 96x96x64, batch 2,
fp32, ``small``-width encoders; only the ratio means anything there.

    python benchmarks/train_step.py            # GPU
    python benchmarks/train_step.py --cpu      # CPU, a few minutes on 2 cores

Results: a Rich table and benchmarks/results/train-step-<device>-<date>.json naming
device, versions, date and command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import gc
import importlib.util
import json
import os
import platform
import re
import shlex
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NUM_PHECODES = 1692  # Merlin's phenotype head width
EMBED_DIM = 512
_FALLBACKS: set[str] = set()


# ---------------------------------------------------------------------- models


class OurImageModel(nn.Module):
    """Our encoder with the pretraining image heads, as the LightningModule trains it."""

    def __init__(self, config):
        super().__init__()
        from volumevlm.models.encoder import VolumeEncoder
        from volumevlm.models.heads import PhenotypeHead, ProjectionHead

        self.encoder = VolumeEncoder(config)
        self.projection = ProjectionHead(self.encoder.embed_dim, EMBED_DIM)
        self.phenotype = PhenotypeHead(self.encoder.embed_dim, NUM_PHECODES)

    def forward(self, x):
        pooled = self.encoder(x).pooled
        return self.projection(pooled), self.phenotype(pooled)


@functools.lru_cache(maxsize=1)
def _merlin_modules():
    """Merlin's i3res/inflate modules from the installed merlin-vlm, imported without
    running ``merlin/__init__`` (which builds the full model and reaches for the hub)."""
    spec = importlib.util.find_spec("merlin")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("merlin-vlm is not installed (pip install merlin-vlm --no-deps)")
    root = Path(list(spec.submodule_search_locations)[0])
    for name, folder in (("merlin", root), ("merlin.models", root / "models")):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(folder)]
            sys.modules[name] = package
    import merlin.models.i3res as i3res  # noqa: E402

    return i3res


def _resnet152_2d():
    """The 2D ResNet-152 Merlin inflates: torchvision's (random weights), or, where
    torchvision cannot be imported (the CPU-only CI image), the same layer layout
    built here: Merlin's inflation reads only the layers' shapes and strides."""
    try:
        import torchvision
    except Exception:  # noqa: BLE001 - e.g. absent, or built for another torch
        _FALLBACKS.add("torchvision unavailable: Merlin's I3ResNet inflated from the ResNet-152 layout built in this script")
        return _resnet152_layout()
    return torchvision.models.resnet152(weights=None)


class _Bottleneck2d(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.stride = stride
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))


def _resnet152_layout() -> nn.Module:
    """ResNet-152's 2D layers (3, 8, 36, 3 bottlenecks) as attributes I3ResNet inflates."""
    net = nn.Module()
    net.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(64)
    net.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    inplanes = 64
    for index, (planes, blocks, stride) in enumerate(((64, 3, 1), (128, 8, 2), (256, 36, 2), (512, 3, 2)), start=1):
        layer = []
        for b in range(blocks):
            layer.append(_Bottleneck2d(inplanes, planes, stride if b == 0 else 1))
            inplanes = planes * 4
        setattr(net, f"layer{index}", nn.Sequential(*layer))
    net.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    return net


class MerlinImageModel(nn.Module):
    def __init__(self):
        super().__init__()
        i3res = _merlin_modules()
        self.net = i3res.I3ResNet(_resnet152_2d(), class_nb=NUM_PHECODES, conv_class=True)

    def forward(self, x):
        contrastive, ehr = self.net(x)
        return contrastive, ehr


# ---------------------------------------------------------------------- timing


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_training(make_model, batch: int, shape, device, dtype, steps: int, warmup: int) -> dict:
    """Volumes/s and peak memory of ``steps`` timed training steps after ``warmup``."""
    torch.manual_seed(0)
    model = make_model().to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.rand(batch, 1, *shape, device=device)
    params = sum(p.numel() for p in model.parameters())

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            emb, logits = model(x)
            loss = F.normalize(emb.float(), dim=-1).square().mean() + logits.float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    elapsed = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    model = optimizer = x = None  # drop the references (step() shares them) before the next size
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"batch": batch, "volumes_per_s": batch * steps / elapsed, "step_s": elapsed / steps,
            "peak_gib": peak, "params_m": params / 1e6}


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def sweep(name, make_model, batches, shape, device, dtype, steps, warmup) -> list[dict]:
    rows = []
    for batch in batches:
        try:
            row = time_training(make_model, batch, shape, device, dtype, steps, warmup)
        except Exception as exc:  # noqa: BLE001 - recorded, then the sweep stops at OOM
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append({"model": name, "batch": batch, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
            if _is_oom(exc):
                break
            continue
        row["model"] = name
        rows.append(row)
        print(f"  {name:<22} batch {batch:>3}: {row['volumes_per_s']:8.2f} volumes/s  "
              f"peak {row['peak_gib'] if row['peak_gib'] is not None else float('nan'):6.2f} GiB", flush=True)
    return rows


# ---------------------------------------------------------------------- main


def _device_name(device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or platform.machine() or "cpu")


def _device_label(device) -> str:
    return "cpu" if device.type == "cpu" else re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower()


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("model", "batch", "volumes/s", "step s", "peak GiB", "params M", "error"):
        table.add_column(col, justify="right" if col not in ("model", "error") else "left")
    for r in rows:
        fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
        table.add_row(r["model"], str(r["batch"]), fmt(r.get("volumes_per_s")), fmt(r.get("step_s"), "{:.3f}"),
                      fmt(r.get("peak_gib")), fmt(r.get("params_m"), "{:.1f}"), r.get("error") or "-")
    Console().print(table)


def summarize(rows: list[dict], ours: list[str], reference: str, batch_at: int) -> dict:
    """Best volumes/s per model, ratios against the reference, memory at ``batch_at``."""
    best, at = {}, {}
    for r in rows:
        if "volumes_per_s" in r:
            best[r["model"]] = max(best.get(r["model"], 0.0), r["volumes_per_s"])
            if r["batch"] == batch_at:
                at[r["model"]] = r["peak_gib"]
    out = {"best_volumes_per_s": best, f"peak_gib_at_batch_{batch_at}": at}
    if reference in best:
        out["speedup_vs_" + reference] = {m: best[m] / best[reference] for m in ours if m in best}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="reduced-size fp32 comparison on the CPU")
    parser.add_argument("--sizes", default="small,base", help="our named sizes to time (GPU)")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--no-merlin", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    from volumevlm.models.registry import encoder_config

    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device; run with --cpu for the reduced CPU comparison", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    if args.cpu:
        shape, dtype, batches = (96, 96, 64), torch.float32, [2]
        steps, warmup = args.steps or 2, 1
        ours = {"ours small-width": lambda: OurImageModel(encoder_config("small", image_size=shape, attention_backend="torch"))}
    else:
        shape, dtype = (224, 224, 160), torch.bfloat16
        batches = [b for b in (1, 2, 4, 8, 16, 32, 48, 64, 96, 128) if b <= args.max_batch]
        steps, warmup = args.steps or 5, 2
        ours = {f"ours {name}": (lambda name=name: OurImageModel(encoder_config(name))) for name in args.sizes.split(",")}

    started = dt.datetime.now(dt.timezone.utc)
    rows: list[dict] = []
    notes: list[str] = []
    for name, make in ours.items():
        rows += sweep(name, make, batches, shape, device, dtype, steps, warmup)
    if not args.no_merlin:
        try:
            _merlin_modules()
            _resnet152_2d()
            rows += sweep("merlin i3d-resnet152", MerlinImageModel, batches, shape, device, dtype, steps, warmup)
        except Exception as exc:  # noqa: BLE001 - reported: the comparison is then missing
            notes.append(f"Merlin not timed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            print(notes[-1], file=sys.stderr)

    title = f"Training step, {'x'.join(map(str, shape))} voxels, {str(dtype).replace('torch.', '')} ({_device_name(device)})"
    print_table(rows, title)
    payload = {
        "benchmark": "image-encoder training step (forward + heads + backward + AdamW)",
        "device": _device_name(device),
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "triton": _version("triton"), "merlin-vlm": _version("merlin-vlm")},
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["train_step.py", *argv]),
        "input_voxels": list(shape),
        "dtype": str(dtype).replace("torch.", ""),
        "steps_timed": steps,
        "rows": rows,
        "summary": summarize(rows, list(ours), "merlin i3d-resnet152", 32 if not args.cpu else 2),
        "notes": notes + sorted(_FALLBACKS),
        "wall_s": round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"train-step-{_device_label(device)}-{started.date().isoformat()}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    print(json.dumps(payload["summary"], indent=2))
    print(f"wrote {path}")
    return 0


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
