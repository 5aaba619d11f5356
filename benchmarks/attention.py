"""Microbenchmark of volumevlm's block-sparse 3D attention.

GPU mode (default; needs CUDA): our Triton kernels vs dense SDPA (flash backend)
vs FlexAttention (torch.compile'd, with the identical block mask built from the
layout's lists), bf16, forward and forward+backward. It first checks our op (and
FlexAttention) against the float64 dense reference in bf16 and fp32 and stops if
that fails.

CPU mode (``--cpu``): our pure-torch path vs dense SDPA (no mask, and with the
dense boolean mask), fp32, side by side in one run, with peak memory.

FLOP convention: *useful* FLOPs count only attended (query, key) pairs of valid
tokens: forward = 4 * B * H * pairs * D (two matmuls, 2 FLOPs per multiply-add),
backward = 2.5 x forward (five matmuls), forward+backward = 3.5 x forward. Dense
SDPA runs on the ``num_valid`` real tokens with no mask; its *executed* FLOPs use
pairs = num_valid^2. "% of dense" = our useful TFLOP/s / dense SDPA executed TFLOP/s
(throughput per useful FLOP relative to dense flash attention).

Results: a Rich table, and JSON in benchmarks/results/attention-<device>-<date>.json
naming device, torch and triton versions, date and the exact command.

    python benchmarks/attention.py            # GPU
    python benchmarks/attention.py --cpu      # CPU, a couple of minutes on 2 cores
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
    a, b = a.double(), b.double()
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


def write_results(payload: dict, device_label: str, out_dir: Path) -> Path:
    """Write JSON atomically (temp file in the same folder, then os.replace)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"attention-{device_label}-{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}.json"
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
def flex_block_mask(layout, device):
    """A FlexAttention BlockMask identical to the layout: the same full and partial
    key-block lists per query block (padded to the full block count), and a mask_mod
    that masks padding keys inside partial blocks like our kernels do."""
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


# FlexAttention configurations tried in order (its defaults differ between torch
# releases, and some reject 64-token mask blocks in the backward): the first one whose
# compiled forward AND backward run on a probe is the one timed. kernel_options None =
# flex's defaults.
_FLEX_CANDIDATES = (
    ("block mask from our lists, default tiles", "lists", None),
    ("block mask from our lists, 64x64 tiles", "lists",
     {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 64, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 64}),
    ("create_block_mask at 128-token blocks, default tiles", "create128", None),
)


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


def make_flex(layout, device, dtype=torch.bfloat16, dim=64):
    """(compiled flex attention f(q, k, v) -> out, {"config", "tried"}), or (None, info)
    when no configuration compiles forward and backward on this torch/GPU."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    # One compiled function per grid and per grad mode: the default limit (8) makes
    # dynamo fall back to flex's unfused eager path, which would time the wrong thing.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    compiled = torch.compile(flex_attention, dynamic=False)
    info = {"config": None, "tried": []}
    probe = [torch.randn(1, 2, layout.seq_len, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    for name, mask_kind, options in _FLEX_CANDIDATES:
        try:
            mask = flex_block_mask(layout, device) if mask_kind == "lists" else _flex_create_block_mask(layout, device)

            def run(q, k, v, mask=mask, options=options):
                return compiled(q, k, v, block_mask=mask, kernel_options=options)

            run(*probe).sum().backward()
            torch.cuda.synchronize()
            info["config"] = name
            info["tried"].append({"config": name, "error": None})
            return run, info
        except Exception as exc:  # record why, try the next configuration
            info["tried"].append({"config": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"})
    return None, info


def gpu_correctness(device, layout=None) -> list[dict]:
    """Our op (and FlexAttention, bf16) vs the float64 dense reference; raises SystemExit on failure."""
    if layout is None:
        layout = attention_layout((10, 9, 7), tile=(4, 4, 4), window=(1, 1, 1), num_global=5)
    gen = torch.Generator(device="cpu").manual_seed(1234)
    tolerances = {torch.bfloat16: (2e-2, 5e-2), torch.float32: (5e-3, 1e-2)}
    results, failed = [], False
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
        candidates = {"ours (triton)": lambda q, k, v: sparse_attention(q, k, v, layout, backend="triton")}
        if dtype == torch.bfloat16:
            flex, flex_info = make_flex(layout, device)
            print(f"FlexAttention configurations: {flex_info['tried']}")
            if flex is not None:
                candidates[f"flex ({flex_info['config']})"] = flex
            else:
                results.append({"method": "flex", "dtype": "bfloat16", "ok": False, "rel_errors": {},
                                "error": "no configuration compiled: " + "; ".join(t["error"] for t in flex_info["tried"])})
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
            results.append({"method": name, "dtype": str(dtype).replace("torch.", ""), "ok": ok, "rel_errors": errs, "error": error})
            failed |= name.startswith("ours") and not ok
    print_table(
        f"Correctness vs float64 dense reference ({layout!r})",
        ["method", "dtype", "ok", "out", "dq", "dk", "dv", "error"],
        [[r["method"], r["dtype"], r["ok"], *[r["rel_errors"].get(k) for k in ("out", "dq", "dk", "dv")], r["error"]] for r in results],
    )
    if failed:
        raise SystemExit("error: our kernels disagree with the dense reference; no timings taken")
    return results


def _gpu_time_and_memory(fn, grads_to_none, repeats):
    import triton.testing

    ms = triton.testing.do_bench(fn, warmup=10, rep=repeats, grad_to_none=grads_to_none, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20


def run_gpu(args) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = torch.device("cuda")
    checks = gpu_correctness(device)
    flex_ok = any(r["method"].startswith("flex") and r["ok"] for r in checks)
    B, H, D = args.batch, args.heads, args.dim
    dtype = torch.bfloat16
    grids = [tuple(int(x) for x in g.split("x")) for g in args.grids.split(",")] if args.grids else GPU_GRIDS
    rows, records = [], []
    for grid in grids:
        layout = attention_layout(grid, tile=(4, 4, 4), window=(1, 1, 1))
        N, Nv = layout.seq_len, layout.num_valid
        flops = useful_flops(layout, B, H, D)
        dense_flops = 4.0 * B * H * Nv**2 * D
        q, k, v, do = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(4))
        qd, kd, vd, dod = (torch.randn(B, H, Nv, D, device=device, dtype=dtype) for _ in range(4))

        def sdpa(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)

        def sdpa_cudnn(q, k, v):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)

        methods = {
            "ours (triton)": (lambda q, k, v, layout=layout: sparse_attention(q, k, v, layout, backend="triton"), (q, k, v, do), flops),
            "sdpa dense (flash)": (sdpa, (qd, kd, vd, dod), dense_flops),
            "sdpa dense (cudnn)": (sdpa_cudnn, (qd, kd, vd, dod), dense_flops),
        }
        if flex_ok:
            flex, _ = make_flex(layout, device)
            if flex is not None:
                methods["flex (compiled)"] = (flex, (q, k, v, do), flops)
        case = {"grid": list(grid), "tokens": N, "valid_tokens": Nv, "density": layout.density, "methods": {}}
        for name, (fn, (a, b, c, g), executed) in methods.items():
            leaves = [x.clone().requires_grad_() for x in (a, b, c)]
            entry = {}
            for mode in ("fwd", "fwd+bwd"):
                try:
                    if mode == "fwd":
                        call = lambda fn=fn, a=a, b=b, c=c: fn(a, b, c)  # noqa: E731
                        with torch.inference_mode():
                            ms, mib = _gpu_time_and_memory(call, None, args.repeats)
                    else:
                        call = lambda fn=fn, g=g, leaves=leaves: fn(*leaves).backward(g)  # noqa: E731
                        ms, mib = _gpu_time_and_memory(call, leaves, args.repeats)
                    factor = 1.0 if mode == "fwd" else 3.5
                    entry[mode] = {
                        "ms": ms,
                        "useful_tflops": factor * flops / (ms * 1e-3) / 1e12,
                        "executed_tflops": factor * executed / (ms * 1e-3) / 1e12,
                        "peak_mib": mib,
                    }
                except Exception as exc:  # e.g. out of memory at the largest grid: record it
                    entry[mode] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
                    torch.cuda.empty_cache()
            case["methods"][name] = entry
        dense = case["methods"]["sdpa dense (flash)"]
        for name, entry in case["methods"].items():
            for mode, m in entry.items():
                if "ms" in m and "ms" in dense.get(mode, {}):
                    m["pct_of_dense_throughput"] = 100.0 * m["useful_tflops"] / dense[mode]["executed_tflops"]
                    m["speedup_vs_dense"] = dense[mode]["ms"] / m["ms"]
                rows.append(
                    ["x".join(map(str, grid)), N, f"{1 - layout.density:.1%}", name, mode, m.get("ms"),
                     m.get("useful_tflops"), m.get("pct_of_dense_throughput"), m.get("speedup_vs_dense"),
                     m.get("peak_mib"), m.get("error")]
                )
        records.append(case)
        del q, k, v, do, qd, kd, vd, dod
        torch.cuda.empty_cache()
    print_table(
        f"GPU bf16, B={B} H={H} D={D}, tile 4x4x4, window 1 ({_device_name(False)})",
        ["case", "tokens", "sparsity", "method", "pass", "ms", "useful TFLOP/s", "% of dense", "x vs dense", "peak MiB", "error"],
        rows,
    )
    return {"mode": "gpu", "dtype": "bfloat16", "batch": B, "heads": H, "dim": D, "tile": [4, 4, 4],
            "window": [1, 1, 1], "correctness": checks, "cases": records}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="time the torch path against dense SDPA on the CPU (fp32)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=None, help="default 12 on GPU, 2 on CPU")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None, help="CPU: timed calls per method (min); GPU: ms of do_bench")
    parser.add_argument("--grids", default=None, help="GPU grids, e.g. 14x14x10,28x28x20")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.heads is None:
        args.heads = 2 if args.cpu else 12
    if args.repeats is None:
        args.repeats = 3 if args.cpu else 200
    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device; run with --cpu for the CPU comparison", file=sys.stderr)
        return 2
    started = dt.datetime.now(dt.timezone.utc)
    payload = {
        "benchmark": "block-sparse 3D attention",
        "device": _device_name(args.cpu),
        "versions": _versions(),
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["attention.py", *argv]),
        "flop_convention": "useful = attended valid (q,k) pairs; fwd 4*B*H*pairs*D, fwd+bwd 3.5x fwd",
        "results": run_cpu(args) if args.cpu else run_gpu(args),
    }
    payload["wall_s"] = round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1)
    path = write_results(payload, _device_label(args.cpu), args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
