"""benchmarks/attention.py without a GPU: the model-layout rows it would time, the
FlexAttention masks it compares against (same attended pairs as our layout), and its
comparison arithmetic (anchored on the fastest dense kernel of the run)."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

from volumevlm.ops import attention_layout, dense_reference

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "attention.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("volumevlm_attention_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_rows_are_the_encoders_layouts(bench, capsys):
    assert bench.main(["--dry-run", "--suite", "models"]) == 0
    assert "small dilated" in capsys.readouterr().out
    cases = {c["case"]: bench.describe_case(c) for c in bench.gpu_cases("models", None, {"base": 4}, 12, 64, 1)}
    assert sorted(cases) == ["base dilated", "base local", "small dilated", "small local"]
    small, base = cases["small local"], cases["base local"]
    # `small`: 14x14x20 tokens + 4 registers, padded to 4x4x4 tiles; B=32 with 6 heads of 64.
    assert small["grid"] == [14, 14, 20] and small["registers"] == 4 and small["valid_tokens"] == 14 * 14 * 20 + 4
    assert small["tokens"] == 64 * (1 + 4 * 4 * 5) and (small["batch"], small["heads"], small["dim"]) == (32, 6, 64)
    assert cases["small dilated"]["dilation"] == 2 and cases["small dilated"]["density"] < small["density"]
    # `base`: 28x28x20 + 4 registers, 12 heads; the batch override applies.
    assert base["valid_tokens"] == 28 * 28 * 20 + 4 and (base["batch"], base["heads"]) == (4, 12)
    assert all(c["dispatch"] == "triton" for c in cases.values())


def test_grid_rows_and_flex_options(bench):
    cases = bench.gpu_cases("grids", [(14, 14, 10)], {}, 12, 64, 1)
    assert [c["case"] for c in cases] == ["14x14x10"] and cases[0]["layout"].num_global == 0
    assert len(bench.gpu_cases("all", [(14, 14, 10)], {}, 12, 64, 1)) == len(bench.MODEL_CASES) + 1
    with pytest.raises(SystemExit):
        bench.main(["--dry-run", "--flex", "kv32"])


@pytest.mark.parametrize("kind", ["kv64", "create128"])
def test_flex_masks_attend_exactly_the_layouts_pairs(bench, kind):
    """FlexAttention (eager, CPU) with either mask equals the float64 dense reference:
    the comparison rows run the same attention as ours."""
    from torch.nn.attention.flex_attention import flex_attention

    layout = attention_layout((6, 5, 9), tile=(2, 2, 4), window=1, dilation=2, num_global=4)
    mask = bench.flex_block_mask(layout, "cpu") if kind == "kv64" else bench._flex_create_block_mask(layout, "cpu")
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 16, generator=gen) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex warns that eager mode is unfused
        out = flex_attention(q, k, v, block_mask=mask)
    valid = layout.query_valid
    ref = dense_reference(q, k, v, layout)
    assert (out[:, :, valid].double() - ref[:, :, valid]).abs().max() < 1e-5


def test_comparison_is_anchored_on_the_fastest_dense_kernel(bench):
    def m(kernel, wall, **extra):
        return {"kernel_ms": kernel, "wall_ms": wall, **extra}

    record = {"dispatch": "triton", "methods": {
        "ours (triton)": {"fwd": m(1.0, 2.0, useful_tflops=300.0), "fwd+bwd": m(3.0, 4.0, useful_tflops=250.0)},
        "ours (dense+bias)": {"fwd": m(5.0, 5.0), "fwd+bwd": m(9.0, 9.0)},
        "sdpa flash (valid tokens, no mask)": {"fwd": m(8.0, 8.0, executed_tflops=500.0), "fwd+bwd": m(20.0, 20.0, executed_tflops=400.0)},
        "sdpa cudnn (valid tokens, no mask)": {"fwd": m(6.0, 6.5, executed_tflops=600.0), "fwd+bwd": m(24.0, 24.0, executed_tflops=350.0)},
        "flex x": {"fwd": m(1.5, 1.6), "fwd+bwd": {"error": "did not compile"}},
    }}
    bench._compare(record)
    ours = record["methods"]["ours (triton)"]
    assert ours["fwd"]["speedup_vs_fastest_dense_kernel"] == 6.0  # cuDNN is the faster dense forward
    assert ours["fwd+bwd"]["speedup_vs_fastest_dense_kernel"] == 20.0 / 3.0  # flash the faster backward
    assert ours["fwd"]["speedup_vs_fastest_dense_wall"] == 3.25
    assert ours["fwd"]["pct_of_fastest_dense_throughput"] == 50.0
    assert ours["fwd"]["speedup_vs_best_flex_kernel"] == 1.5 and "speedup_vs_best_flex_kernel" not in ours["fwd+bwd"]
    assert record["dispatch_check"]["fastest"] == "ours (triton)"
