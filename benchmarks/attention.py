"""Microbenchmark of volumevlm's block-sparse 3D attention.

GPU mode (default; needs CUDA), bf16, forward and forward+backward:

1. Correctness first: our op (Triton forced, the dispatch rule, dense SDPA + bias)
   against the float64 dense reference in bf16 and fp32 on a small layout and on the
   `small` encoder's local and dilated layouts; then a no-sync check (forward +
   backward under CUDA sync-debug "error" mode). The run stops here on failure.
2. Rows: the `base` and `small` encoders' own layouts (registers, grid padded to the
   tile, local and dilated) at their training batch and head counts, and synthetic
   grids (window 1, no registers). Per row: ours (dispatch / Triton / dense+bias),
   flash and cuDNN SDPA on the valid tokens without a mask (the dense anchors), and
   FlexAttention on the same mask: ``BlockMask.from_kv_blocks`` from our 64-token
   lists compiled with max-autotune, and a labelled ``create_block_mask`` row at
   128-token blocks; a fresh dynamo state per row, warm-up at the timed inputs, timing
   under ``fail_on_recompile``, and a peak-memory check that rules out flex's eager
   (N x N) fallback.
3. Per method: kernel time (a profiler trace: device time of the kernels one call
   launches) and host-inclusive wall time (back-to-back calls ending in a sync)
   separately, the host time to issue one call, and peak memory. Speed-ups are
   against the FASTEST dense kernel of the same run (flash or cuDNN) and the best
   FlexAttention row; the dispatch rule's choice is recorded next to the fastest of
   the op's own backends (calibration data for its thresholds), and so are the
   autotuner's chosen configs.

CPU mode (``--cpu``): our pure-torch path vs dense SDPA (no mask, and with the
dense boolean mask), fp32, side by side in one run, with peak memory.

``--dry-run``: list the GPU rows (layouts, batch, heads, dispatch) without a GPU.

FLOP convention: *useful* FLOPs count only attended (query, key) pairs of valid
tokens: forward = 4 * B * H * pairs * D (two matmuls, 2 FLOPs per multiply-add),
backward = 2.5 x forward (five matmuls), forward+backward = 3.5 x forward. Dense
SDPA runs on the ``num_valid`` real tokens with no mask; its *executed* FLOPs use
pairs = num_valid^2. "% of fastest dense" = our useful TFLOP/s / the fastest dense
kernel's executed TFLOP/s (throughput per useful FLOP).

Results: Rich tables, and JSON in benchmarks/results/attention-<device>-<date>.json
naming device, torch and triton versions, date and the exact command (rewritten after
every row, "complete": true at the end).

    python benchmarks/attention.py                      # GPU: all rows
    python benchmarks/attention.py --suite models --flex kv64 --flex-budget-s 120
    python benchmarks/attention.py --dry-run            # the rows, no GPU needed
    python benchmarks/attention.py --cpu                # CPU, a couple of minutes on 2 cores
    bash scripts/gpu_check.sh                           # the prepared GPU session (< 8 min)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from volumevlm.ops import attention_layout, dense_reference, sparse_attention, torch_block_sparse

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# GPU grids (tokens per axis); tile 4x4x4, window 1, 12 heads, d = 64.
GPU_GRIDS = [(14, 14, 10), (28, 28, 20), (56, 56, 40)]
# CPU cases: (label, grid, window). ~4k-16k tokens at 88-92 % sparsity, plus a
# high-density window (blocked path) and a dense layout (the op routes to dense SDPA).
CPU_CASES = [
    ("4k sparse", (16, 16, 16), (1, 1, 0)),
    ("9k sparse", (24, 24, 16), (1, 1, 1)),
    ("16k sparse", (28, 28, 20), (1, 1, 1)),
    ("4k high-density", (16, 16, 16), (2, 2, 2)),
    ("4k dense", (16, 16, 16), None),
]


# --------------------------------------------------------------------- helpers
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def useful_flops(layout, batch: int, heads: int, dim: int) -> float:
    """Forward FLOPs of the attended pairs only (see the module docstring)."""
    pairs = layout.density * layout.num_valid**2
    return 4.0 * batch * heads * pairs * dim


def _device_label(cpu: bool) -> str:
    if cpu:
        return "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower()


def _device_name(cpu: bool) -> str:
    if not cpu:
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({os.cpu_count()} logical CPUs)"


def _versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version()}


def write_results(payload: dict, device_label: str, out_dir: Path, tag: str = "") -> Path:
    """Write JSON atomically (temp file in the same folder, then os.replace)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"-{tag}" if tag else ""
    path = out_dir / f"attention-{device_label}-{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}{suffix}.json"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".attention-", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is a dependency; plain text keeps the script usable without it
        print(title)
        print(" | ".join(columns))
        for row in rows:
            print(" | ".join(str(c) for c in row))
        return
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if c not in ("case", "method", "pass") else "left")
    for row in rows:
        table.add_row(*["-" if c is None else (f"{c:.3g}" if isinstance(c, float) else str(c)) for c in row])
    Console(width=max(120, Console().width)).print(table)


# ----------------------------------------------------------------- CPU memory
class _PeakRSS:
    """Peak resident memory (MiB) above the level at entry, via /proc (Linux).

    Writing 5 to /proc/self/clear_refs resets VmHWM, so each measured call gets its
    own peak. Large torch CPU tensors are mmap-backed and return to the OS on free,
    so RSS follows live tensor memory. None where /proc is unavailable.
    """

    @staticmethod
    def _read(field: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])  # kB
        except OSError:
            return None
        return None

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self.start = self._read("VmRSS")
        self.peak_mib = None
        return self

    def __exit__(self, *exc):
        peak = self._read("VmHWM")
        if self.start is not None and peak is not None:
            self.peak_mib = max(0, peak - self.start) / 1024.0


# -------------------------------------------------------------------- CPU mode
def _mmap_threshold(nbytes: int) -> bool:
    """Set glibc's M_MMAP_THRESHOLD (which also stops its dynamic adjustment)."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, nbytes))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _time_interleaved(calls: dict, repeats: int) -> dict:
    """name -> minimum wall ms over ``repeats`` rounds. The methods take turns inside
    each round so that load from other processes hits them alike; each timed call
    follows an untimed call of the same method, so no method pays for the switch
    (thread-pool wake-up, allocator and cache state) from the one before it."""
    best = {name: math.inf for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            call()
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: t * 1e3 for name, t in best.items()}


def _cpu_methods(layout, window):
    """name -> f(q, k, v) -> out, for one CPU case."""
    methods = {
        "ours": lambda q, k, v: sparse_attention(q, k, v, layout, backend="torch"),
        "sdpa dense": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    }
    if window is not None:
        mask = layout.dense_mask()
        methods["sdpa masked"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    elif layout.density >= 1.0:  # the op routes these to SDPA: show what blocking alone costs
        methods["ours blocked-only"] = lambda q, k, v: torch_block_sparse(q, k, v, layout)
    return methods


def _cpu_calls(layout, window, B: int, H: int, D: int) -> dict:
    """(method, pass) -> zero-argument call, on fresh seeded inputs."""
    torch.manual_seed(0)
    N = layout.seq_len
    q, k, v, do = (torch.randn(B, H, N, D) for _ in range(4))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    calls = {}
    for name, fn in _cpu_methods(layout, window).items():

        def forward(fn=fn):
            with torch.inference_mode():
                fn(q, k, v)

        def forward_backward(fn=fn):
            fn(*leaves).backward(do)
            for x in leaves:
                x.grad = None

        calls[name, "fwd"], calls[name, "fwd+bwd"] = forward, forward_backward
    return calls


def run_cpu(args) -> dict:
    B, H, D = args.batch, args.heads, args.dim
    layouts = [(label, grid, window, attention_layout(grid, tile=(4, 4, 4), window=window)) for label, grid, window in CPU_CASES]
    # Phase 1, peak memory, on a fresh heap with every allocation >= 64 KiB served by
    # mmap and unmapped on free, so RSS follows live tensor memory.
    rss_exact = _mmap_threshold(64 * 1024)
    peaks = {}
    for label, _, window, layout in layouts:
        for key, call in _cpu_calls(layout, window, B, H, D).items():
            call()
            with _PeakRSS() as mem:
                call()
            peaks[label, key] = mem.peak_mib
    # Phase 2, timings, with large temporaries served from the heap again (32 MiB is
    # glibc's own dynamic maximum): a fresh mmap + page faults per temporary would
    # slow the chunked path far more than one-shot SDPA and distort the comparison.
    _mmap_threshold(32 * 1024 * 1024)
    rows, records = [], []
    for label, grid, window, layout in layouts:
        N = layout.seq_len
        flops = useful_flops(layout, B, H, D)
        times = _time_interleaved(_cpu_calls(layout, window, B, H, D), args.repeats)
        case = {"case": label, "grid": list(grid), "window": window, "tokens": N, "density": layout.density, "methods": {}}
        for (name, mode), ms in times.items():
            case["methods"].setdefault(name, {})[mode] = {"ms": ms, "peak_mib": peaks[label, (name, mode)]}
        methods = case["methods"]
        for name, entry in methods.items():
            for mode, m in entry.items():
                m["speedup_vs_sdpa_dense"] = methods["sdpa dense"][mode]["ms"] / m["ms"]
                if "sdpa masked" in methods:
                    m["speedup_vs_sdpa_masked"] = methods["sdpa masked"][mode]["ms"] / m["ms"]
                m["useful_gflops"] = (1.0 if mode == "fwd" else 3.5) * flops / (m["ms"] * 1e-3) / 1e9
                rows.append(
                    [label, N, f"{1 - layout.density:.1%}", name, mode, m["ms"], m["useful_gflops"],
                     m["speedup_vs_sdpa_dense"], m.get("speedup_vs_sdpa_masked"), m["peak_mib"]]
                )
        records.append(case)
    print_table(
        f"CPU fp32, B={B} H={H} D={D}, tile 4x4x4 ({_device_name(True)})",
        ["case", "tokens", "sparsity", "method", "pass", "ms", "useful GFLOP/s", "x vs dense", "x vs masked", "peak MiB"],
        rows,
    )
    return {
        "mode": "cpu",
        "dtype": "float32",
        "batch": B,
        "heads": H,
        "dim": D,
        "tile": [4, 4, 4],
        "timing": f"minimum of {args.repeats} interleaved rounds, each timed call after an untimed one",
        "peak_memory": "measured before the timings: process RSS peak above the level at call start (VmHWM), glibc mmap threshold "
        + ("fixed at 64 KiB" if rss_exact else "NOT fixed: small peaks may be hidden"),
        "cases": records,
    }


# -------------------------------------------------------------------- GPU mode
# Rows at the models' real layouts: (label, named size, attention pattern, batch).
# Heads, head dim, grid, tile, registers and dilation come from the size's config, so
# the layouts are exactly the encoder's (registers first, grid padded up to the tile).
# Batch: `small` at B=32 (the train_step benchmark's batch); `base` at B=8 by default
# (its dense anchors at B=32 would dominate the run's time; --model-batch changes it).
# Order: the row the issue's targets name first (base local), so a time-bounded run
# (--flex-budget-s) spends its FlexAttention compile time there first.
MODEL_CASES = [
    ("base local", "base", "local", 8),
    ("small local", "small", "local", 32),
    ("small dilated", "small", "dilated", 32),
    ("base dilated", "base", "dilated", 8),
]
FLEX_KINDS = ("kv64", "create128")


def model_layout(size: str, pattern: str):
    """(layout, config) of the named encoder size's ``pattern`` layers at its nominal grid."""
    from volumevlm.models.registry import encoder_config

    config = encoder_config(size)
    layouts = dict(zip(config.patterns(), config.attention_layouts()))
    if pattern not in layouts:
        raise SystemExit(f"error: size {size!r} has no {pattern!r} layers ({sorted(layouts)})")
    return layouts[pattern], config


def gpu_cases(suite: str, grids: list | None, batch_overrides: dict, heads: int, dim: int, batch: int) -> list[dict]:
    """The rows to time: model layouts and/or the synthetic grids (window 1, no registers)."""
    cases = []
    if suite in ("all", "models"):
        for label, size, pattern, B in MODEL_CASES:
            layout, config = model_layout(size, pattern)
            cases.append({"case": label, "layout": layout, "batch": batch_overrides.get(size, B),
                          "heads": config.heads, "dim": config.head_dim, "size": size, "pattern": pattern})
    if suite in ("all", "grids"):
        for grid in grids or GPU_GRIDS:
            layout = attention_layout(grid, tile=(4, 4, 4), window=(1, 1, 1))
            cases.append({"case": "x".join(map(str, grid)), "layout": layout, "batch": batch, "heads": heads, "dim": dim,
                          "size": None, "pattern": "local"})
    return cases


def describe_case(case: dict) -> dict:
    """JSON-able description of a case (what the row's numbers refer to)."""
    from volumevlm.ops import attention

    layout = case["layout"]
    B, H, D = case["batch"], case["heads"], case["dim"]
    return {
        "case": case["case"], "size": case["size"], "pattern": case["pattern"], "layout": repr(layout),
        "grid": list(layout.grid), "tile": list(layout.tile), "window": layout.window, "dilation": layout.dilation,
        "registers": layout.num_global, "tokens": layout.seq_len, "valid_tokens": layout.num_valid,
        "density": layout.density, "executed_fraction": layout.executed_fraction,
        "batch": B, "heads": H, "dim": D,
        "dispatch": attention.choose_backend(layout, B * H, D, True),
        "dense_bias_fits": layout.num_valid**2 <= attention.DENSE_BIAS_MAX_ELEMENTS,
    }


def flex_block_mask(layout, device):
    """A FlexAttention BlockMask identical to the layout at its own 64-token blocks: the
    same full and partial key-block lists per query block (padded to the full block
    count), and a mask_mod that masks padding keys inside partial blocks like our
    kernels do."""
    from torch.nn.attention.flex_attention import BlockMask

    nb, T, N = layout.num_blocks, layout.block_size, layout.seq_len

    def dense_lists(indptr, idx):
        counts = indptr[1:] - indptr[:-1]
        rows = torch.repeat_interleave(torch.arange(nb), counts.long())
        cols = torch.arange(idx.numel()) - indptr[:-1].long()[rows]
        table = torch.zeros(nb, nb, dtype=torch.int32)
        table[rows, cols] = idx
        return counts.to(torch.int32)[None, None].to(device), table[None, None].to(device)

    part_n, part_idx = dense_lists(layout.q2k_part_indptr, layout.q2k_part_idx)
    full_n, full_idx = dense_lists(layout.q2k_full_indptr, layout.q2k_full_idx)
    key_valid = layout.key_valid.to(device)
    blocks = layout.block_mask().to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        return key_valid[kv_idx] & blocks[q_idx // T, kv_idx // T]

    return BlockMask.from_kv_blocks(part_n, part_idx, full_n, full_idx, BLOCK_SIZE=T, mask_mod=mask_mod, seq_lengths=(N, N))


def _flex_create_block_mask(layout, device):
    """Flex's own BlockMask (128-token blocks) from a mask_mod over our tile table:
    same attended pairs, coarser blocks (more partial blocks than our lists)."""
    from torch.nn.attention.flex_attention import create_block_mask

    T, N = layout.block_size, layout.seq_len
    key_valid = layout.key_valid.to(device)
    blocks = layout.block_mask().to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        return key_valid[kv_idx] & blocks[q_idx // T, kv_idx // T]

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=N, KV_LEN=N, device=device, BLOCK_SIZE=128)


FLEX_LABELS = {
    "kv64": "flex from_kv_blocks 64 (max-autotune)",
    "create128": "flex create_block_mask 128 (coarser blocks)",
}


def make_flex(layout, device, kind: str, shape: tuple[int, int, int, int], dtype=torch.bfloat16):
    """(f(q, k, v) -> out, info) of compiled FlexAttention on the layout's mask, or (None, info).

    kind "kv64": ``BlockMask.from_kv_blocks`` with our own 64-token lists, compiled with
    max-autotune so 64-token kernel configs exist (flex's defaults failed to lower
    there). kind "create128": flex's ``create_block_mask`` at 128-token blocks, default
    compile (labelled: coarser blocks than ours). A fresh dynamo state per call, and a
    warm-up at the timed shape of the inference forward and of forward + backward, so
    every graph the timing uses is compiled before it (timed under fail_on_recompile).
    """
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()
    mode = "max-autotune-no-cudagraphs" if kind == "kv64" else None
    info = {"kind": kind, "label": FLEX_LABELS[kind], "compile_mode": mode, "error": None}
    started = time.perf_counter()
    try:
        compiled = torch.compile(flex_attention, dynamic=False, mode=mode)
        mask = flex_block_mask(layout, device) if kind == "kv64" else _flex_create_block_mask(layout, device)

        def run(q, k, v):
            return compiled(q, k, v, block_mask=mask)

        # The timed calls' exact input kinds (dynamo guards on requires_grad and grad mode):
        # plain tensors under inference_mode for the forward, leaves for forward + backward.
        x = [torch.randn(*shape, device=device, dtype=dtype) for _ in range(3)]
        with torch.inference_mode():
            run(*x)
        leaves = [t.clone().requires_grad_() for t in x]
        run(*leaves).backward(torch.randn_like(x[0]))
        torch.cuda.synchronize()
    except Exception as exc:  # recorded in the results, never hidden
        info["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        return None, info
    finally:
        info["compile_s"] = round(time.perf_counter() - started, 1)
    return run, info


def gpu_correctness(device, layouts=None) -> list[dict]:
    """Our op (Triton forced, dispatch, dense) vs the float64 dense reference on a small
    layout and the `small` encoder's (B=1, H=2); then the op's forward + backward again
    under CUDA sync-debug "error" mode (any device sync in the call path raises). Raises
    SystemExit when ours fails. (FlexAttention's masks are checked against the same
    reference on the CPU, tests/test_attention_benchmark.py: compiling flex here for
    every layout would cost minutes.)"""
    if layouts is None:
        layouts = [attention_layout((10, 9, 7), tile=(4, 4, 4), window=(1, 1, 1), num_global=5),
                   model_layout("small", "local")[0], model_layout("small", "dilated")[0]]
    gen = torch.Generator(device="cpu").manual_seed(1234)
    tolerances = {torch.bfloat16: (2e-2, 5e-2), torch.float32: (5e-3, 1e-2)}
    results, failed = [], False
    for layout in layouts:
        for dtype, (tol_out, tol_grad) in tolerances.items():
            base = [torch.randn(1, 2, layout.seq_len, 64, generator=gen, dtype=torch.float64) for _ in range(4)]
            # Upstream gradient 0 at padding rows: their outputs are discarded, and FlexAttention
            # (whose padding queries see valid keys) would otherwise push gradient into dk, dv.
            do64 = base[3] * layout.query_valid[:, None]
            q, k, v = (x.to(device, dtype).requires_grad_() for x in base[:3])
            do = do64.to(device, dtype)
            q64, k64, v64 = (x.to(device).requires_grad_() for x in base[:3])
            ref = dense_reference(q64, k64, v64, layout)
            ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do64.to(device))
            del q64, k64, v64
            candidates = {
                "ours (triton)": lambda q, k, v, layout=layout: sparse_attention(q, k, v, layout, backend="triton"),
                "ours (dispatch)": lambda q, k, v, layout=layout: sparse_attention(q, k, v, layout),
            }
            if layout.num_valid**2 <= 4096 * 4096:
                candidates["ours (dense+bias)"] = lambda q, k, v, layout=layout: sparse_attention(q, k, v, layout, backend="dense")
            valid = layout.query_valid.to(device)
            for name, fn in candidates.items():
                try:
                    out = fn(q, k, v)
                    grads = torch.autograd.grad(out, (q, k, v), do)
                    errs = {"out": _rel(out[:, :, valid], ref[:, :, valid])}
                    errs.update({f"d{n}": _rel(g, w) for n, g, w in zip("qkv", grads, ref_grads)})
                    ok = errs["out"] < tol_out and all(errs[f"d{n}"] < tol_grad for n in "qkv")
                    if name.startswith("ours"):
                        ok = ok and bool((out[:, :, ~valid] == 0).all())
                    error = None
                except Exception as exc:  # report, do not hide: a failing candidate is marked
                    errs, ok, error = {}, False, f"{type(exc).__name__}: {exc}"
                results.append({"layout": repr(layout), "method": name, "dtype": str(dtype).replace("torch.", ""),
                                "ok": ok, "rel_errors": errs, "error": error})
                failed |= name.startswith("ours") and not ok
    results += _sync_check(device, layouts)
    failed |= any(r["method"].startswith("no-sync") and not r["ok"] for r in results)
    results += _compile_check(device, layouts[0])  # recorded; a failure here does not stop the timings
    print_table(
        "Correctness vs float64 dense reference (B=1, H=2, D=64), and the no-sync check",
        ["layout", "method", "dtype", "ok", "out", "dq", "dk", "dv", "error"],
        [[_short(r["layout"]), r["method"], r["dtype"], r["ok"], *[r["rel_errors"].get(k) for k in ("out", "dq", "dk", "dv")],
          r["error"]] for r in results],
    )
    if failed:
        raise SystemExit("error: our op disagrees with the dense reference or syncs; no timings taken")
    return results


def _short(layout_repr: str) -> str:
    """'grid=(14, 14, 20), tile=(4, 4, 4), window=(1, 1, 1), dilation=2, num_global=4' from a layout's repr."""
    return layout_repr[len("AttentionLayout("):].split(":")[0]


def _compile_check(device, layout) -> list[dict]:
    """The op forced to the Triton kernels under torch.compile(fullgraph=True) (any graph
    break fails) with aot_eager and inductor, forward + backward against eager."""
    import torch._dynamo

    out = []
    gen = torch.Generator(device="cpu").manual_seed(99)
    base = [torch.randn(2, 3, layout.seq_len, 64, generator=gen).to(device, torch.bfloat16) for _ in range(4)]

    def f(q, k, v):
        return sparse_attention(q, k, v, layout, backend="triton")

    leaves = [x.clone().requires_grad_() for x in base[:3]]
    want = f(*leaves)
    want_grads = torch.autograd.grad(want, leaves, base[3])
    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        error, errs = None, {}
        try:
            leaves = [x.clone().requires_grad_() for x in base[:3]]
            got = torch.compile(f, backend=backend, fullgraph=True)(*leaves)
            grads = torch.autograd.grad(got, leaves, base[3])
            errs = {"out": _rel(got, want)}
            errs.update({f"d{n}": _rel(g, w) for n, g, w in zip("qkv", grads, want_grads)})
            ok = all(e < 1e-2 for e in errs.values())
        except Exception as exc:
            ok, error = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        out.append({"layout": repr(layout), "method": f"compile fullgraph {backend} (vs eager)", "dtype": "bfloat16",
                    "ok": ok, "rel_errors": errs, "error": error})
    return out


def _sync_check(device, layouts) -> list[dict]:
    """Forward + backward of each backend after a warm-up call, with CUDA's sync debug
    mode at "error": a host-device synchronization anywhere in the call path raises."""
    out = []
    for layout in layouts:
        for backend in ("triton", None, "dense"):
            if backend == "dense" and layout.num_valid**2 > 4096 * 4096:
                continue
            x = [torch.randn(2, 3, layout.seq_len, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
                 for _ in range(3)]
            g = torch.randn_like(x[0])

            def step(x=x, layout=layout, backend=backend, g=g):
                sparse_attention(*x, layout, backend=backend).backward(g)

            error = None
            try:
                step()  # warm-up: autotuning and first-call caches may sync
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    step()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                torch.cuda.synchronize()
            except Exception as exc:
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            out.append({"layout": repr(layout), "method": f"no-sync {backend or 'dispatch'}", "dtype": "bfloat16",
                        "ok": error is None, "rel_errors": {}, "error": error})
    return out


def _kernel_ms(call, iterations: int) -> float:
    """Device time of the kernels one call launches (ms): CUDA kernel, memcpy and memset
    durations summed from a profiler trace of ``iterations`` calls (no host time)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    # Without CUDA (a plumbing check of this code on the CPU) CPU op time stands in.
    on_cuda = torch.cuda.is_available()
    activity, device_type = (ProfilerActivity.CUDA, DeviceType.CUDA) if on_cuda else (ProfilerActivity.CPU, DeviceType.CPU)
    torch.cuda.synchronize()
    with profile(activities=[activity]) as prof:
        for _ in range(iterations):
            call()
        torch.cuda.synchronize()
    total_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == device_type)
    return total_us / iterations / 1e3


def _wall_ms(call, iterations: int) -> tuple[float, float]:
    """(host-inclusive wall ms per call of back-to-back calls ending in a sync, median host
    ms to issue one call). When the host is the bottleneck the first exceeds kernel time."""
    torch.cuda.synchronize()
    issue = []
    start = time.perf_counter()
    for _ in range(iterations):
        t0 = time.perf_counter()
        call()
        issue.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / iterations
    return wall * 1e3, sorted(issue)[len(issue) // 2] * 1e3


def _peak_mib(call) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(fn, inputs, grad, mode: str, iterations: int) -> dict:
    """Kernel ms, host-inclusive wall ms, host issue ms and peak MiB of one method."""
    if mode == "fwd":

        def call():
            with torch.inference_mode():
                fn(*inputs)
    else:
        leaves = [x.detach().clone().requires_grad_() for x in inputs]

        def call():
            fn(*leaves).backward(grad)
            for x in leaves:
                x.grad = None

    for _ in range(3):  # warm-up: autotuning, compilation, first-call caches
        call()
    torch.cuda.synchronize()
    wall, issue = _wall_ms(call, iterations)
    kernel = _kernel_ms(call, max(3, iterations // 4))
    return {"kernel_ms": kernel, "wall_ms": wall, "host_issue_ms": issue, "peak_mib": _peak_mib(call)}


def _gpu_methods(case: dict) -> dict:
    """name -> (fn, which inputs: "layout" order with padding, or "valid" tokens only)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from volumevlm.ops import attention

    layout = case["layout"]

    def sdpa_with(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        return run

    methods = {
        "ours (dispatch)": (lambda q, k, v: sparse_attention(q, k, v, layout), "layout"),
        "ours (triton)": (lambda q, k, v: sparse_attention(q, k, v, layout, backend="triton"), "layout"),
    }
    if layout.num_valid**2 <= attention.DENSE_BIAS_MAX_ELEMENTS:
        methods["ours (dense+bias)"] = (lambda q, k, v: sparse_attention(q, k, v, layout, backend="dense"), "layout")
    methods["sdpa flash (valid tokens, no mask)"] = (sdpa_with(SDPBackend.FLASH_ATTENTION), "valid")
    methods["sdpa cudnn (valid tokens, no mask)"] = (sdpa_with(SDPBackend.CUDNN_ATTENTION), "valid")
    return methods


def run_gpu_case(case: dict, device, flex_kinds, iterations: int, save=None, record: dict | None = None) -> dict:
    """Time one row into ``record`` (filled in place, so ``save()`` writes it as it
    grows): our backends and the dense anchors first, then each FlexAttention kind
    (compiled fresh for this row), saving after each."""
    layout = case["layout"]
    B, H, D = case["batch"], case["heads"], case["dim"]
    N, Nv = layout.seq_len, layout.num_valid
    dtype = torch.bfloat16
    record = {} if record is None else record
    record.update(describe_case(case))
    flops = useful_flops(layout, B, H, D)
    dense_flops = 4.0 * B * H * Nv**2 * D
    gen = torch.Generator(device=device).manual_seed(0)
    full = [torch.randn(B, H, N, D, device=device, dtype=dtype, generator=gen) for _ in range(4)]
    valid = [torch.randn(B, H, Nv, D, device=device, dtype=dtype, generator=gen) for _ in range(4)]
    record["methods"] = {}
    record["flex"] = []
    methods = _gpu_methods(case)
    _time_methods(record, methods, full, valid, flops, dense_flops, iterations)
    _compare(record)
    if save is not None:
        save()  # our rows and the dense anchors are kept even if a flex compile runs away
    for kind in flex_kinds:
        flex, info = make_flex(layout, device, kind, (B, H, N, D))
        record["flex"].append(info)
        if flex is not None:
            _time_methods(record, {FLEX_LABELS[kind]: (flex, "layout")}, full, valid, flops, dense_flops, iterations)
        _compare(record)
        if save is not None:
            save()
    del full, valid
    torch.cuda.empty_cache()
    return record


def _time_methods(record: dict, methods: dict, full, valid, flops: float, dense_flops: float, iterations: int) -> None:
    B, H, N = record["batch"], record["heads"], record["tokens"]
    for name, (fn, which) in methods.items():
        q, k, v, g = full if which == "layout" else valid
        entry = {"inputs": "layout order, padding included" if which == "layout" else "valid tokens only, no mask"}
        for mode in ("fwd", "fwd+bwd"):
            try:
                if name.startswith("flex"):
                    # Every graph exists after the warm-up in make_flex: a recompile here
                    # would time compilation or an eager fallback, so it is an error.
                    with torch.compiler.set_stance("fail_on_recompile"):
                        m = measure(fn, (q, k, v), g, mode, iterations)
                else:
                    m = measure(fn, (q, k, v), g, mode, iterations)
                factor = 1.0 if mode == "fwd" else 3.5
                seconds = max(m["kernel_ms"], 1e-9) * 1e-3
                m["useful_tflops"] = factor * flops / seconds / 1e12 if which == "layout" else None
                m["executed_tflops"] = factor * dense_flops / seconds / 1e12 if which == "valid" else None
                if name.startswith("flex"):
                    # Eager flex materialises [B, H, N, N] scores; compiled flex stays O(N).
                    m["no_eager_fallback"] = m["peak_mib"] * 2**20 < 0.25 * B * H * N * N * 2
                entry[mode] = m
            except Exception as exc:  # e.g. out of memory: record it
                entry[mode] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
                torch.cuda.empty_cache()
        record["methods"][name] = entry


def _compare(record: dict) -> None:
    """Anchor every row on the FASTEST dense kernel of the same run (flash or cuDNN), and
    compare ours with FlexAttention; kernel time and wall time separately."""
    methods = record["methods"]
    dense_names = [n for n in methods if n.startswith("sdpa")]
    for mode in ("fwd", "fwd+bwd"):
        for clock in ("kernel_ms", "wall_ms"):
            dense = [methods[n][mode] for n in dense_names if clock in methods[n].get(mode, {})]
            best = min(dense, key=lambda m: m[clock]) if dense else None
            flex = [methods[n][mode] for n in methods if n.startswith("flex") and clock in methods[n].get(mode, {})]
            best_flex = min(flex, key=lambda m: m[clock]) if flex else None
            for name, entry in methods.items():
                m = entry.get(mode, {})
                if clock not in m:
                    continue
                tag = clock.replace("_ms", "")
                if best is not None:
                    m[f"speedup_vs_fastest_dense_{tag}"] = best[clock] / m[clock]
                if best_flex is not None and name.startswith("ours"):
                    m[f"speedup_vs_best_flex_{tag}"] = best_flex[clock] / m[clock]
                if tag == "kernel" and best is not None and m.get("useful_tflops") and best.get("executed_tflops"):
                    m["pct_of_fastest_dense_throughput"] = 100.0 * m["useful_tflops"] / best["executed_tflops"]
    # What the dispatch rule chose against what was fastest among the op's own backends.
    own = {n: methods[n]["fwd+bwd"]["kernel_ms"] for n in ("ours (triton)", "ours (dense+bias)")
           if "kernel_ms" in methods.get(n, {}).get("fwd+bwd", {})}
    record["dispatch_check"] = {
        "chose": record["dispatch"],
        "fwd+bwd_kernel_ms": own,
        "fastest": min(own, key=own.get) if own else None,
    }


def _rows(record: dict) -> list[list]:
    rows = []
    for name, entry in record["methods"].items():
        for mode in ("fwd", "fwd+bwd"):
            m = entry.get(mode, {})
            rows.append([record["case"], record["valid_tokens"], f"{record['batch']}x{record['heads']}",
                         f"{1 - record['density']:.1%}", name, mode, m.get("kernel_ms"), m.get("wall_ms"),
                         m.get("useful_tflops") or m.get("executed_tflops"), m.get("pct_of_fastest_dense_throughput"),
                         m.get("speedup_vs_fastest_dense_kernel"), m.get("speedup_vs_best_flex_kernel"), m.get("peak_mib"),
                         m.get("error")])
    return rows


def run_gpu(args, payload: dict, save) -> dict:
    device = torch.device("cuda")
    grids = [tuple(int(x) for x in g.split("x")) for g in args.grids.split(",")] if args.grids else None
    cases = gpu_cases(args.suite, grids, args.model_batch, args.heads, args.dim, args.batch)
    results = {"mode": "gpu", "dtype": "bfloat16", "timing": f"{args.repeats} back-to-back calls (wall) and a profiler "
               "trace of a quarter as many (kernel), after 3 warm-up calls", "cases": []}
    payload["results"] = results
    if not args.skip_correctness:
        results["correctness"] = gpu_correctness(device)
        save()
    started = time.perf_counter()
    import volumevlm_kernels

    for case in cases:
        over_budget = args.flex_budget_s is not None and time.perf_counter() - started > args.flex_budget_s
        kinds = [] if over_budget else [k for k in FLEX_KINDS if k in args.flex]
        record = {"case": case["case"]}
        results["cases"].append(record)
        run_gpu_case(case, device, kinds, args.repeats, save=save, record=record)
        if over_budget and args.flex:
            record["flex_skipped"] = f"the run passed --flex-budget-s {args.flex_budget_s}"
        results["tuned_configs"] = volumevlm_kernels.tuned_configs()
        save()
        print_table(
            f"{record['case']}: {record['layout']} (bf16, {_device_name(False)}); dispatch -> {record['dispatch']}",
            ["case", "valid", "BxH", "sparsity", "method", "pass", "kernel ms", "wall ms", "TFLOP/s",
             "% fastest dense", "x fastest dense", "x best flex", "peak MiB", "error"],
            _rows(record),
        )
    return results


def dry_run(args) -> dict:
    """The GPU rows without a GPU: which cases, layouts and methods would be timed."""
    grids = [tuple(int(x) for x in g.split("x")) for g in args.grids.split(",")] if args.grids else None
    cases = [describe_case(c) for c in gpu_cases(args.suite, grids, args.model_batch, args.heads, args.dim, args.batch)]
    print_table("GPU rows (dry run: nothing timed)",
                ["case", "tokens", "valid", "registers", "BxH", "density", "executed", "dispatch"],
                [[c["case"], c["tokens"], c["valid_tokens"], c["registers"], f"{c['batch']}x{c['heads']}", c["density"],
                  c["executed_fraction"], c["dispatch"]] for c in cases])
    return {"mode": "dry-run", "cases": cases, "flex": [FLEX_LABELS[k] for k in FLEX_KINDS if k in args.flex]}


def _batches(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        out[name.strip()] = int(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="time the torch path against dense SDPA on the CPU (fp32)")
    parser.add_argument("--dry-run", action="store_true", help="list the GPU rows (layouts, dispatch) without timing")
    parser.add_argument("--suite", choices=("all", "models", "grids"), default="all",
                        help="GPU: the models' layouts, the synthetic grids, or both")
    parser.add_argument("--batch", type=int, default=1, help="batch of the synthetic grids (and of --cpu)")
    parser.add_argument("--model-batch", type=_batches, default={}, help="per-size batch, e.g. small=32,base=8")
    parser.add_argument("--heads", type=int, default=None, help="heads of the synthetic grids: default 12 on GPU, 2 on CPU")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None, help="CPU: timed rounds (min); GPU: timed calls per method")
    parser.add_argument("--grids", default=None, help="GPU grids, e.g. 14x14x10,28x28x20")
    parser.add_argument("--flex", type=lambda s: [k for k in s.split(",") if k], default=list(FLEX_KINDS),
                        help=f"FlexAttention rows to time, from {','.join(FLEX_KINDS)} (empty: none)")
    parser.add_argument("--flex-budget-s", type=float, default=None, help="stop compiling FlexAttention after this many s")
    parser.add_argument("--skip-correctness", action="store_true", help="GPU: skip the reference and no-sync checks")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--tag", default="", help="suffix of the results file name (attention-<device>-<date>-<tag>.json)")
    args = parser.parse_args(argv)
    if args.heads is None:
        args.heads = 2 if args.cpu else 12
    if args.repeats is None:
        args.repeats = 3 if args.cpu else 40
    unknown = set(args.flex) - set(FLEX_KINDS)
    if unknown:
        parser.error(f"--flex: unknown {sorted(unknown)}; known {FLEX_KINDS}")
    if args.dry_run:
        dry_run(args)
        return 0
    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device; run with --cpu for the CPU comparison, or --dry-run", file=sys.stderr)
        return 2
    started = dt.datetime.now(dt.timezone.utc)
    payload = {
        "benchmark": "block-sparse 3D attention",
        "device": _device_name(args.cpu),
        "versions": _versions(),
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["attention.py", *argv]),
        "flop_convention": "useful = attended valid (q,k) pairs; fwd 4*B*H*pairs*D, fwd+bwd 3.5x fwd",
        "complete": False,
    }

    def save() -> Path:
        payload["wall_s"] = round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1)
        return write_results(payload, _device_label(args.cpu), args.out, args.tag)

    payload["results"] = run_cpu(args) if args.cpu else run_gpu(args, payload, save)
    payload["complete"] = True
    print(f"wrote {save()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
