"""GPU check of the Triton block-sparse attention kernels: correctness and speed.

Needs a CUDA device (exits with a message otherwise). For each dtype it

1. compares forward (o, lse) and backward (dq, dk, dv) of ``volumevlm_kernels`` with
   the float64 dense masked reference (``volumevlm.ops.reference.dense_reference``)
   on the full layout, with few heads so the N x N float64 matrices fit, and prints
   max |error| / max |reference| per output;
2. times forward and backward (``triton.testing.do_bench``, median ms) with more heads,
   and prints useful TFLOP/s: FLOPs counted only over attended (valid query, valid
   key) pairs, 4 * D per pair forward, 10 * D per pair backward (the usual 2.5x);
3. times dense SDPA (flash backend when available) on the same N as a yardstick.

Default: 28x28x20 token grid, 4x4x4 tiles (T = 64), window 1 (3x3x3 tiles), head dim
64. Nothing here is a committed result: print, read, and record figures with the
device name, versions, date and command if you keep them.

    python benchmarks/kernel_check.py [--grid 28,28,20] [--tile 4] [--window 1]
        [--num-global 0] [--head-dim 64] [--heads 12] [--batch 1] [--check-heads 2]
        [--dtypes bfloat16,float16,float32]

``--device cpu`` (with ``TRITON_INTERPRET=1`` set, tiny grids only) runs the comparison
in Triton's interpreter and skips the timings: a dry run of this script without a GPU.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", type=_ints, default=(28, 28, 20))
    p.add_argument("--tile", type=_ints, default=(4,))
    p.add_argument("--window", type=int, default=1)
    p.add_argument("--num-global", type=int, default=0)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=12, help="heads for timing")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--check-heads", type=int, default=2, help="heads for the float64 comparison (memory: ~N^2 * 24 B each)")
    p.add_argument("--dtypes", default="bfloat16,float16,float32")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for an interpreter dry run (no timings)")
    args = p.parse_args(argv)

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("kernel_check: needs a CUDA device; none found", file=sys.stderr)
        return 2
    if dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        print("kernel_check: --device cpu needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
        return 2

    import triton
    from triton.testing import do_bench

    from volumevlm.ops.layout import attention_layout
    from volumevlm.ops.reference import dense_reference
    from volumevlm_kernels import (
        backward_prepared,
        block_sparse_attention_backward,
        block_sparse_attention_forward,
        forward_prepared,
        plan_from_block_lists,
    )

    tile = args.tile[0] if len(args.tile) == 1 else args.tile
    layout = attention_layout(args.grid, tile=tile, window=args.window, num_global=args.num_global)
    lists = layout.block_lists(dev)
    kv, qv = lists.key_valid, lists.query_valid
    N, T, D = layout.seq_len, layout.block_size, args.head_dim
    scale = D**-0.5
    pairs = layout.density * layout.num_valid**2  # attended valid (query, key) pairs per head
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (Triton interpreter)"
    print(f"device: {name}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"{layout!r}; attended pairs/head {pairs:.4g} (sparsity {1 - layout.density:.3f})")

    def run(q, k, v, do):
        o, lse = block_sparse_attention_forward(q, k, v, lists, kv, qv, T, scale)
        return (o, lse) + block_sparse_attention_backward(do, q, k, v, o, lse, lists, kv, T, scale)

    for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
        g = torch.Generator(device=dev).manual_seed(0)
        B, H = 1, args.check_heads
        q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=dtype, generator=g) for _ in range(4))
        o, lse, dq, dk, dv = run(q, k, v, do)
        q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
        ref = dense_reference(q64, k64, v64, layout, scale)
        ref.backward(torch.where(qv[:, None], do.double(), 0.0))
        mask = layout.dense_mask().to(dev)
        s = (q.double() @ k.double().transpose(-1, -2) * scale).masked_fill(~mask, -math.inf)
        lse_ref = torch.logsumexp(s, -1)
        del s, mask
        errs = {
            "o": _rel(o[:, :, qv], ref.detach()[:, :, qv]),
            "lse": _rel(lse[:, :, qv], lse_ref[:, :, qv]),
            "dq": _rel(dq[:, :, qv], q64.grad[:, :, qv]),
            "dk": _rel(dk[:, :, kv], k64.grad[:, :, kv]),
            "dv": _rel(dv[:, :, kv], v64.grad[:, :, kv]),
        }
        nan = any(torch.isnan(t).any().item() for t in (o, lse, dq, dk, dv))
        print(f"[{str(dtype)[6:]}] max rel error " + "  ".join(f"{n} {e:.2e}" for n, e in errs.items()) + f"  nan={nan}")
        del q64, k64, v64, ref, lse_ref
        if dev.type != "cuda":
            continue
        torch.cuda.empty_cache()

        B, H = args.batch, args.heads
        q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=dtype, generator=g) for _ in range(4))
        # Timed through the launches the op uses (a plan prepared once, no argument checks:
        # the checked entry points order the programs on the host, a device sync per call).
        plan = plan_from_block_lists(lists)
        o, lse = forward_prepared(q, k, v, plan, scale)
        t_fwd = do_bench(lambda q=q, k=k, v=v, plan=plan: forward_prepared(q, k, v, plan, scale))
        t_bwd = do_bench(lambda do=do, q=q, k=k, v=v, o=o, lse=lse, plan=plan: backward_prepared(do, q, k, v, o, lse, plan, scale))
        flops = B * H * pairs * D
        line = (
            f"[{str(dtype)[6:]}] B={B} H={H} D={D}: forward {t_fwd:.3f} ms = {4 * flops / t_fwd / 1e9:.1f} TFLOP/s useful, "
            f"backward {t_bwd:.3f} ms = {10 * flops / t_bwd / 1e9:.1f} TFLOP/s useful"
        )
        if dtype != torch.float32:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                f = torch.nn.functional.scaled_dot_product_attention
                t_dense = do_bench(lambda f=f, q=q, k=k, v=v: f(q, k, v, scale=scale))
            dense_flops = 4 * B * H * N * N * D
            line += f"; dense SDPA forward {t_dense:.3f} ms ({dense_flops / t_dense / 1e9:.1f} TFLOP/s dense)"
        print(line)
        del q, k, v, do, o, lse
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
