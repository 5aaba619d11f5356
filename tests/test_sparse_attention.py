"""volumevlm.ops.sparse_attention (torch path) against the float64 dense masked reference.

Outputs AND gradients (dq, dk, dv through autograd) are compared, with fresh random
inputs per case (seeded from the test id), on awkward layouts: grids not divisible
by the tile, a single tile, global tokens only, windows larger than the grid,
several global blocks. Two entry points are exercised: the public op (which may
route high-density layouts to dense SDPA) and the blocked path alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch

from volumevlm.errors import InputError, VolumeVLMError
from volumevlm.ops import attention, attention_layout, dense_reference, sparse_attention, torch_path
from volumevlm.ops.attention import torch_block_sparse

# name -> attention_layout kwargs
LAYOUTS = {
    "window1-not-divisible": dict(grid=(13, 9, 6), tile=(4, 4, 2), window=(1, 0, 1)),
    "dilation2": dict(grid=(12, 12, 8), tile=4, window=1, dilation=2),
    "aniso-globals70": dict(grid=(8, 8, 12), tile=4, window=(0, 1, 1), num_global=70),
    "globals5-padded": dict(grid=(10, 7, 5), tile=(4, 4, 2), window=(1, 1, 0), num_global=5),
    "single-tile": dict(grid=(4, 4, 4), tile=4, window=1),
    "one-padded-tile": dict(grid=(3, 2, 1), tile=4, window=1),
    "globals-only-tiny-grid": dict(grid=(1, 1, 1), tile=4, window=1, num_global=9),
    "window-larger-than-grid": dict(grid=(8, 8, 4), tile=4, window=(5, 7, 9), num_global=1),
    "dense-padded": dict(grid=(6, 5, 3), tile=(4, 4, 2), window=None, num_global=3),
}

# relative RMS error bounds (output, gradients) per dtype
TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 5e-5), torch.bfloat16: (2e-2, 4e-2)}
PATHS = {
    "op": lambda q, k, v, layout, scale: sparse_attention(q, k, v, layout, scale=scale),
    "blocked": torch_block_sparse,
    # One SDPA call on the valid tokens (with the layout's bias when it is sparse).
    "dense": lambda q, k, v, layout, scale: sparse_attention(q, k, v, layout, backend="dense", scale=scale),
}


@pytest.fixture
def gen(request):
    """A generator seeded from the test id: fresh inputs per case, reproducible per case."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _inputs(layout, dtype, gen, B=2, H=2, D=16):
    shape = (B, H, layout.seq_len, D)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(3)]


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_outputs_and_gradients_match_dense_reference(name, path, dtype, gen):
    layout = attention_layout(**LAYOUTS[name])
    q, k, v = _inputs(layout, dtype, gen)
    scale = 0.3 if name == "dilation2" else None
    out = PATHS[path](q, k, v, layout, scale)
    assert out.dtype == dtype and out.shape == q.shape
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = dense_reference(q64, k64, v64, layout, scale=scale)
    tol_out, tol_grad = TOLERANCE[dtype]
    assert _rel(out, ref) < tol_out
    grad = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    want = torch.autograd.grad(ref, (q64, k64, v64), grad)
    for label, g, w in zip("qkv", got, want):
        assert g.dtype == dtype
        assert _rel(g, w) < tol_grad, f"d{label}: rel error {_rel(g, w):.2e}"
    # Padding: output exactly 0, no gradient flows into padding positions.
    pad = layout.is_padding
    assert bool((out[:, :, pad] == 0).all())
    for g in got:
        assert bool((g[:, :, pad] == 0).all())


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", ["window1-not-divisible", "globals5-padded", "one-padded-tile", "dense-padded"])
def test_nan_in_padding_inputs_does_not_leak(name, path, gen):
    layout = attention_layout(**LAYOUTS[name])
    clean = [x.detach() for x in _inputs(layout, torch.float32, gen)]
    poisoned = [x.clone() for x in clean]
    for x in poisoned:
        x[:, :, layout.is_padding] = float("nan")
    poisoned = [x.requires_grad_() for x in poisoned]
    out = PATHS[path](*poisoned, layout, None)
    assert torch.equal(out, PATHS[path](*clean, layout, None))
    grad = torch.randn(out.shape, generator=gen)
    grad[:, :, layout.is_padding] = float("nan")  # upstream garbage at padding rows must not leak either
    grads = torch.autograd.grad(out, poisoned, grad)
    for g in grads:
        assert bool(torch.isfinite(g).all())
    assert all(bool(torch.isnan(x[:, :, layout.is_padding]).all()) for x in poisoned), "inputs were modified"


@pytest.mark.parametrize("name", ["window1-not-divisible", "dilation2", "aniso-globals70"])
def test_every_output_is_written_when_buffers_are_nan_poisoned(name, gen, monkeypatch):
    def nan_alloc(*shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(torch_path, "_alloc", nan_alloc)
    layout = attention_layout(**LAYOUTS[name])
    q, k, v = _inputs(layout, torch.float32, gen)
    out = torch_block_sparse(q, k, v, layout)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert bool(torch.isfinite(out).all())
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    ref = dense_reference(q.detach(), k.detach(), v.detach(), layout)
    assert _rel(out, ref) < 2e-5


def test_larger_head_dim_and_chunking(gen, monkeypatch):
    # A tiny chunk budget forces one query block per chunk: results must not change.
    layout = attention_layout((12, 8, 8), tile=4, window=(1, 1, 0), num_global=2)
    q, k, v = (x.detach() for x in _inputs(layout, torch.float64, gen, B=1, H=3, D=64))
    whole = torch_block_sparse(q, k, v, layout)
    monkeypatch.setattr(torch_path, "_CHUNK_ELEMENTS", 1)
    assert torch.allclose(torch_block_sparse(q, k, v, layout), whole, rtol=0, atol=1e-12)
    assert _rel(whole, dense_reference(q, k, v, layout)) < 1e-10


def test_backend_none_on_cpu_uses_the_torch_path(gen, monkeypatch):
    def no_kernels():
        raise AssertionError("the Triton path must not run for CPU tensors by default")

    monkeypatch.setattr(attention, "_kernels", no_kernels)
    layout = attention_layout(**LAYOUTS["dilation2"])
    q, k, v = (x.detach() for x in _inputs(layout, torch.float32, gen))
    assert torch.equal(sparse_attention(q, k, v, layout), sparse_attention(q, k, v, layout, backend="torch"))


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(gen, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layout = attention_layout(**LAYOUTS["single-tile"])
    q, k, v = (x.detach() for x in _inputs(layout, torch.float32, gen))
    with pytest.raises(VolumeVLMError, match="TRITON_INTERPRET=1"):
        sparse_attention(q, k, v, layout, backend="triton")


def _rule(layout, batch_heads=12, head_dim=64, on_cuda=True):
    return attention.choose_backend(layout, batch_heads, head_dim, on_cuda)


def test_dispatch_dense_layouts_never_go_to_the_kernels():
    # Every valid pair attended: one dense SDPA call with no mask, on any device.
    assert _rule(attention_layout((8, 8, 8), window=None)) == "dense"
    assert _rule(attention_layout((28, 28, 20), window=None, num_global=4), batch_heads=384) == "dense"
    covering = attention_layout((8, 8, 8), window=1)  # 2 x 2 x 2 tiles, all neighbours
    assert covering.density == 1.0 and _rule(covering) == "dense" and _rule(covering, on_cuda=False) == "dense"


def test_dispatch_sparse_layouts():
    base_local = attention_layout((28, 28, 20), tile=4, window=1, num_global=4)  # `base` encoder, local
    assert base_local.executed_fraction < attention.SPARSE_MAX_EXECUTED_FRACTION
    assert _rule(base_local) == "triton"
    # CPU, or shapes the kernels do not take: the torch path.
    assert _rule(base_local, on_cuda=False) == "torch"
    assert _rule(base_local, head_dim=48) == "torch"
    assert _rule(attention_layout((12, 12, 12), tile=3, window=1)) == "torch"  # 27-token blocks
    # Executed work not clearly below dense: dense SDPA with the layout's bias.
    wide = attention_layout((16, 16, 16), window=2)  # density 0.67, bias 4096^2
    assert wide.executed_fraction > attention.SPARSE_MAX_EXECUTED_FRACTION and _rule(wide) == "dense"
    # ... unless the bias would be too large: the kernels then.
    too_big = attention_layout((20, 20, 12), window=2)  # 4,800 valid tokens
    assert too_big.executed_fraction > attention.SPARSE_MAX_EXECUTED_FRACTION
    assert too_big.num_valid**2 > attention.DENSE_BIAS_MAX_ELEMENTS and _rule(too_big) == "triton"
    # A small problem goes dense even when the layout is sparse; the same layout at the
    # training batch goes to the kernels.
    small = attention_layout((14, 14, 20), tile=4, window=1, dilation=2, num_global=4)  # `small`, dilated
    assert small.executed_fraction < attention.SPARSE_MAX_EXECUTED_FRACTION
    assert 4.0 * 1 * small.num_valid**2 * 64 < attention.SMALL_PROBLEM_DENSE_FLOPS
    assert _rule(small, batch_heads=1) == "dense"
    assert _rule(small, batch_heads=32 * 6) == "triton"


def test_dispatch_thresholds_are_the_named_constants(monkeypatch):
    layout = attention_layout((28, 28, 20), tile=4, window=1, num_global=4)
    monkeypatch.setattr(attention, "SPARSE_MAX_EXECUTED_FRACTION", layout.executed_fraction / 2)
    monkeypatch.setattr(attention, "DENSE_BIAS_MAX_ELEMENTS", layout.num_valid**2)
    assert _rule(layout) == "dense"
    monkeypatch.setattr(attention, "DENSE_BIAS_MAX_ELEMENTS", layout.num_valid**2 - 1)
    assert _rule(layout) == "triton"


def test_backend_none_follows_the_rule_on_cpu(gen):
    """backend=None really runs what the rule names: dense layouts take SDPA on the
    valid tokens (never the blocked path), sparse ones the blocked path."""
    for name, want in (("dense-padded", "dense"), ("dilation2", "torch")):
        layout = attention_layout(**LAYOUTS[name])
        q, k, v = (x.detach() for x in _inputs(layout, torch.float64, gen))
        assert attention.choose_backend(layout, 4, 16, False) == want
        got = sparse_attention(q, k, v, layout)
        assert torch.equal(got, sparse_attention(q, k, v, layout, backend=want))
        assert _rel(got, dense_reference(q, k, v, layout)) < 1e-10


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda q, k, v: (q[:, :, :-1], k, v), "shapes differ"),
        (lambda q, k, v: (q[:, :, :-1], k[:, :, :-1], v[:, :, :-1]), "seq_len"),
        (lambda q, k, v: (q, k.double(), v), "dtype"),
        (lambda q, k, v: (q[0], k[0], v[0]), "4-D"),
        (lambda q, k, v: (q.int(), k.int(), v.int()), "not supported"),
    ],
    ids=["shape", "seq-len", "dtype-mix", "rank", "int-dtype"],
)
def test_bad_inputs_raise_one_line_errors(change, problem, gen):
    layout = attention_layout(**LAYOUTS["single-tile"])
    q, k, v = (x.detach() for x in _inputs(layout, torch.float32, gen))
    with pytest.raises(InputError, match=problem):
        sparse_attention(*change(q, k, v), layout)
    with pytest.raises(InputError, match="backend"):
        sparse_attention(q, k, v, layout, backend="cuda")
    with pytest.raises(InputError, match="AttentionLayout"):
        sparse_attention(q, k, v, "not a layout")


_INTERPRETER_SCRIPT = r"""
import torch
from volumevlm.ops import attention, attention_layout, dense_reference, sparse_attention

def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()

def poison(x, valid):
    x = x.clone()
    pad = (~valid).nonzero().flatten()
    for j, value in enumerate((float("nan"), float("inf"), float("-inf"))):
        x[:, :, pad[j::3]] = value
    return x

for kw in [dict(grid=(5, 3, 6), tile=(2, 2, 4), window=1, num_global=3),
           dict(grid=(8, 4, 4), tile=(2, 2, 4), window=(1, 0, 0), num_global=17),
           dict(grid=(6, 5, 9), tile=(2, 2, 4), window=1, dilation=2, num_global=4)]:
    layout = attention_layout(**kw)
    gen = torch.Generator().manual_seed(7)
    base = [torch.randn(2, 2, layout.seq_len, 16, generator=gen) for _ in range(4)]
    # Poisoned padding (NaN, +-inf) in q, k, v and in the upstream gradient: the op
    # passes them to the kernels uncleaned, and nothing may leak into valid rows.
    q, k, v = (poison(x, layout.key_valid).requires_grad_() for x in base[:3])
    do = poison(base[3], layout.query_valid)
    saved = [x.detach().clone() for x in (q, k, v, do)]
    out = sparse_attention(q, k, v, layout, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), do)
    r64 = [x.double().requires_grad_() for x in base[:3]]
    ref = dense_reference(*r64, layout)
    want = torch.autograd.grad(ref, r64, base[3].double() * layout.query_valid[:, None])
    assert out.dtype == torch.float32 and bool((out[:, :, layout.is_padding] == 0).all())
    errors = [rel(out, ref)] + [rel(g, w) for g, w in zip(grads, want)]
    assert max(errors) < 1e-4, (kw, errors)
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert all(bool((g[:, :, layout.is_padding] == 0).all()) for g in grads)
    assert all(torch.allclose(a, b, rtol=0, atol=0, equal_nan=True) for a, b in zip((q, k, v, do), saved)), "inputs modified"

# The registered op with the Triton implementation: schema, fake tensors, autograd.
layout = attention_layout((4, 2, 8), tile=(2, 2, 4), window=0, num_global=3)
gen = torch.Generator().manual_seed(8)
q, k, v = (torch.randn(1, 1, layout.seq_len, 16, generator=gen).requires_grad_() for _ in range(3))
torch.library.opcheck(attention.block_sparse_attention_op, (q, k, v, layout.op_key, 0.25, "triton"))

# The Triton path under torch.compile(fullgraph=True): no graph break, eager's numbers.
def f(q, k, v):
    return sparse_attention(q, k, v, layout, backend="triton")
eager = f(q, k, v)
compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
g_eager = torch.autograd.grad(eager.sum(), (q, k, v))
g_compiled = torch.autograd.grad(compiled.sum(), (q, k, v))
assert torch.equal(eager, compiled) and all(torch.equal(a, b) for a, b in zip(g_eager, g_compiled))
print("ok")
"""


def test_triton_backend_autograd_in_the_interpreter():
    """The Triton autograd.Function wiring (forward + backward through volumevlm_kernels)
    against the reference, run in Triton's CPU interpreter in a fresh process (the
    interpreter flag must be set before triton is imported)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_non_contiguous_inputs(gen):
    layout = attention_layout(**LAYOUTS["globals5-padded"])
    # [B, N, H, D] storage viewed as [B, H, N, D], as a fused qkv projection produces.
    q, k, v = (torch.randn(2, layout.seq_len, 3, 16, generator=gen, dtype=torch.float64).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    for path in PATHS.values():
        assert _rel(path(q, k, v, layout, None), dense_reference(q, k, v, layout)) < 1e-10


def test_blocked_path_never_builds_an_n_by_n_score_matrix(gen, monkeypatch):
    layout = attention_layout((16, 16, 12), tile=4, window=1, num_global=3)
    sizes = []
    original = torch_path._masked_scores

    def recording(qs, kg, group, sl):
        s = original(qs, kg, group, sl)
        sizes.append(s.numel())
        return s

    monkeypatch.setattr(torch_path, "_masked_scores", recording)
    q, k, v = _inputs(layout, torch.float32, gen, B=1, H=2, D=16)
    torch_block_sparse(q, k, v, layout).sum().backward()
    N, T = layout.seq_len, layout.block_size
    one_global_block_row = 2 * T * N  # a global query block attends all N keys
    assert max(sizes) <= max(torch_path._CHUNK_ELEMENTS, one_global_block_row)
    assert max(sizes) < 2 * N * N / 8


def test_default_backend_choice_follows_what_the_kernels_take():
    """backend=None on CUDA uses the kernels only for shapes they take (checked here
    without a GPU: the rule itself)."""
    from volumevlm.ops.attention import _kernels_support

    cube = attention_layout((8, 8, 8), tile=(4, 4, 4))  # 64-token blocks
    odd = attention_layout((6, 6, 6), tile=(3, 3, 3))  # 27-token blocks
    assert _kernels_support(cube, 64) and _kernels_support(cube, 16) and _kernels_support(cube, 128)
    assert not _kernels_support(cube, 48) and not _kernels_support(cube, 256) and not _kernels_support(cube, 8)
    assert not _kernels_support(odd, 64)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_inference_skips_the_autograd_function_and_gives_the_same_output(name, gen, monkeypatch):
    """Without gradients the torch path is called directly (so TorchScript can trace it);
    the output must equal the autograd path's and the dense reference."""
    layout = attention_layout(**LAYOUTS[name])
    q, k, v = _inputs(layout, torch.float32, gen)
    with_grad = sparse_attention(q, k, v, layout, backend="torch")
    applied = []
    monkeypatch.setattr(attention._BlockSparse, "apply", lambda *a: applied.append(1) or None)
    with torch.no_grad():
        without_grad = sparse_attention(q, k, v, layout, backend="torch")
    assert not applied  # the autograd.Function was not used
    torch.testing.assert_close(without_grad, with_grad.detach(), rtol=0, atol=0)
    assert _rel(without_grad, dense_reference(q, k, v, layout).detach()) < 1e-5


# ------------------------------------------------------------ the call path's cost

_SYNCING = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")


class _HostReads:
    """Counts calls of the tensor methods that read a value to the host (a device sync
    on CUDA) while active: patched on torch.Tensor, so every caller is seen."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in _SYNCING:
            original = getattr(torch.Tensor, name)

            def counting(self_, *a, _name=name, _original=original, **k):
                self.calls.append(_name)
                return _original(self_, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counting)


def _fake_kernels(calls: list):
    """The launch functions of volumevlm_kernels with the kernels replaced by zeros:
    the op's Triton wrapper runs for real (plan, contiguity, autograd) without a GPU."""
    from types import SimpleNamespace

    import volumevlm_kernels as real

    def forward_prepared(q, k, v, plan, scale):
        calls.append("fwd")
        assert plan.key_valid_i8.dtype == torch.int8 and plan.fwd_order.dtype == torch.int32
        return torch.zeros_like(q), torch.zeros(q.shape[:3])

    def backward_prepared(do, q, k, v, o, lse, plan, scale):
        calls.append("bwd")
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    return SimpleNamespace(plan_from_block_lists=real.plan_from_block_lists,
                           forward_prepared=forward_prepared, backward_prepared=backward_prepared)


@pytest.mark.parametrize("backend", ["torch", "dense", "triton"])
def test_call_path_reads_nothing_to_the_host_and_builds_nothing_after_the_first_call(backend, gen, monkeypatch):
    """After a first (warm-up) call, forward and backward of the op make no .item() /
    bool() / .tolist() / .numpy() on any tensor (each is a device sync on CUDA) and the
    layout builds no new device data (lists, masks, indices, biases)."""
    layout = attention_layout((10, 7, 5), tile=(4, 4, 2), window=(1, 1, 0), num_global=5)
    assert layout.has_padding and layout.density < 1.0
    if backend == "triton":
        kernel_calls = []
        monkeypatch.setattr(attention, "_kernels", lambda: _fake_kernels(kernel_calls))
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # the op's CPU guard; the kernels are fakes
    q, k, v = _inputs(layout, torch.float32, gen)
    do = torch.randn(q.shape, generator=gen)

    def step():
        out = sparse_attention(q, k, v, layout, backend=backend)
        out.backward(do)
        with torch.no_grad():
            sparse_attention(q, k, v, layout, backend=backend)

    step()  # first call: builds what the layout caches
    builds = layout.device_builds
    reads = _HostReads(monkeypatch)
    step()
    step()
    assert reads.calls == [], f"host reads in the call path: {reads.calls}"
    assert layout.device_builds == builds, "the call path built new device data after the first call"
    if backend == "triton":
        assert kernel_calls.count("fwd") == 6 and kernel_calls.count("bwd") == 3


def test_host_read_counter_sees_a_sync(monkeypatch):
    """The counter above can fail: the old dense branch's bool(valid.all()) is seen."""
    reads = _HostReads(monkeypatch)
    valid = torch.ones(4, dtype=torch.bool)
    if bool(valid.all()):
        valid.sum().item()
    assert reads.calls == ["__bool__", "item"]


def test_triton_path_passes_inputs_uncleaned(gen, monkeypatch):
    """The kernels mask padding themselves: the op hands them the caller's tensors (no
    where-copies), and never modifies them."""
    layout = attention_layout(**LAYOUTS["globals5-padded"])
    seen = []
    fake = _fake_kernels([])
    real_forward = fake.forward_prepared

    def recording(q, k, v, plan, scale):
        seen.append((q.data_ptr(), k.data_ptr(), v.data_ptr()))
        return real_forward(q, k, v, plan, scale)

    fake.forward_prepared = recording
    monkeypatch.setattr(attention, "_kernels", lambda: fake)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = (x.detach() for x in _inputs(layout, torch.float32, gen))
    q[:, :, layout.is_padding] = float("nan")
    sparse_attention(q, k, v, layout, backend="triton")
    assert seen == [(q.data_ptr(), k.data_ptr(), v.data_ptr())]


def test_layout_caches_its_device_data_once():
    layout = attention_layout((18, 16, 15), tile=4, window=1, num_global=2)
    before = layout.device_builds
    lists = layout.block_lists("cpu")
    assert layout.block_lists("cpu") is lists and layout.device_builds == before + 1
    assert lists.key_valid_i8.dtype == torch.int8 and torch.equal(lists.key_valid_i8.bool(), layout.key_valid)
    # Longest-first program order: the global block (a list of every block) goes first,
    # every block exactly once.
    assert lists.fwd_long == 1 and lists.bwd_long == 1 and int(lists.fwd_order[0]) == 0
    assert sorted(lists.fwd_order.tolist()) == list(range(layout.num_blocks))
    assert sorted(lists.bwd_order.tolist()) == list(range(layout.num_blocks))
    bias = layout.dense_bias(torch.device("cpu"), torch.float32)
    assert layout.dense_bias(torch.device("cpu"), torch.float32) is bias
    idx = layout.valid_index
    assert bias.shape == (layout.num_valid, layout.num_valid)
    assert torch.equal(bias == 0, layout.dense_mask()[idx][:, idx])


# ---------------------------------------------------- torch.compile / torch.library


def test_registered_op_passes_opcheck(gen):
    """The torch.library registration (schema, fake tensors, autograd formula) of the
    op's torch implementation; the Triton one is opchecked in the interpreter below."""
    layout = attention_layout(**LAYOUTS["globals5-padded"])
    q, k, v = _inputs(layout, torch.float64, gen, B=1, H=2, D=8)
    torch.library.opcheck(attention.block_sparse_attention_op, (q, k, v, layout.op_key, 0.35, "torch"))


def test_compiled_model_has_no_graph_breaks_and_matches_eager(gen):
    """fullgraph=True fails on any graph break; forward and gradients equal eager."""
    import torch._dynamo

    torch._dynamo.reset()
    layout = attention_layout(**LAYOUTS["dilation2"])
    dense = attention_layout(**LAYOUTS["dense-padded"])
    proj = torch.nn.Linear(16, 16).double()

    def f(q, k, v):
        o = sparse_attention(q, k, v, layout, backend="torch")
        return proj(o) + sparse_attention(q[:, :, : dense.seq_len], k[:, :, : dense.seq_len],
                                          v[:, :, : dense.seq_len], dense).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    q, k, v = _inputs(layout, torch.float64, gen)
    got = compiled(q, k, v)
    g_got = torch.autograd.grad(got.sum(), (q, k, v))
    want = f(q, k, v)
    g_want = torch.autograd.grad(want.sum(), (q, k, v))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "dense", "triton"])
def test_caches_built_under_inference_mode_serve_later_training_calls(backend, gen, monkeypatch):
    """A layout first used under torch.inference_mode (an embedding call) must not cache
    inference tensors: a later call that records gradients reuses the caches."""
    grid = (7, 6, 5 + ["torch", "dense", "triton"].index(backend))  # a layout no other test uses
    with torch.inference_mode():  # the layout itself is first built here too
        layout = attention_layout(grid, tile=(4, 4, 2), window=(1, 1, 0), num_global=3)
    assert layout.device_builds == 0
    if backend == "triton":
        monkeypatch.setattr(attention, "_kernels", lambda: _fake_kernels([]))
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = _inputs(layout, torch.float32, gen)
    with torch.inference_mode():
        sparse_attention(q.detach(), k.detach(), v.detach(), layout, backend=backend)
    assert layout.device_builds > 0
    out = sparse_attention(q, k, v, layout, backend=backend)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(g.shape == q.shape for g in grads)
