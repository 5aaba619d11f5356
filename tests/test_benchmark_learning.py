"""benchmarks/learning.py, the supervised yardstick: its AUROC against a hand computation,
the prevalence-started output bias and the masked loss, the demo's preprocessing as its
input, the held-out split selection, the comparison file's checks, and a tiny end-to-end
run that writes the results JSON.

All data is synthetic (hand-made arrays and a tiny ``volumevlm synth`` cohort), NOT
clinical data.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain_helpers import make_cohort
from volumevlm.errors import InputError

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "learning.py"
WINDOWS = [[-1000.0, 1000.0], [-160.0, 240.0], [150.0, 1000.0]]
# The tiny cohort is 32x32x16 voxels: the demo's spacing and grid, coarsened for CI.
SMALL_INPUT = ["--override", "data.preprocess.target_spacing=[12.0,12.0,20.0]",
               "--override", "data.preprocess.spatial_size=[32,32,16]"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("volumevlm_learning_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------- scoring


def hand_auroc(scores, targets):
    """Pairs (positive, negative) where the positive scores higher, ties one half."""
    pos = [s for s, t in zip(scores, targets) if t == 1]
    neg = [s for s, t in zip(scores, targets) if t == 0]
    if not pos or not neg:
        return None
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_of_the_benchmark_equals_a_hand_computation(bench):
    """Five cases, three findings: one with a tie and an unlabelled case, one perfectly
    inverted, one with a single class (not scored, None, left out of the macro mean)."""
    scores = np.array([[0.9, 0.1, 0.3], [0.4, 0.8, 0.2], [0.4, 0.7, 0.9], [0.1, 0.2, 0.5], [0.6, 0.9, 0.1]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 1, 0], [-1, 1, 0]], dtype=float)
    names = ["a", "b", "c"]
    out = bench.score(scores, targets, names)
    # a: positives 0.9, 0.4 against negatives 0.4, 0.1 (case 5 unlabelled): 1 + 1 + 0.5 + 1 = 3.5 of 4.
    assert out["per_finding"]["a"] == pytest.approx(3.5 / 4) == pytest.approx(hand_auroc(scores[:4, 0], targets[:4, 0]))
    # b: the one negative (0.1) is below every positive: 1.0.
    assert out["per_finding"]["b"] == pytest.approx(hand_auroc(scores[:, 1], targets[:, 1])) == pytest.approx(1.0)
    assert out["per_finding"]["c"] is None
    assert out["findings_scored"] == 2 and out["findings"] == 3
    assert out["macro_auroc"] == pytest.approx((3.5 / 4 + 1.0) / 2)
    low, high = out["macro_auroc_ci95"]
    assert 0.0 <= low <= high <= 1.0


def test_prevalence_and_the_output_bias_that_starts_at_it(bench):
    """Prevalence over labelled entries only; sigmoid(bias) is that prevalence, and a
    finding with no positive gets a finite bias half a case above 0."""
    targets = np.array([[1, 0, 0], [0, 1, 0], [-1, 1, 0], [1, 1, 0]], dtype=float)
    np.testing.assert_allclose(bench.train_prevalence(targets), [2 / 3, 3 / 4, 0.0])
    bias = bench.prevalence_bias(targets)
    assert torch.isfinite(bias).all()
    np.testing.assert_allclose(torch.sigmoid(bias).numpy(), [2 / 3, 3 / 4, 0.5 / 5], rtol=1e-6)
    # The bias sits in the network's output layer: with its weights zeroed every case
    # gets exactly the prevalence.
    model = bench.FindingsClassifier("resnet10", 3, WINDOWS)
    with torch.no_grad():
        model.head.bias.copy_(bias)
        model.head.weight.zero_()
    model.eval()
    probabilities = torch.sigmoid(model(torch.rand(2, 1, 16, 16, 8)))
    np.testing.assert_allclose(probabilities.detach().numpy(), np.tile([2 / 3, 3 / 4, 0.1], (2, 1)), rtol=1e-5)
    assert model.windows(torch.full((1, 1, 1, 1, 1), 0.5)).shape[1] == 3  # the encoder's HU windows


def test_masked_bce_leaves_unlabelled_entries_out(bench):
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    targets = torch.tensor([[1.0, -1.0], [0.0, 1.0]])
    by_hand = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(0.5)) + math.log1p(math.exp(-3.0))) / 3
    assert float(bench.masked_bce(logits, targets)) == pytest.approx(by_hand, rel=1e-6)


def test_the_schedule_warms_up_then_decays_over_the_budget(bench):
    assert bench.lr_factor(0, 0.0, 4) == pytest.approx(0.25)
    assert bench.lr_factor(3, 0.0, 4) == pytest.approx(1.0)
    assert bench.lr_factor(10, 0.5, 4) == pytest.approx(0.5)
    assert bench.lr_factor(10, 1.0, 4) == pytest.approx(0.0)


def test_training_stops_at_the_budget_or_the_step_limit(bench):
    """The loop runs whole steps: the first step that crosses a tiny budget is the last;
    a step limit is exact; epochs restart when the loader is exhausted."""
    torch.manual_seed(0)
    batches = [{"image": torch.rand(2, 1, 4, 4, 4), "findings": [{"a": 1, "b": 0}, {"a": 0}]} for _ in range(3)]
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    common = dict(lr=1e-2, weight_decay=0.0, warmup_steps=1, device=torch.device("cpu"))
    by_budget = bench.train_classifier(net, batches, ["a", "b"], budget_s=1e-9, max_steps=None, **common)
    assert by_budget["steps"] == 1 and by_budget["stopped_by"] == "budget"
    by_steps = bench.train_classifier(net, batches, ["a", "b"], budget_s=None, max_steps=7, **common)
    assert by_steps["steps"] == 7 and by_steps["stopped_by"] == "max_steps" and by_steps["epochs_started"] == 3
    assert by_steps["s_per_step"] > 0 and len(by_steps["loss_every_10_steps"]) == 1


# ---------------------------------------------------------------------- input and splits


def test_the_input_is_the_demo_experiments_preprocessing(bench):
    spec = bench.input_from_experiment("demo")
    assert spec["preprocess"]["target_spacing"] == [4.0, 4.0, 6.0]
    assert spec["preprocess"]["hu_window"] == [-1000.0, 1000.0]
    assert spec["preprocess"]["spatial_size"] == [96, 96, 48]
    assert spec["input_windows"] == WINDOWS and spec["batch_size"] == 16


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("learnbench") / "cohort")


def _manifest(cohort):
    return [json.loads(line) for line in (cohort / "manifest.jsonl").read_text().splitlines() if line.strip()]


def _metrics_json(path: Path, split: str, n_cases: int, names) -> Path:
    """An evaluate-shaped metrics.json (figures made up here: the test checks they are
    carried into the table and JSON unchanged)."""
    per = {name: 0.5 + 0.01 * i for i, name in enumerate(names)}
    metrics = {
        "split": split, "n_cases": n_cases, "checkpoint": "CKPT", "date": "2026-12-06T00:00:00+00:00",
        "command": "volumevlm evaluate ...",
        "zero_shot": {"macro_auroc": 0.61, "macro_auroc_ci95": [0.55, 0.67], "per_finding": per, "findings_scored": 2},
        "linear_probe": {"macro_auroc": 0.66, "macro_auroc_ci95": [0.6, 0.7], "per_finding": per, "findings_scored": 2},
        "baseline": {"voxel_probe": {"skipped": "why not"}},
    }
    path.write_text(json.dumps(metrics))
    return path


def test_tiny_end_to_end_run_writes_the_results_json(bench, cohort, tmp_path):
    rows = _manifest(cohort)
    held_out = [r for r in rows if r["split"] in ("val", "test")]
    train = [r for r in rows if r["split"] == "train"]
    names = list(train[0]["findings"])
    compare = _metrics_json(tmp_path / "metrics.json", "test,val", len(held_out), names)
    argv = ["--data", str(cohort), "--max-steps", "2", "--batch-size", "4", "--eval-batch-size", "8",
            "--threads", "1", "--no-progress", "--compare", str(compare), "--out", str(tmp_path / "results"),
            "--tag", "tiny", *SMALL_INPUT]
    results = bench.main(argv)
    files = sorted((tmp_path / "results").glob("learning-cpu-*-tiny.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    assert saved == json.loads(json.dumps(results))
    for key in ("device", "versions", "date", "command", "budget", "training", "supervised", "compare", "input"):
        assert key in saved
    assert saved["versions"]["torch"] == torch.__version__ and saved["versions"]["monai"]
    assert saved["device"]["type"] == "cpu" and saved["command"] == shlex.join(["python", "benchmarks/learning.py", *argv])
    assert saved["training"]["steps"] == 2 and saved["training"]["stopped_by"] == "max_steps"
    assert saved["training"]["s_per_step"] > 0 and saved["budget"]["max_steps"] == 2
    # Trained on the train split, scored on val + test, in manifest order.
    assert saved["data"]["train_cases"] == len(train) and saved["data"]["eval_cases"] == len(held_out)
    assert saved["findings"] == names and set(saved["supervised"]["per_finding"]) == set(names)
    for name in names:
        labels = [r["findings"][name] for r in train]
        assert saved["prevalence"][name] == pytest.approx(sum(labels) / len(labels))
    scored = [v for v in saved["supervised"]["per_finding"].values() if v is not None]
    assert len(scored) == saved["supervised"]["findings_scored"] > 0 and all(0.0 <= v <= 1.0 for v in scored)
    assert saved["supervised"]["macro_auroc"] == pytest.approx(float(np.mean(scored)))
    assert saved["input"]["preprocess"]["spatial_size"] == [32, 32, 16] and saved["input"]["input_windows"] == WINDOWS
    assert saved["compare"]["zero_shot"]["macro_auroc"] == 0.61
    assert saved["compare"]["linear_probe"]["per_finding"][names[1]] == pytest.approx(0.51)
    assert saved["compare"]["baseline.voxel_probe"] == {"skipped": "why not"}
    assert saved["data"]["synthetic"] is True and "NOT clinical" in saved["note"]


def test_held_out_splits_and_the_comparison_must_match(bench, cohort, tmp_path):
    """The training split is never scored; a metrics.json of other splits or cases is
    refused with one line naming it."""
    with pytest.raises(SystemExit, match="must not include 'train'"):
        bench.main(["--data", str(cohort), "--splits", "val,train", "--max-steps", "1", "--out", str(tmp_path)])
    other = _metrics_json(tmp_path / "metrics.json", "test", 3, ["a"])
    with pytest.raises(InputError, match="metrics.json.*not the benchmark's 'val,test'"):
        bench.compared_figures(other, "val,test", 4)
    same = bench.compared_figures(other, "test", 3)
    assert same["zero_shot"]["macro_auroc"] == 0.61


def test_the_budget_is_the_demo_pretrainings_time_unless_told(bench, tmp_path):
    """--budget-s wins; else the elapsed_s of --budget-from, or of the pretraining beside
    the compared checkpoint (a demo output folder); else steps only, else 500 s. A file
    without elapsed_s is a one-line error naming it."""
    demo = tmp_path / "demo"
    (demo / "pretrain").mkdir(parents=True)
    (demo / "pretrain" / "metrics.json").write_text(json.dumps({"elapsed_s": 497.0, "global_step": 300}))
    compare = {"checkpoint": str(demo / "model")}

    def budget(*argv, compare=None):
        return bench.resolve_budget(bench.parse_args(["--data", "x", *argv]), compare)

    assert budget("--budget-s", "60", compare=compare) == (60.0, "--budget-s")
    assert budget("--budget-from", str(demo / "pretrain" / "metrics.json"))[0] == 497.0
    assert budget(compare=compare) == (497.0, f"elapsed_s of {demo / 'pretrain' / 'metrics.json'}")
    assert budget("--max-steps", "5") == (None, "--max-steps only")
    assert budget() == (500.0, "default")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InputError, match="bad.json: no pretraining elapsed_s"):
        budget("--budget-from", str(tmp_path / "bad.json"))
