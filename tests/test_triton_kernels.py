"""Triton block-sparse attention kernels against a float64 dense masked reference.

CPU (CI): the kernels run under Triton's interpreter. ``TRITON_INTERPRET=1`` only takes
effect if it is set before the kernels are decorated, which another test module may
already have done in this process; so every interpreter case runs in ONE child
process (this file executed as a script with the variable set before any import), and
each parametrized test checks its own case's figures from that run. The child proves
it is interpreting, so these tests can never be skipped or silently run something else.

The interpreter runs fp32 and fp16 correctly but not bf16 (its bf16 arithmetic and
dots are wrong in Triton 3.9), so bf16 is checked only on CUDA. GPU-only failures that
the interpreter cannot see (layouts, shared memory, dot shapes) are caught by compiling
every kernel for sm_90 ahead of time, which needs no GPU.

GPU: the ``gpu`` tests run in-process on CUDA (bf16/fp16/fp32 at realistic sizes,
head dim 128) and are skipped with a stated reason where no CUDA device exists.

Inputs are random, drawn fresh per case from a seed derived from the case id; padding
positions of the inputs are filled with NaN and every output the kernels allocate is
NaN-poisoned first, so masked-out or unwritten memory shows.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Child process. Interpreter mode: the variable must be set before triton or the
    # kernels load. Compile mode (--compile-sm90): real JIT functions, so it must be off.
    if "--compile-sm90" in sys.argv:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = "1"

import json
import math
import subprocess
import traceback
import zlib
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from volumevlm.ops.layout import attention_layout
from volumevlm.ops.reference import dense_reference

# ------------------------------------------------------------------------- helpers


def _seed(case_id: str) -> int:
    return zlib.crc32(case_id.encode())


def _csr(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [R, C] -> CSR (indptr int32 [R+1], idx int32, ascending within a row)."""
    counts = mask.sum(1)
    indptr = torch.zeros(mask.shape[0] + 1, dtype=torch.int32)
    indptr[1:] = counts.cumsum(0).to(torch.int32)
    return indptr, mask.nonzero()[:, 1].to(torch.int32).contiguous()


class HandLayout:
    """A layout built from a block mask and validity vectors (shapes no 3D layout yields).

    Offers what the kernels and ``dense_reference`` use: ``block_lists``, ``key_valid``,
    ``query_valid``, ``block_size``, ``seq_len``, ``dense_mask``.
    """

    def __init__(self, block_mask: torch.Tensor, valid: torch.Tensor, block_size: int):
        nb = block_mask.shape[0]
        self.block_size = block_size
        self.seq_len = nb * block_size
        self.key_valid = valid.clone()
        self.query_valid = valid.clone()
        blocks = valid.view(nb, block_size)
        # Query blocks made only of padding attend nothing (empty lists).
        self._block_mask = block_mask & blocks.any(1)[:, None]
        part = ~blocks.all(1)[None, :]
        full_m, part_m = self._block_mask & ~part, self._block_mask & part
        fields = {}
        for prefix, m in (("q2k", (full_m, part_m)), ("k2q", (full_m.T, part_m.T))):
            for kind, mm in zip(("full", "part"), m):
                fields[f"{prefix}_{kind}_indptr"], fields[f"{prefix}_{kind}_idx"] = _csr(mm)
        self._lists = fields

    def block_lists(self, device):
        return SimpleNamespace(**{k: v.to(device) for k, v in self._lists.items()})

    def dense_mask(self) -> torch.Tensor:
        T = self.block_size
        m = self._block_mask.repeat_interleave(T, 0).repeat_interleave(T, 1)
        return m & self.query_valid[:, None] & self.key_valid[None, :]


def _hand_layout(seed: int) -> HandLayout:
    """5 blocks of 16 with what no 3D layout yields: an all-padding block (2) whose query
    list is empty but which sits in other blocks' partial lists, a valid key block (3) that
    no query attends (its dk/dv must be 0), and a query block (4) whose first partial tile
    is all padding (its running max stays -inf there) and that has no full tile."""
    g = torch.Generator().manual_seed(seed)
    nb, T = 5, 16
    mask = torch.rand(nb, nb, generator=g) < 0.5
    mask |= torch.eye(nb, dtype=torch.bool)
    mask[:, 3] = False
    mask[3, 0] = True  # valid queries keep >= 1 valid key
    mask[4, :] = False
    mask[4, 2] = mask[4, 4] = True
    mask[0, 2] = True
    valid = torch.ones(nb * T, dtype=torch.bool)
    valid[2 * T : 3 * T] = False  # block 2: all padding
    valid[4 * T + 5 :] = False  # block 4: partly padding
    valid[T + 3] = False  # block 1: one padding token in the middle
    return HandLayout(mask, valid, T)


# Interpreter cases (fp32 unless said): (id, layout builder, B, H, D, dtype name).
_LAYOUTS = {
    "grid_not_divisible_T16": lambda s: attention_layout((5, 3, 6), tile=(2, 2, 4), window=1),
    "single_tile_d64": lambda s: attention_layout((2, 2, 4), tile=(2, 2, 4), window=1),
    "one_tile_with_padding": lambda s: attention_layout((1, 2, 3), tile=(2, 2, 4), window=1),
    "global_tokens_window0": lambda s: attention_layout((4, 2, 8), tile=(2, 2, 4), window=0, num_global=3),
    "window_larger_than_grid": lambda s: attention_layout((3, 4, 8), tile=(2, 2, 4), window=5),
    "dilation2": lambda s: attention_layout((6, 4, 8), tile=(2, 2, 4), window=1, dilation=2),
    "T64_globals": lambda s: attention_layout((5, 4, 4), tile=(4, 4, 4), window=1, num_global=2),
    "hand_empty_blocks": _hand_layout,
    "fp16_grid_not_divisible": lambda s: attention_layout((3, 3, 5), tile=(2, 2, 4), window=1, num_global=1),
    # The encoders' patterns in miniature: 4 registers (a global block scheduled first),
    # grids padded up to the tile, local and dilated windows, several batch-heads.
    "model_local_registers": lambda s: attention_layout((7, 7, 10), tile=(2, 2, 4), window=1, num_global=4),
    "model_dilated_registers": lambda s: attention_layout((6, 5, 9), tile=(2, 2, 4), window=1, dilation=2, num_global=4),
}
INTERP_CASES = [
    ("grid_not_divisible_T16", 2, 2, 32, "float32"),
    ("single_tile_d64", 1, 2, 64, "float32"),
    ("one_tile_with_padding", 1, 1, 32, "float32"),
    ("global_tokens_window0", 1, 2, 32, "float32"),
    ("window_larger_than_grid", 1, 1, 32, "float32"),
    ("dilation2", 1, 1, 32, "float32"),
    ("T64_globals", 1, 1, 32, "float32"),
    ("hand_empty_blocks", 2, 1, 32, "float32"),
    ("fp16_grid_not_divisible", 1, 2, 32, "float16"),
    ("model_local_registers", 1, 3, 16, "float32"),
    ("model_dilated_registers", 2, 2, 16, "float32"),
]
# Cases whose layout has blocks scheduled first (their program mapping is exercised).
LONG_FIRST_CASES = ("model_local_registers", "model_dilated_registers")

# Max |kernel - reference| / max |reference|, per output, by input dtype.
TOLERANCE = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}
GRAD_TOLERANCE = {"float32": 5e-5, "float16": 1e-2, "bfloat16": 5e-2}


@contextmanager
def _poisoned_allocations():
    """Make torch.empty / torch.empty_like return NaN-filled float tensors meanwhile."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: fill(empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def _rel(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    """max |a - b| / max |b| over positions ``where`` (bool [N], last-but-one dim); nan -> inf."""
    a, b = a.double()[..., where, :], b.double()[..., where, :]
    if a.numel() == 0:
        return 0.0
    err = (a - b).abs().max().item()
    return math.inf if math.isnan(err) else err / max(b.abs().max().item(), 1e-12)


def run_case(layout, B: int, H: int, D: int, dtype: torch.dtype, device, seed: int) -> dict:
    """Run forward + backward on one layout and compare with the float64 dense reference.

    Returns relative errors (o, lse, dq, dk, dv on valid rows) and whether the padding rows
    hold exactly what the contract says (o = 0, lse = +inf, dq = 0, dk = dv = 0).
    """
    from volumevlm_kernels import block_sparse_attention_backward, block_sparse_attention_forward

    g = torch.Generator().manual_seed(seed)
    N, T = layout.seq_len, layout.block_size
    qv, kv = layout.query_valid.to(device), layout.key_valid.to(device)
    q, k, v, do = (torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype) for _ in range(4))
    # Padding inputs hold NaN and +-inf: the kernels must never let them reach a valid output.
    for x, valid in ((q, qv), (k, kv), (v, kv), (do, qv)):
        pad = (~valid).nonzero().flatten()
        for j, value in enumerate((float("nan"), float("inf"), float("-inf"))):
            x[:, :, pad[j::3]] = value
    scale = D**-0.5
    lists = layout.block_lists(device)

    with _poisoned_allocations():
        o, lse = block_sparse_attention_forward(q, k, v, lists, kv, qv, T, scale)
        dq, dk, dv = block_sparse_attention_backward(do, q, k, v, o, lse, lists, kv, T, scale)

    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref = dense_reference(q64, k64, v64, layout, scale)
    ref.backward(torch.where(qv[:, None], do.double(), 0.0))
    mask = layout.dense_mask().to(device)
    s = torch.where(qv[:, None], q.double(), 0.0) @ torch.where(kv[:, None], k.double(), 0.0).transpose(-1, -2)
    lse_ref = torch.logsumexp((s * scale).masked_fill(~mask, -math.inf), -1)

    lists_long = getattr(lists, "fwd_long", None)
    return {
        "fwd_long": lists_long,
        "o": _rel(o, ref.detach(), qv),
        "lse": _rel(lse[..., None], lse_ref[..., None], qv),
        "dq": _rel(dq, q64.grad, qv),
        "dk": _rel(dk, k64.grad, kv),
        "dv": _rel(dv, v64.grad, kv),
        "padding_exact": bool(
            (o[:, :, ~qv] == 0).all()
            and (lse[:, :, ~qv] == math.inf).all()
            and (dq[:, :, ~qv] == 0).all()
            and (dk[:, :, ~kv] == 0).all()
            and (dv[:, :, ~kv] == 0).all()
        ),
        "any_nan": bool(any(torch.isnan(t).any() for t in (o, lse, dq, dk, dv))),
    }


def _check(case_id: str, dtype_name: str, result: dict) -> None:
    assert "error" not in result, f"{case_id} raised in the kernels:\n{result.get('error')}"
    assert not result["any_nan"], f"{case_id}: NaN in an output (unwritten or unmasked memory)"
    assert result["padding_exact"], f"{case_id}: padding rows are not exactly o=0, lse=inf, dq=dk=dv=0"
    tol, gtol = TOLERANCE[dtype_name], GRAD_TOLERANCE[dtype_name]
    for name in ("o", "lse"):
        assert result[name] <= tol, f"{case_id}: {name} relative error {result[name]:.3g} > {tol:g}"
    for name in ("dq", "dk", "dv"):
        assert result[name] <= gtol, f"{case_id}: {name} relative error {result[name]:.3g} > {gtol:g}"


# ------------------------------------------------------------- interpreter child run


def _child_main() -> None:
    """Run every interpreter case on the CPU and print one JSON object to stdout."""
    import triton  # noqa: F401  (imported after TRITON_INTERPRET=1 was set above)
    from triton.runtime.interpreter import InterpretedFunction

    import volumevlm_kernels.block_sparse_attention as bsa

    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = {
        "interpreting": isinstance(bsa._fwd_kernel.fn, InterpretedFunction)
        and isinstance(bsa._bwd_kernel.fn, InterpretedFunction),
        "num_configs": [len(bsa._fwd_kernel.configs), len(bsa._bwd_kernel.configs)],
        "cases": {},
    }
    for case_id, B, H, D, dtype_name in INTERP_CASES:
        seed = _seed(case_id)
        try:
            layout = _LAYOUTS[case_id](seed)
            out["cases"][case_id] = run_case(layout, B, H, D, getattr(torch, dtype_name), "cpu", seed)
        except Exception:  # reported to (and failed in) the parent test of this case
            out["cases"][case_id] = {"error": traceback.format_exc()}
    print(json.dumps(out))


@pytest.fixture(scope="module")
def interpreter_run() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"interpreter child failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_child_really_interprets(interpreter_run):
    assert interpreter_run["interpreting"], "TRITON_INTERPRET=1 did not reach the kernels in the child"
    # Autotuning must collapse to one config under the interpreter (it ignores warps/stages).
    assert interpreter_run["num_configs"] == [1, 1]


@pytest.mark.parametrize("case_id,B,H,D,dtype_name", INTERP_CASES, ids=[c[0] for c in INTERP_CASES])
def test_interpreter_matches_dense_reference(interpreter_run, case_id, B, H, D, dtype_name):
    _check(case_id, dtype_name, interpreter_run["cases"][case_id])


@pytest.mark.parametrize("case_id", LONG_FIRST_CASES)
def test_long_first_program_order_is_exercised(interpreter_run, case_id):
    """These cases schedule a global block first (a non-trivial program mapping), so
    their exact match above covers the mapping: every (block, head) once."""
    assert interpreter_run["cases"][case_id]["fwd_long"] >= 1


def test_hand_layout_exercises_edge_cases():
    """The hand-built layout really has an all-padding query block, an unattended valid
    key block and a partially padded key block (else its test would prove less)."""
    lay = _hand_layout(_seed("hand_empty_blocks"))
    lists = lay.block_lists("cpu")
    q2k_len = lists.q2k_full_indptr.diff() + lists.q2k_part_indptr.diff()
    k2q_len = lists.k2q_full_indptr.diff() + lists.k2q_part_indptr.diff()
    assert q2k_len[2] == 0 and k2q_len[2] > 0  # all-padding block, attended as keys
    assert k2q_len[3] == 0 and lay.key_valid[3 * 16 : 4 * 16].all()  # valid but unattended
    assert q2k_len[4] == 2 and lists.q2k_part_idx[lists.q2k_part_indptr[4]].item() == 2
    assert lists.k2q_part_indptr.diff()[1] > 0  # block 1: one padding key -> partial


# ------------------------------------------- ahead-of-time compile for an H100 (sm_90)

# (dtype, head dim, block size, num_warps, num_stages): the configurations the GPU will
# run most (bf16/fp16 at T = 64, d = 64 and 128) and the small-tile one.
COMPILE_CASES = [("bf16", 64, 64, 4, 3), ("fp16", 128, 64, 8, 2), ("bf16", 32, 16, 4, 2)]


def _compile_main() -> None:
    """Compile every kernel for sm_90 without a GPU (Triton + its bundled ptxas) and
    print, per kernel and case, shared memory and whether wgmma / async copies are used."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner

    import volumevlm_kernels.block_sparse_attention as bsa

    kernels = {
        "fwd": bsa._fwd_kernel,
        "delta": bsa._bwd_delta_kernel,
        "bwd": bsa._bwd_kernel,
    }
    out = {}
    for dtype, d, block, warps, stages in COMPILE_CASES:
        for name, kernel in kernels.items():
            fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
            consts = {"HEAD_DIM": d, "BLOCK": block, "PRECISION": "tf32"}
            consts = {k: v for k, v in consts.items() if k in fn.arg_names}
            sig = {}
            for arg in fn.arg_names:
                if arg in consts:
                    sig[arg] = "constexpr"
                elif arg in ("N", "NB", "BH", "N_LONG", "TUNE_N", "TUNE_BH"):
                    sig[arg] = "i32"
                elif "scale" in arg:
                    sig[arg] = "fp32"
                elif arg in ("LSE", "DELTA"):
                    sig[arg] = "*fp32"
                elif arg.endswith("VALID"):
                    sig[arg] = "*i8"
                elif arg.endswith(("_PTR", "_IDX")) or arg == "ORDER":
                    sig[arg] = "*i32"
                else:
                    sig[arg] = "*" + dtype
            # What the JIT assumes at launch: 16-byte aligned pointers, N % 16 == 0.
            attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a][0] == "*" or a == "N"}
            key = f"{name}_{dtype}_d{d}_T{block}"
            try:
                compiled = triton.compile(
                    ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                    target=GPUTarget("cuda", 90, 32),
                    options={"num_warps": warps, "num_stages": stages},
                )
            except Exception:
                out[key] = {"error": traceback.format_exc()[-3000:]}
                continue
            ttgir = compiled.asm["ttgir"]
            out[key] = {
                "shared": compiled.metadata.shared,
                "wgmma": "warp_group_dot" in ttgir,
                "async_copies": ttgir.count("async_copy_global_to_local"),
            }
    print(json.dumps(out))


@pytest.fixture(scope="module")
def sm90_compile() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--compile-sm90"], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"compile child failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype,d,block,warps,stages", COMPILE_CASES, ids=[f"{c[0]}_d{c[1]}_T{c[2]}" for c in COMPILE_CASES])
def test_kernels_compile_for_h100(sm90_compile, dtype, d, block, warps, stages):
    """The interpreter cannot see GPU-only failures (layouts, shared memory, dot shapes):
    compile each kernel for sm_90 ahead of time, and check the hot loops use Hopper
    tensor cores (wgmma) at T = 64 and software-pipelined async loads."""
    for name in ("fwd", "delta", "bwd"):
        res = sm90_compile[f"{name}_{dtype}_d{d}_T{block}"]
        assert "error" not in res, f"{name} {dtype} d={d} T={block} does not compile for sm_90:\n{res.get('error')}"
        assert res["shared"] <= 227 * 1024, f"{name}: {res['shared']} B shared memory exceeds an H100's 227 KiB"
        if name != "delta":
            assert res["async_copies"] > 0, f"{name} {dtype} d={d} T={block}: loads are not pipelined"
            if block >= 64:
                assert res["wgmma"], f"{name} {dtype} d={d} T={block}: no wgmma on sm_90"


# ------------------------------------------------------------- argument validation


def _tiny_args(N=32, D=32, block_size=16):
    from volumevlm_kernels import block_sparse_attention_forward

    lay = attention_layout((2, 2, 8), tile=(2, 2, 4), window=1)
    q = torch.zeros(1, 1, N, D)
    return block_sparse_attention_forward, q, lay.block_lists("cpu"), lay, block_size


@pytest.mark.parametrize("block_size", [24, 8, 0])
def test_bad_block_size_is_a_clear_value_error(block_size):
    fwd, q, lists, lay, _ = _tiny_args()
    with pytest.raises(ValueError, match=f"block size .*{block_size}"):
        fwd(q, q, q, lists, lay.key_valid, lay.query_valid, block_size, 1.0)


@pytest.mark.parametrize("D", [24, 256, 8])
def test_bad_head_dim_is_rejected(D):
    fwd, _, lists, lay, T = _tiny_args()
    q = torch.zeros(1, 1, 32, D)
    with pytest.raises(ValueError, match=f"head dim .*{D}"):
        fwd(q, q, q, lists, lay.key_valid, lay.query_valid, T, 1.0)


def test_mismatched_inputs_are_rejected():
    fwd, q, lists, lay, T = _tiny_args()
    with pytest.raises(ValueError, match="k:.*differ"):
        fwd(q, q.half(), q, lists, lay.key_valid, lay.query_valid, T, 1.0)
    with pytest.raises(ValueError, match="not a positive multiple of block_size"):
        q40 = torch.zeros(1, 1, 40, 32)
        fwd(q40, q40, q40, lists, lay.key_valid, lay.query_valid, T, 1.0)
    with pytest.raises(ValueError, match="q2k_full_indptr.*int32"):
        bad = SimpleNamespace(**{**vars(lists), "q2k_full_indptr": lists.q2k_full_indptr.long()})
        fwd(q, q, q, bad, lay.key_valid, lay.query_valid, T, 1.0)
    with pytest.raises(ValueError, match="key_valid"):
        fwd(q, q, q, lists, lay.key_valid[:16], lay.query_valid, T, 1.0)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="CPU tensors are legal under the interpreter")
def test_cpu_tensors_without_interpreter_are_rejected():
    fwd, q, lists, lay, T = _tiny_args()
    with pytest.raises(ValueError, match="need CUDA tensors"):
        fwd(q, q, q, lists, lay.key_valid, lay.query_valid, T, 1.0)


# -------------------------------------------------------------------------- GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (Triton kernels compile for GPU)")

GPU_CASES = [
    # (id, layout kwargs, B, H, D, dtype)
    ("bf16_16x16x12_T64_d64", dict(grid=(16, 16, 12), tile=4, window=1), 2, 2, 64, "bfloat16"),
    ("fp16_16x16x12_T64_d64", dict(grid=(16, 16, 12), tile=4, window=1), 1, 2, 64, "float16"),
    ("fp32_15x14x13_T64_globals", dict(grid=(15, 14, 13), tile=4, window=1, num_global=4), 1, 2, 64, "float32"),
    ("bf16_15x14x13_T64_d128_globals", dict(grid=(15, 14, 13), tile=4, window=1, num_global=4), 1, 2, 128, "bfloat16"),
    ("fp16_13x9x20_T16_d32", dict(grid=(13, 9, 20), tile=(2, 2, 4), window=2), 1, 3, 32, "float16"),
    ("bf16_dense_8x8x8_T64_d64", dict(grid=(8, 8, 8), tile=4, window=None, num_global=1), 1, 2, 64, "bfloat16"),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case_id,kwargs,B,H,D,dtype_name", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_matches_dense_reference(case_id, kwargs, B, H, D, dtype_name):
    layout = attention_layout(**kwargs)
    result = run_case(layout, B, H, D, getattr(torch, dtype_name), torch.device("cuda"), _seed(case_id))
    _check(case_id, dtype_name, result)


if __name__ == "__main__":
    _compile_main() if "--compile-sm90" in sys.argv else _child_main()
