"""`volumevlm demo`, shrunk: the real stages (synthesis, Hydra-composed pretraining with
experiment=demo, export, `volumevlm evaluate`) on a handful of synthetic cases (NOT
clinical data). The figures of such a run mean nothing; what is checked is that every
stage leaves what the README promises, and that a rerun reuses the cohort."""

from __future__ import annotations

import json

import volumevlm
from volumevlm.cli import main


def test_demo_leaves_a_cohort_a_loadable_model_and_an_evaluation_with_intervals(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--n", "16", "--seed", "3", "--max-steps", "2", "--no-heads"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "not clinical data" in printed and "zero-shot AUROC" in printed and "[3/3]" in printed
    # the yardsticks are in the table that ends the demo, beside zero-shot
    table = printed[printed.index("zero-shot AUROC"):]
    assert "linear probe AUROC" in table and "voxel probe AUROC" in table
    assert "text->section precision@10" in table  # free-phrased queries, judged by the labeler

    manifest = [json.loads(line) for line in (out / "cohort" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 16 and all(row["synthetic"] for row in manifest)
    held_out = [row for row in manifest if row["split"] in ("val", "test")]

    model = volumevlm.load(out / "model")
    assert model.encoder_config.input_windows is not None  # experiment=demo's recipe reached the model
    assert json.loads((out / "model" / "config.json").read_text())["prompt_set"] == "synthetic"

    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["n_cases"] == len(held_out) and "not clinical" in metrics["synthetic"]
    zero_shot = metrics["zero_shot"]
    assert zero_shot["findings_scored"] > 0  # 4 held-out cases still hold both classes of some finding
    low, high = zero_shot["macro_auroc_ci95"]
    assert low <= zero_shot["macro_auroc"] <= high
    for probe in (metrics["linear_probe"], metrics["baseline"]["voxel_probe"]):
        assert probe["train_cases"] == sum(row["split"] == "train" for row in manifest)
        assert set(probe["per_finding"]) == set(zero_shot["per_finding"])

    # A rerun with the same --n and --seed reuses the cohort (and only re-validates).
    assert main(args + ["--no-eval"]) == 0
    assert "reusing the synthetic cohort" in capsys.readouterr().out
