"""``volumevlm evaluate`` (volumevlm.eval.evaluate): every section, key and plot, figures
checked against references computed here by hand, and the "skipped" sections of a
checkpoint without heads.

One module-scoped set-up: a 36-case synthetic cohort (NOT clinical data, 32x32x16), a
fast_dev_run pretraining on it, then the real ``task=segment`` (2 steps, final
validation on) and ``task=report`` (2 steps) runs writing their heads into ONE
checkpoint, plus a second segmentation run at half the labels for the label-efficiency
curve. The weights are barely trained: the checks are about the protocols, not quality.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import volumevlm
from pretrain_helpers import TINY_REPORT_HEAD, shrunk_config
from volumevlm.cli import main as cli_main
from volumevlm.data.manifest import read_manifest
from volumevlm.data.synthetic.codes import FINDING_CODES
from volumevlm.data.transforms import preprocess
from volumevlm.eval.evaluate import METRICS_NAME, evaluate
from volumevlm.eval.probes import probe_section, voxel_features
from volumevlm.io import read_volume
from volumevlm.metrics import dice_per_label, macro_auroc, macro_auroc_interval, per_finding_auroc, pool_recall, recall_at_k
from volumevlm.metrics.report import report_metrics
from volumevlm.models.zero_shot import zero_shot_from_sections
from volumevlm.text.labeler import label_findings
from volumevlm.text.phecodes import icd10_to_phecodes
from volumevlm.text.prompts import load_prompt_set, zero_shot_probabilities
from volumevlm.text.sections import split_report

COHORT_CASES = 36  # more than the smallest Merlin pool (32) when every split is evaluated
SPLIT = "train,val,test"
REQUIRED = [
    ("zero_shot", "macro_auroc"), ("zero_shot", "per_finding"), ("phenotypes", "macro_auroc"),
    ("retrieval", "r1_pool32"), ("retrieval", "r5_pool32"), ("segmentation", "mean_dice"),
    ("segmentation", "per_label"), ("report", "clinical_f1"), ("report", "bleu4"), ("report", "rouge_l"),
    ("report", "distinct_ratio"), ("text_retrieval", "precision_at_10"), ("text_retrieval", "negated_positive_rate_at_10"),
]
PLOTS = ("roc_curves.png", "retrieval_recall.png", "dice_boxplot.png", "segmentation_overlay.png", "label_efficiency.png")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from volumevlm.data.synthetic import generate_cohort
    from volumevlm.train.cli import run_task
    from volumevlm.train.train import train

    root = tmp_path_factory.mktemp("evaluate")
    cohort = root / "cohort"
    generate_cohort(cohort, n=COHORT_CASES, seed=1, shape=(32, 32, 16), workers=1, progress=False)
    _, objects = train(shrunk_config(cohort, root / "pre", "experiment=demo", "debug=fdr"))
    plain = Path(objects["model_dir"])
    full = root / "full"
    seg_common = ["task=segment", "experiment=segment_demo", "segmentation.feature_size=4",
                  "segmentation.crop_size=[16,16,16]", "segmentation.hd95=false"]
    run_task(shrunk_config(cohort, root / "seg", *seg_common, f"init_from={plain}", f"model_dir={full}",
                           "segmentation.max_steps=2"))
    run_task(shrunk_config(cohort, root / "seg_half", *seg_common, f"init_from={plain}",
                           f"model_dir={root / 'seg_half_model'}", "segmentation.max_steps=1",
                           "segmentation.label_fraction=0.5"))
    run_task(shrunk_config(cohort, root / "rep", "experiment=report_demo", f"init_from={full}", f"model_dir={full}",
                           "trainer.max_steps=2", "data.batch_size=4", "report.final_generate_cases=0",
                           *(f"report.head.{k}={v}" for k, v in TINY_REPORT_HEAD.items())))
    return {"root": root, "cohort": cohort, "plain": plain, "full": full,
            "seg_runs": [root / "seg", root / "seg_half"]}


@pytest.fixture(scope="module")
def evaluated(runs):
    out = runs["root"] / "eval"
    metrics = evaluate(runs["full"], runs["cohort"], out, split=SPLIT, batch_size=8,
                       label_efficiency=runs["seg_runs"], progress=False)
    return metrics, out


@pytest.fixture(scope="module")
def by_hand(runs):
    """Embeddings, zero-shot scores and masks of every case, computed case by case here."""
    model = volumevlm.load(runs["full"])
    rows = [row for row in read_manifest(runs["cohort"] / "manifest.jsonl").rows]
    with torch.no_grad():
        images = torch.stack([preprocess(row["image"], model.preprocess).as_tensor() for row in rows])
        image_emb = model.encode_image(images)
        text_emb = model.encode_text([row["report"] for row in rows])
        logits = model.phenotype_logits(images)
    return {"model": model, "rows": rows, "image_emb": image_emb, "text_emb": text_emb, "logits": logits}


def probe_splits(cohort: Path):
    """(train rows, val + test rows, the findings the held-out rows label): what the probes
    are fitted on and scored on."""
    rows = read_manifest(cohort / "manifest.jsonl").rows
    train = [row for row in rows if row["split"] == "train"]
    held_out = [row for row in rows if row["split"] in ("val", "test")]
    return train, held_out, list(dict.fromkeys(k for row in held_out for k in row["findings"]))


def test_metrics_json_has_every_key_and_plot(evaluated, runs):
    metrics, out = evaluated
    on_disk = json.loads((out / METRICS_NAME).read_text())
    assert on_disk == metrics
    for section, key in REQUIRED:
        assert key in metrics[section], (section, key)
        assert metrics[section][key] is not None, (section, key)
    for key in ("device", "versions", "date", "command", "checkpoint", "split", "n_cases"):
        assert metrics[key], key
    assert metrics["n_cases"] == COHORT_CASES and metrics["split"] == SPLIT
    assert metrics["synthetic"] == "synthetic data: not clinical" and "not clinical" in metrics["note"]
    assert metrics["checkpoint"] == str(runs["full"].resolve())
    assert metrics["heads"] == ["anatomy", "report", "segmentation"]
    assert "torch" in metrics["versions"] and metrics["device"]["type"] == "cpu"
    for name in PLOTS:
        assert (out / name).is_file() and (out / name).read_bytes()[:4] == b"\x89PNG", name
    samples = [json.loads(line) for line in (out / "report_samples.jsonl").read_text().splitlines()]
    assert len(samples) == COHORT_CASES and all(s["generated"].startswith("FINDINGS:") for s in samples)
    # report_demo's head is conditioned on findings: also written from the true reports' findings.
    assert 0.0 <= metrics["report"]["from_true_findings"]["distinct_ratio"] <= 1.0
    assert all(s["generated_from_true_findings"].startswith("FINDINGS:") for s in samples)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    # Evaluated on the split the probes are fitted on: they say so rather than score it.
    assert "train" in metrics["linear_probe"]["skipped"] and "train" in metrics["baseline"]["voxel_probe"]["skipped"]
    assert "train" in metrics["organ_probe"]["skipped"]
    # report_demo fits the anatomy head: zero-shot is also read in the organ-system embeddings.
    assert metrics["zero_shot_anatomy"]["findings_scored"] == metrics["zero_shot"]["findings_scored"]


def test_zero_shot_phenotype_and_retrieval_figures_match_a_hand_computation(evaluated, by_hand):
    metrics, _ = evaluated
    model, rows = by_hand["model"], by_hand["rows"]
    prompt_set = load_prompt_set("synthetic")
    keys = [k for k in prompt_set.keys if any(k in (row.get("findings") or {}) for row in rows)]
    targets = np.array([[row["findings"].get(k, -1) for k in keys] for row in rows], dtype=float)
    with torch.no_grad():
        scores = zero_shot_probabilities(by_hand["image_emb"], model.encode_text, prompt_set, keys,
                                         logit_scale=model.scale()).numpy()
    macro, used = macro_auroc(scores, targets)
    assert metrics["zero_shot"]["macro_auroc"] == pytest.approx(macro, abs=1e-6)
    assert metrics["zero_shot"]["findings_scored"] == used
    assert metrics["zero_shot"]["macro_auroc_ci95"] == pytest.approx(macro_auroc_interval(scores, targets))
    expected = per_finding_auroc(scores, targets, keys)
    for key, value in expected.items():
        assert metrics["zero_shot"]["per_finding"][key] == (pytest.approx(value, abs=1e-6) if value is not None else None)

    vocab = model.phecode_vocab
    coded = [i for i, row in enumerate(rows) if row.get("phecodes") or row.get("icd10")]
    assert 0 < len(coded)
    codes = np.array([vocab.encode(rows[i].get("phecodes") or []) for i in coded])
    macro, used = macro_auroc(torch.sigmoid(by_hand["logits"][coded]).numpy(), codes)
    assert metrics["phenotypes"]["macro_auroc"] == pytest.approx(macro, abs=1e-6)
    assert metrics["phenotypes"]["codes_scored"] == used
    low, high = metrics["phenotypes"]["macro_auroc_ci95"]
    assert low <= metrics["phenotypes"]["macro_auroc"] <= high
    # The image-visible subset: the phecodes of the synthetic findings' ICD-10 codes, by hand.
    visible = set(icd10_to_phecodes([c for choices, _ in FINDING_CODES.values() for c in choices]))
    columns = [j for j, code in enumerate(vocab.codes) if code in visible]
    assert columns and len(columns) < len(vocab.codes)  # hypertension & co. are left out
    assert metrics["phenotypes"]["image_visible_codes"] == [vocab.codes[j] for j in columns]
    macro, used = macro_auroc(torch.sigmoid(by_hand["logits"][coded][:, columns]).numpy(), codes[:, columns])
    assert metrics["phenotypes"]["macro_auroc_image_visible"] == pytest.approx(macro, abs=1e-6)
    assert metrics["phenotypes"]["image_visible_codes_scored"] == used > 0

    image, text = by_hand["image_emb"].numpy(), by_hand["text_emb"].numpy()
    pools = pool_recall(image, text, (32, 64, 128), (1, 5, 10), n_pools=100, seed=0)
    retrieval = metrics["retrieval"]
    assert retrieval["r1_pool32"] == pytest.approx(pools["r1_pool32"], abs=1e-6)
    assert retrieval["r5_pool32"] == pytest.approx(pools["r5_pool32"], abs=1e-6)
    assert retrieval["r1_pool64"] is None  # 36 cases cannot fill a pool of 64
    t2i = pool_recall(image, text, (32,), (1, 5), n_pools=100, seed=0, direction="t2i")
    assert retrieval["report_to_image"]["r5_pool32"] == pytest.approx(t2i["r5_pool32"], abs=1e-6)
    full = recall_at_k(image @ text.T, (1, 5, 10))
    assert retrieval["full_set"]["image_to_report"] == pytest.approx(full, abs=1e-6)
    assert retrieval["chance"]["r1_pool32"] == pytest.approx(1 / 32)


def test_segmentation_dice_is_measured_in_each_cases_own_geometry(evaluated, by_hand):
    metrics, _ = evaluated
    model = by_hand["model"]
    names = {k: v for k, v in model.head("segmentation").label_names.items() if k}
    per_case: dict[str, list[float]] = {name: [] for name in names.values()}
    for row in by_hand["rows"]:
        mask = model.segment(row["image"])
        truth = read_volume(row["label"], kind="label")
        assert mask.shape == truth.shape
        for name, value in dice_per_label(np.asarray(mask.dataobj), truth.array, names).items():
            if value is not None:
                per_case[name].append(value)
    seg = metrics["segmentation"]
    assert set(seg["per_label"]) == {n for n, v in per_case.items() if v}
    for name, entry in seg["per_label"].items():
        assert entry["dice"] == pytest.approx(float(np.mean(per_case[name])), abs=1e-9), name
        assert entry["hd95_mm"] is None or entry["hd95_mm"] >= 0
    assert seg["mean_dice"] == pytest.approx(np.mean([e["dice"] for e in seg["per_label"].values()]), abs=1e-9)
    assert seg["cases"] == COHORT_CASES


def test_report_and_label_efficiency_sections(evaluated, runs):
    metrics, out = evaluated
    samples = [json.loads(line) for line in (out / "report_samples.jsonl").read_text().splitlines()]
    from volumevlm.text.labeler import scored_findings as _scored_findings

    model = volumevlm.load(runs["full"])
    expected = report_metrics([s["generated"] for s in samples], [s["reference"] for s in samples],
                              findings=_scored_findings(model.findings))
    for key in ("clinical_f1", "bleu4", "rouge_l", "distinct_ratio"):
        value = expected[key]
        assert metrics["report"][key] == (None if math.isnan(value) else pytest.approx(value, abs=1e-9)), key
    # The image's findings calls scored as a report's would be, by hand: macro F1 over the
    # findings that occur in a call or a reference.
    head = model.head("report")
    assert all(set(s["calls"]) <= set(head.config.findings) for s in samples)
    keys = [k for k in (_scored_findings(model.findings) or head.config.findings) if k in head.config.findings]
    truth = [{k for k, v in label_findings(s["reference"], keys).items() if v != "negative"} for s in samples]
    f1s = []
    for key in keys:
        tp = sum(key in set(s["calls"]) and key in t for s, t in zip(samples, truth))
        wrong = sum((key in set(s["calls"])) != (key in t) for s, t in zip(samples, truth))
        if 2 * tp + wrong:
            f1s.append(2 * tp / (2 * tp + wrong))
    assert metrics["report"]["calls"]["findings_scored"] == len(f1s)
    assert metrics["report"]["calls"]["clinical_f1"] == pytest.approx(float(np.mean(f1s)), abs=1e-9)
    # report_demo's head falls back on its section bank: the share of sections taken from
    # it, by hand from the samples; each listed section's text is one of the bank's, or (no
    # bank text fitting the calls) the decoder's edited with one of the bank's sentences.
    assert head.config.bank_fallback and head.config.section_bank
    sections = len(head.config.section_names)
    taken = [s["bank_sections"] for s in samples]
    assert metrics["report"]["bank_sections"] == {"share": pytest.approx(sum(map(len, taken)) / (sections * len(samples)),
                                                                         abs=1e-12), "sections_per_report": sections}
    for sample in samples:
        parts = split_report(sample["generated"])
        for name in sample["bank_sections"]:
            bank = head.config.section_bank[name]
            if parts[name] in bank:
                continue
            # A spliced section: taken only when no bank text states the calls, with fewer
            # disagreements than every one of them, and holding one of the bank's sentences.
            errors = head.reading_errors(name, [parts[name], *bank], sample["calls"])
            assert errors[0] < errors[1:].min(), (name, parts[name])
            assert any(sentence.rstrip(".") in parts[name] for text in bank
                       for sentence in text.split(". ") if len(sentence) > 8), (name, parts[name])
    efficiency = metrics["label_efficiency"]
    assert efficiency["label_fraction"] == [0.5, 1.0]
    dice = [json.loads((run / "metrics.json").read_text())["metrics"]["val/mean_dice"] for run in reversed(runs["seg_runs"])]
    assert efficiency["mean_dice"] == pytest.approx(dice)


def test_a_checkpoint_without_heads_reports_skipped_sections_on_the_command_line(runs, capsys):
    out = runs["root"] / "eval_plain"
    code = cli_main(["evaluate", "--checkpoint", str(runs["plain"]), "--data", str(runs["cohort"]), "--out", str(out),
                     "--split", "val,test", "--batch-size", "4", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "chance" in printed and "zero-shot AUROC" in printed and "skipped" in printed
    assert "text->section precision@10" in printed and "negated queries" in printed
    metrics = json.loads((out / METRICS_NAME).read_text())
    assert metrics["segmentation"] == {"skipped": f"no segmentation head in {runs['plain']}"}
    assert metrics["report"] == {"skipped": f"no report head in {runs['plain']}"}
    assert "skipped" in metrics["label_efficiency"]
    assert metrics["zero_shot"]["macro_auroc"] is not None or metrics["zero_shot"]["findings_scored"] == 0
    assert metrics["retrieval"]["r1_pool32"] is None  # fewer than 32 held-out cases
    assert metrics["command"].startswith("volumevlm evaluate")
    assert not (out / "dice_boxplot.png").exists() and (out / "retrieval_recall.png").is_file()
    assert "linear probe AUROC" in printed and "voxel probe AUROC" in printed
    assert metrics["organ_probe"] == {"skipped": "no segmentation head (the organs are the model's own)"}
    assert "no anatomy head" in metrics["zero_shot_anatomy"]["skipped"]
    image = read_manifest(runs["cohort"] / "manifest.jsonl").rows[0]["image"]
    code = cli_main(["zero-shot", "-m", str(runs["plain"]), "-i", str(image), "--anatomy"])
    assert code != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no anatomy head" in error[0] and "experiment=report_demo" in error[0]
    assert cli_main(["phenotypes", "-m", str(runs["plain"]), "-i", str(image), "--anatomy"]) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "experiment=" in error[0]

    # The yardsticks, by hand: probes fitted on the train split's embeddings / voxel
    # features (each case preprocessed and encoded here), scored on val + test.
    model = volumevlm.load(runs["plain"])
    train, held_out, names = probe_splits(runs["cohort"])

    def features(case_rows):
        with torch.no_grad():
            images = torch.stack([preprocess(row["image"], model.preprocess).as_tensor() for row in case_rows])
            return (model.encode_image(images).numpy(), voxel_features(images, model.preprocess.hu_window).numpy(),
                    np.array([[row["findings"].get(k, -1) for k in names] for row in case_rows], dtype=float))

    (train_emb, train_vox, train_y), (eval_emb, eval_vox, eval_y) = features(train), features(held_out)
    for section, fit_x, eval_x in ((metrics["linear_probe"], train_emb, eval_emb),
                                   (metrics["baseline"]["voxel_probe"], train_vox, eval_vox)):
        expected = probe_section(fit_x, train_y, eval_x, eval_y, names, features="")
        assert section["train_cases"] == len(train) and section["findings"] == len(names)
        assert section["findings_scored"] == expected["findings_scored"] > 0
        assert section["macro_auroc"] == pytest.approx(expected["macro_auroc"], abs=1e-3)
        assert section["per_finding"].keys() == expected["per_finding"].keys()
        low, high = section["macro_auroc_ci95"]
        assert low <= section["macro_auroc"] <= high


def test_bad_arguments_fail_in_one_line(runs, capsys, tmp_path):
    common = ["--data", str(runs["cohort"]), "--out", str(tmp_path / "o"), "--no-progress"]
    assert cli_main(["evaluate", "--checkpoint", str(tmp_path / "missing"), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path / "missing") in err
    assert cli_main(["evaluate", "--checkpoint", str(runs["plain"]), *common, "--split", "holdout"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holdout" in err
    assert cli_main(["evaluate", "--checkpoint", str(runs["plain"]), *common, "--label-efficiency", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "metrics.json" in err


def test_organ_probes_match_a_hand_computation_in_the_models_own_organs(runs):
    """The organ probe (frozen tokens averaged inside the organs the checkpoint's own
    segmentation head finds) and its model-free companion (each organ's size and HU
    histogram), fitted on train and scored on val + test, equal the same probes fitted on
    features computed here case by case."""
    from volumevlm.models.anatomy import organ_histograms, organ_labels, organ_token_means
    from volumevlm.models.report import encoder_features

    metrics = evaluate(runs["full"], runs["cohort"], runs["root"] / "eval_organs", split="val,test", batch_size=8,
                       progress=False)
    model = volumevlm.load(runs["full"])
    seg = model.head("segmentation")
    classes = seg.config.num_classes
    train, held_out, names = probe_splits(runs["cohort"])

    def features(case_rows):
        with torch.no_grad():
            images = torch.stack([preprocess(row["image"], model.preprocess).as_tensor() for row in case_rows])
            tokens, grid = encoder_features(model.encoder(images))
            labels = organ_labels(seg, images)
            return (organ_token_means(tokens, grid, labels, classes).flatten(1).numpy(),
                    organ_histograms(images, labels, classes, "hu_fine_dilated", model.preprocess.hu_window).flatten(1).numpy(),
                    np.array([[row["findings"].get(k, -1) for k in names] for row in case_rows], dtype=float),
                    organ_histograms(images, labels, classes, "hu_fine_dilated_sqrt",
                                     model.preprocess.hu_window).flatten(1).numpy())

    (train_tok, train_hist, train_y, _), (eval_tok, eval_hist, eval_y, eval_rooted) = features(train), features(held_out)
    # Zero-shot in the anatomy head's organ-system embeddings, by hand. The heads read the
    # report head's recipe (report_demo's: rooted histograms); the probes the default one.
    anatomy = model.head("anatomy")
    assert anatomy.organ_statistics == "hu_fine_dilated_sqrt" == model.head("report").config.organ_statistics
    with torch.no_grad():
        images = torch.stack([preprocess(row["image"], model.preprocess).as_tensor() for row in held_out])
        organs = classes - 1  # the anatomy head reads each organ's token means, then its size + histogram
        section_emb = anatomy(torch.cat([torch.from_numpy(eval_tok).view(len(held_out), organs, -1),
                                         torch.from_numpy(eval_rooted).view(len(held_out), organs, -1)], dim=-1))
        scores, keys, read_in = zero_shot_from_sections(model, model.encode_image(images), section_emb, anatomy,
                                                        findings=names)
    expected, used = macro_auroc(scores.numpy(), eval_y)
    zs = metrics["zero_shot_anatomy"]
    assert zs["findings_scored"] == used > 0 and zs["macro_auroc"] == pytest.approx(expected, abs=1e-3)
    assert zs["read_in"] == dict(zip(names, read_in)) and set(read_in) - {None} <= set(anatomy.sections)
    assert any(read_in)  # at least one finding is read in its organ system
    # Retrieval through the anatomy head, by hand: each image-report score is the mean of
    # the global cosine and the mean over the sections of the section cosines.
    reports = [row["report"] for row in held_out]
    with torch.no_grad():
        global_text = model.encode_reports(reports)
        section_text = torch.zeros(len(held_out), len(anatomy.sections), model.embed_dim)
        for i, report in enumerate(reports):
            parts = split_report(report)
            for s, name in enumerate(anatomy.sections):
                if parts.get(name, "").strip():
                    section_text[i, s] = model.encode_text([f"{name}: {parts[name]}"])[0]
        global_image = model.encode_image(images)
    cos = torch.nn.functional.cosine_similarity
    score = torch.zeros(len(held_out), len(held_out))
    for i in range(len(held_out)):
        for j in range(len(held_out)):
            sections = [cos(section_emb[i, s], section_text[j, s], dim=0) if section_text[j, s].any() else torch.tensor(0.0)
                        for s in range(len(anatomy.sections))]
            score[i, j] = (cos(global_image[i], global_text[j], dim=0) + torch.stack(sections).mean()) / 2
    assert section_text.abs().sum() > 0 and (score.diagonal().mean() > score.mean())  # it reads something
    got = metrics["retrieval"]["anatomy"]["full_set"]
    assert got["image_to_report"] == pytest.approx(recall_at_k(score.double().numpy(), (1, 5, 10)), abs=1e-9)
    assert got["report_to_image"] == pytest.approx(recall_at_k(score.T.double().numpy(), (1, 5, 10)), abs=1e-9)
    # The Python verb gives the same probabilities from the files.
    verb = model.zero_shot([row["image"] for row in held_out[:3]], findings=names, anatomy=True)
    for row, probs in zip(scores[:3], verb):
        assert list(probs) == names
        np.testing.assert_allclose(list(probs.values()), row.numpy(), atol=1e-4)
    # Phenotypes from the anatomy head's classifiers on the same organ features, by hand.
    assert anatomy.phecodes  # the cohort's frequent codes are fitted
    vocab = model.phecode_vocab
    with_codes = [i for i, row in enumerate(held_out) if row.get("phecodes")]
    columns = [list(vocab.codes).index(c) for c in anatomy.phecodes]
    code_targets = np.array([vocab.encode(held_out[i]["phecodes"]) for i in with_codes])[:, columns]
    with torch.no_grad():
        organ_logits = anatomy.phenotype_logits(torch.cat([torch.from_numpy(eval_tok).view(len(held_out), organs, -1),
                                                           torch.from_numpy(eval_rooted).view(len(held_out), organs, -1)],
                                                          dim=-1))
    expected, used = macro_auroc(organ_logits[with_codes].numpy(), code_targets)
    ph = metrics["phenotypes"]["anatomy"]
    assert ph["codes"] == len(anatomy.phecodes) and ph["codes_scored"] == used > 0
    assert ph["macro_auroc"] == pytest.approx(expected, abs=1e-3)
    verb = model.phenotypes([row["image"] for row in held_out[:2]], top_k=None, anatomy=True)
    for logits, ranked in zip(organ_logits[:2], verb):
        assert sorted(code for code, _, _ in ranked) == sorted(anatomy.phecodes)
        probs = dict(zip(anatomy.phecodes, torch.sigmoid(logits).tolist()))
        assert all(p == pytest.approx(probs[code], abs=1e-4) for code, _, p in ranked)
    assert train_tok.shape[1] == (classes - 1) * model.encoder.config.dim
    for section, fit_x, eval_x in ((metrics["organ_probe"], train_tok, eval_tok),
                                   (metrics["baseline"]["organ_voxel_probe"], train_hist, eval_hist)):
        expected = probe_section(fit_x, train_y, eval_x, eval_y, names, features="")
        assert section["feature_dim"] == fit_x.shape[1] and section["train_cases"] == len(train)
        assert section["findings_scored"] == expected["findings_scored"] > 0
        assert section["macro_auroc"] == pytest.approx(expected["macro_auroc"], abs=1e-3)


def test_text_retrieval_matches_a_hand_computation_over_the_index_sections(evaluated, by_hand, runs):
    """The corpus is what ``volumevlm index build --sections`` indexes (its own reader here),
    embedded one text at a time; each query's top sections are ranked and judged by hand."""
    from volumevlm.inference.index import read_reports
    from volumevlm.text.labeler import label_findings
    from volumevlm.text.queries import load_query_set

    section = evaluated[0]["text_retrieval"]
    model = by_hand["model"]
    corpus = [text for text, meta in read_reports(runs["cohort"] / "manifest.jsonl", sections=True)]
    assert section["corpus_sections"] == len(corpus) and section["reports"] == COHORT_CASES
    queries = load_query_set("synthetic")
    with torch.no_grad():
        corpus_emb = torch.cat([model.encode_text([text]) for text in corpus]).numpy()
    readings = [label_findings(text, queries.keys) for text in corpus]
    precision, negated = {}, {}
    for polarity, into in (("positive", precision), ("negated", negated)):
        for key, text in queries.queries(polarity):
            positive = [reading.get(key) == "positive" for reading in readings]
            if not any(positive):
                continue
            with torch.no_grad():
                scores = (corpus_emb @ model.encode_text([text])[0].numpy()).tolist()
            # Best first; at equal scores the outcome against the model first.
            against = positive if polarity == "positive" else [not p for p in positive]
            ranked = sorted(range(len(corpus)), key=lambda i: (-scores[i], against[i]))  # noqa: B023 (used at once)
            depth = min(10, sum(positive)) if polarity == "positive" else 10
            into.setdefault(key, []).append(sum(positive[i] for i in ranked[:depth]) / depth)
    assert precision, "the tiny cohort's reports state no finding at all"
    for key, values in precision.items():
        assert section["per_finding"][key]["precision_at_10"] == pytest.approx(np.mean(values), abs=1e-6), key
        assert section["per_finding"][key]["negated_positive_rate_at_10"] == pytest.approx(np.mean(negated[key]), abs=1e-6)
    assert section["precision_at_10"] == pytest.approx(np.mean([np.mean(v) for v in precision.values()]), abs=1e-6)
    assert section["findings_scored"] == len(precision)
    assert section["queries"] == section["negated_queries"] == 3 * len(queries.keys)
    assert all(q["top_hit"] in corpus for q in section["per_query"])


def test_text_retrieval_skips_with_a_reason(runs, tmp_path, capsys):
    from volumevlm.eval.evaluate import format_table, read_split, text_retrieval_section

    model = volumevlm.load(runs["plain"])
    rows = read_split(runs["cohort"], "test")
    without_reports = [{k: v for k, v in row.items() if k != "report"} for row in rows]
    assert text_retrieval_section(model, without_reports) == {
        "skipped": "no case of the split has a report (the corpus is their sections)"}
    model.text = None
    assert text_retrieval_section(model, rows) == {"skipped": "the checkpoint has no text tower"}
    table = format_table({"n_cases": 1, "split": "test", "text_retrieval": {"skipped": "the checkpoint has no text tower"}})
    assert "text_retrieval" in table and "no text tower" in table
    # A bad --text-queries file: one line naming it, before any case is encoded.
    bad = tmp_path / "queries.yaml"
    bad.write_text("name: x\nfindings:\n  not_a_finding:\n    positive: [Q.]\n")
    code = cli_main(["evaluate", "--checkpoint", str(runs["plain"]), "--data", str(runs["cohort"]),
                     "--out", str(tmp_path / "o"), "--no-progress", "--text-queries", str(bad)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(bad) in err and "not_a_finding" in err
