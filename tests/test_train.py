"""Pretraining end to end, composed from the real Hydra configs in conf/ and shrunk.

Data: a 12-case synthetic cohort (NOT clinical data) written once per module.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

import volumevlm
from pretrain_helpers import make_cohort, shrunk_config
from volumevlm.errors import VolumeVLMError
from volumevlm.metrics import macro_auroc, retrieval_recall
from volumevlm.train.cli import compose_config, conf_dir
from volumevlm.train.module import lr_factor
from volumevlm.train.train import train

EXPERIMENTS = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return make_cohort(tmp_path_factory.mktemp("cohort"))


# ---------------------------------------------------------------------- configs


def test_every_config_group_option_composes():
    """Each member of each group composes with the rest, and the encoder sizes resolve."""
    from volumevlm.train.module import build_encoder_config

    assert {"demo", "merlin_like"} <= set(EXPERIMENTS)
    for group in ("model", "trainer", "logger", "callbacks", "data", "experiment", "debug"):
        for option in sorted(p.stem for p in (conf_dir() / group).glob("*.yaml")):
            cfg = compose_config([f"{group}={option}", "data.root=/nonexistent"])
            assert cfg.output_dir and cfg.trainer._target_ == "lightning.pytorch.Trainer"
            encoder = build_encoder_config(dict(cfg.model.encoder))
            assert tuple(encoder.image_size) == tuple(cfg.data.preprocess.spatial_size)
    gpu = compose_config(["trainer=gpu", "data.root=x"])
    cpu = compose_config(["trainer=cpu", "data.root=x"])
    ddp = compose_config(["trainer=ddp", "data.root=x"])
    assert (gpu.trainer.precision, cpu.trainer.precision) == ("bf16-mixed", "32-true")
    assert ddp.trainer.strategy == "ddp" and ddp.trainer.precision == "bf16-mixed"


def test_merlin_like_is_merlins_recipe_on_one_gpu():
    cfg = compose_config(["experiment=merlin_like", "data.root=x"])
    assert list(cfg.data.preprocess.target_spacing) == [1.5, 1.5, 3.0]
    assert list(cfg.data.preprocess.spatial_size) == [224, 224, 160]
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 1
    assert cfg.trainer.precision == "bf16-mixed"
    assert cfg.model.encoder.name in ("small", "base")
    # What the CPU runs measured carries over (docs/learning.md, "The GPU recipe").
    demo = compose_config(["experiment=demo", "data.root=x"])
    for recipe in (cfg, demo):
        assert (recipe.model.text.pooling, recipe.model.text.pooled_norm, recipe.model.text.sections) == ("mean", "batch", False)
        assert recipe.model.objective.findings_weight > 0 and recipe.model.objective.sentence_weight > 0
        assert recipe.model.objective.findings_space == "shared"
        assert len(recipe.model.encoder.input_windows) == 3
        assert recipe.model.objective.section_text_weight > 0 and recipe.model.objective.section_text_negations


def test_every_key_is_overridable_and_bad_overrides_fail_in_one_line():
    cfg = compose_config(["experiment=demo", "data.root=x", "model.optimizer.lr=0.123", "trainer.max_steps=7"])
    assert cfg.model.optimizer.lr == 0.123 and cfg.trainer.max_steps == 7
    with pytest.raises(VolumeVLMError) as err:
        compose_config(["data.root=x", "model.no_such_key=1"])
    assert "\n" not in str(err.value) and "no_such_key" in str(err.value)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(step, 10, 100, 0.1) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert max(factors) == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_configure_adamw_groups_decay_and_learning_rates_by_name():
    from volumevlm.train.module import configure_adamw

    net = torch.nn.ModuleDict({"encoder": torch.nn.Linear(3, 4), "decoder": torch.nn.Linear(4, 2)})
    net.register_parameter("queries", torch.nn.Parameter(torch.zeros(2, 4)))
    cfg = {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.99], "warmup_steps": 10, "min_lr_ratio": 0.1}
    setup = configure_adamw(net.named_parameters(), cfg, 100, exempt_from_decay=lambda n: n == "queries",
                            lr_scale=lambda n: 0.5 if n.startswith("encoder.") else 1.0)
    groups = {(g["lr"], g["weight_decay"]): sum(p.numel() for p in g["params"]) for g in setup["optimizer"].param_groups}
    # LambdaLR has already scaled each group's lr by the step-0 warmup factor 0.1.
    assert groups == pytest.approx({(5e-5, 0.1): 12, (5e-5, 0.0): 4, (1e-4, 0.1): 8, (1e-4, 0.0): 2 + 8})
    assert setup["optimizer"].defaults["betas"] == (0.9, 0.99)
    with pytest.raises(VolumeVLMError, match="no trainable parameters"):
        configure_adamw([("w", torch.nn.Parameter(torch.zeros(2, 2), requires_grad=False))], cfg, 100)


def test_a_disabled_progress_bar_drops_the_progress_bar_callback():
    from lightning.pytorch.callbacks import ProgressBar

    from volumevlm.train.train import build_trainer

    cfg = compose_config(["trainer=cpu", "trainer.enable_progress_bar=false", "output_dir=/nonexistent-unused"])
    assert "rich_progress_bar" in cfg.callbacks  # still configured: build_trainer must drop it
    trainer = build_trainer(cfg)
    assert not any(isinstance(c, ProgressBar) for c in trainer.callbacks)


def test_metrics_against_hand_computed_values():
    keys = torch.eye(4)
    # case 1's query scores key 2 (1.0) above its own key (0.5): rank 2; the others rank 1
    queries = torch.tensor([[1.0, 0, 0, 0], [0, 0.5, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    recall = retrieval_recall(queries, keys, ks=(1, 2))
    assert recall[1] == pytest.approx(0.75) and recall[2] == pytest.approx(1.0)
    collapsed = retrieval_recall(torch.ones(4, 3), torch.ones(4, 3), ks=(1,))
    assert collapsed[1] == 0.0  # ties never count as hits
    scores = torch.tensor([[0.1, 0.9], [0.4, 0.2], [0.35, 0.1], [0.8, 0.5]])
    targets = torch.tensor([[0, 1], [0, 0], [1, 1], [1, 0]])
    value, used = macro_auroc(scores, targets)
    # column 0: positives {0.35, 0.8} vs negatives {0.1, 0.4}: 3 of 4 pairs ordered -> 0.75;
    # column 1: positives {0.9, 0.1} vs negatives {0.2, 0.5}: 2 of 4 -> 0.5
    assert used == 2 and value == pytest.approx((0.75 + 0.5) / 2)
    assert macro_auroc(torch.rand(3, 1), torch.zeros(3, 1))[1] == 0


# ---------------------------------------------------------------------- runs


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_fast_dev_run_of_every_experiment_leaves_a_loadable_model(cohort, tmp_path, experiment):
    out = tmp_path / "out"
    cfg = shrunk_config(cohort, out, f"experiment={experiment}", "debug=fdr")
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    model = volumevlm.load(out / "model")
    assert model.preprocess.spatial_size == (32, 32, 16)
    x = torch.rand(2, 1, 32, 32, 16)
    emb = model.encode_image(x)
    assert emb.shape == (2, cfg.model.embed_dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["provenance"]["synthetic"] is True and "NOT clinical" in config["provenance"]["data_note"]
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 1


class _LossRecorder(L.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_overfits_a_handful_of_cases_to_perfect_retrieval(cohort, tmp_path):
    """4 training cases, one batch: loss falls and image->report top-1 retrieval on them is 100%."""
    cfg = shrunk_config(
        cohort, tmp_path / "out",
        "data.train_limit=4", "trainer.max_steps=150", "model.optimizer.lr=2e-3",
        "model.optimizer.warmup_steps=5", "trainer.limit_val_batches=0", "model_dir=null",
    )
    recorder = _LossRecorder()
    _, objects = train(cfg, callbacks=[recorder])
    assert len(recorder.losses) == 150
    first, last = sum(recorder.losses[:5]) / 5, sum(recorder.losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)

    module, datamodule = objects["module"], objects["datamodule"]
    batch = next(iter(datamodule.train_dataloader()))
    module.eval()
    with torch.no_grad():
        image = module.model.encode_image(batch["image"])
        text = module.model.encode_text(batch["report"])
    assert len(batch["report"]) == 4
    assert retrieval_recall(image, text, ks=(1,))[1] == 1.0
    assert (image @ text.T).argmax(dim=1).tolist() == [0, 1, 2, 3]


class _Crash(L.Callback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated kill")


class _StepCounter(L.Callback):
    def __init__(self):
        self.steps: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(trainer.global_step)


def test_resume_after_an_interrupted_run_loses_at_most_the_interval(cohort, tmp_path):
    out = tmp_path / "out"
    overrides = ("trainer.max_steps=12", "callbacks.model_checkpoint.every_n_train_steps=5",
                 "trainer.limit_val_batches=0", "model_dir=null")
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(shrunk_config(cohort, out, *overrides), callbacks=[_Crash(at_step=8)])
    last = out / "checkpoints" / "last.ckpt"
    assert last.is_file()
    # Our own file, written just above by Lightning: loading its pickle is safe here.
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 5

    tokenizer_file = out / "vocab" / "tokenizer" / "tokenizer.json"
    tokenizer_bytes = tokenizer_file.read_bytes()

    counter = _StepCounter()
    _, objects = train(shrunk_config(cohort, out, *overrides), callbacks=[counter])
    assert objects["resumed_from"] == str(last)
    # The resumed run reads the first run's vocabularies instead of training new ones.
    assert tokenizer_file.read_bytes() == tokenizer_bytes
    assert counter.steps[0] == 5 and len(counter.steps) == 7
    assert objects["trainer"].global_step == 12
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 12


def test_cli_train_reports_a_missing_data_root_in_one_line(capsys):
    from volumevlm.cli import main

    assert main(["train", "experiment=demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.root") and "\n" not in err


def test_report_findings_term_learns_what_the_labeler_reads_and_stays_out_of_the_export(cohort, tmp_path):
    """findings_weight > 0: targets are the labeler's reading of each report (for the
    synthetic cohort exactly its findings), the term is in the loss, and the head is
    training-only."""
    out = tmp_path / "out"
    cfg = shrunk_config(cohort, out, "model.objective.findings_weight=0.5", "debug=fdr")
    _, objects = train(cfg)
    module, datamodule = objects["module"], objects["datamodule"]
    batch = next(iter(datamodule.train_dataloader()))
    targets, has_report = module.report_findings_targets(batch["report"])
    truth = torch.tensor([[case[k] for k in module.model.findings] for case in batch["findings"]], dtype=torch.float32)
    assert has_report.all() and torch.equal(targets, truth)
    # a case without a report drops out of the term instead of counting as "no findings"
    _, partial = module.report_findings_targets([None, *batch["report"][1:]])
    assert partial.tolist() == [False] + [True] * (len(batch["report"]) - 1)

    module.eval()
    with torch.no_grad():
        losses = module.compute_losses(batch)
        features = module.model(batch["image"])["image_features"]
        by_hand = torch.nn.functional.binary_cross_entropy_with_logits(module.report_findings_head(features), truth)
    assert torch.allclose(losses["findings"], by_hand, atol=1e-6)
    assert torch.allclose(losses["loss"], losses["clip"] + losses["phenotype"] + 0.5 * losses["findings"], atol=1e-6)
    # validation scores the head against the labeler's reading of the validation reports
    module.on_validation_epoch_start()
    with torch.no_grad():
        module.validation_step(batch, 0)
    metrics = module.validation_metrics(module._gathered_val_outputs())
    head_auroc, columns = macro_auroc(module.report_findings_head(features), truth)
    assert metrics["findings_head_auroc"] == pytest.approx(head_auroc) and metrics["findings_head_findings"] == columns > 0
    # validation's zero-shot is the rule and prompt set `volumevlm evaluate` and the API use
    from volumevlm.inference.pipeline import zero_shot_from_embeddings

    with torch.no_grad():
        image_emb = module.model(batch["image"])["image_emb"]
    probs, _ = zero_shot_from_embeddings(module.model, image_emb, "synthetic", module.model.findings)
    assert metrics["zero_shot_auroc"] == pytest.approx(macro_auroc(probs, truth)[0], abs=1e-6)

    exported = json.loads((out / "model" / "config.json").read_text())
    assert exported["prompt_set"] == "synthetic"
    assert "report_findings" not in json.dumps(exported["heads"])
    loaded = volumevlm.load(out / "model")
    assert not any("report_findings" in k for k in loaded.state_dict())


def test_report_findings_head_starts_at_the_share_of_training_reports_with_each_finding(cohort, tmp_path):
    from volumevlm.train.train import build

    cfg = shrunk_config(cohort, tmp_path / "out", "model.objective.findings_weight=1.0")
    datamodule, module = build(cfg)
    rows = datamodule.train_rows
    present = torch.tensor([[float(row["findings"][k]) for k in module.model.findings] for row in rows]).sum(dim=0)
    expected = torch.logit((present + 0.5) / (len(rows) + 1))
    assert torch.allclose(module.report_findings_head.fc.bias, expected, atol=1e-5)
    # a training case without a report does not count as one without findings
    module.start_report_findings_at_prevalence([None, *datamodule.train_reports()[1:]])
    present_rest = present - torch.tensor([float(rows[0]["findings"][k]) for k in module.model.findings])
    expected_rest = torch.logit((present_rest + 0.5) / (len(rows) - 1 + 1))
    assert torch.allclose(module.report_findings_head.fc.bias, expected_rest, atol=1e-5)


def test_shared_space_findings_term_reads_both_the_image_and_the_report_embeddings(cohort, tmp_path):
    out = tmp_path / "out"
    cfg = shrunk_config(cohort, out, "model.objective.findings_weight=1.0", "model.objective.findings_space=shared",
                        "debug=fdr")
    _, objects = train(cfg)
    module, datamodule = objects["module"], objects["datamodule"]
    batch = next(iter(datamodule.train_dataloader()))
    truth = torch.tensor([[case[k] for k in module.model.findings] for case in batch["findings"]], dtype=torch.float32)
    module.eval()
    with torch.no_grad():
        losses = module.compute_losses(batch)
        out_ = module.model(batch["image"])
        text_emb = module.model.encode_text(batch["report"])
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        head = module.report_findings_head
        by_hand = 0.5 * (bce(head(out_["image_emb"]), truth) + bce(head(text_emb), truth))
    assert head.fc.in_features == module.model.embed_dim
    assert torch.allclose(losses["findings"], by_hand, atol=1e-5)
    with pytest.raises(Exception, match="findings_space"):
        train(shrunk_config(cohort, tmp_path / "bad", "model.objective.findings_weight=1.0",
                            "model.objective.findings_space=text", "debug=fdr"))


def test_finding_sentences_are_scored_against_every_case_by_the_labeler(cohort):
    import random

    from volumevlm.train.datamodule import PretrainDataModule
    from volumevlm.train.module import PretrainModule

    datamodule = PretrainDataModule(cohort, batch_size=2)
    datamodule.setup()
    module = PretrainModule(encoder={"name": "tiny", "image_size": [32, 32, 16]}, text={"vocab_size": 64},
                            objective={"sentence_weight": 1.0}, tokenizer=datamodule.tokenizer,
                            phecode_vocab=datamodule.phecode_vocab,
                            findings=["splenomegaly", "hepatic_steatosis", "ascites"])
    reports = [
        "FINDINGS:\nSPLEEN: Splenomegaly.\nLIVER: Diffuse hepatic steatosis.",
        "FINDINGS:\nSPLEEN: No splenomegaly.\nPERITONEUM: No free fluid.",
        None,
        "FINDINGS:\nLIVER: Diffuse hepatic steatosis. Small volume ascites.",
    ]
    sentences, targets, known = module.finding_sentences(reports, per_case=10, rng=random.Random(0))
    assert sorted(sentences) == sorted(["Splenomegaly.", "Diffuse hepatic steatosis.", "No splenomegaly.",
                                        "No free fluid.", "Diffuse hepatic steatosis.", "Small volume ascites."])
    truth = {  # sentence -> (true of case 0, 1, 2, 3); None: the labeler cannot tell
        "Splenomegaly.": (1, 0, None, None),
        "No splenomegaly.": (0, 1, None, None),
        "Diffuse hepatic steatosis.": (1, None, None, 1),
        "No free fluid.": (None, 1, None, 0),
        "Small volume ascites.": (None, 0, None, 1),
    }
    for j, sentence in enumerate(sentences):
        for i, expected in enumerate(truth[sentence]):
            assert bool(known[i, j]) == (expected is not None), (sentence, i)
            if expected is not None:
                assert targets[i, j] == expected, (sentence, i)
    with pytest.raises(ValueError, match="sentences_per_case"):
        PretrainModule(encoder={"name": "tiny", "image_size": [32, 32, 16]}, text={"vocab_size": 64},
                       objective={"sentence_weight": 1.0, "sentences_per_case": 0}, tokenizer=datamodule.tokenizer,
                       phecode_vocab=datamodule.phecode_vocab, findings=["splenomegaly"])


def test_sentence_term_is_the_masked_sigmoid_loss_and_stays_out_of_the_export(cohort, tmp_path):
    import random

    out = tmp_path / "out"
    cfg = shrunk_config(cohort, out, "model.objective.sentence_weight=0.5", "debug=fdr")
    _, objects = train(cfg)
    module, datamodule = objects["module"], objects["datamodule"]
    batch = next(iter(datamodule.train_dataloader()))
    module.eval()
    with torch.no_grad():
        random.seed(3)
        losses = module.compute_losses(batch)
        random.seed(3)
        sentences, targets, known = module.finding_sentences(batch["report"])
        out_ = module.model(batch["image"])
        logits = out_["logit_scale"] * out_["image_emb"] @ module.model.encode_text(sentences).T + module.sentence_bias
        by_hand = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], targets[known])
    assert sentences and bool(known.any())
    assert torch.allclose(losses["sentences"], by_hand, atol=1e-5)
    assert torch.allclose(losses["loss"], losses["clip"] + losses["phenotype"] + 0.5 * losses["sentences"], atol=1e-5)
    assert not any("sentence_bias" in k for k in volumevlm.load(out / "model").state_dict())


def test_report_findings_term_refuses_findings_the_labeler_cannot_read(cohort):
    from volumevlm.train.datamodule import PretrainDataModule
    from volumevlm.train.module import PretrainModule

    datamodule = PretrainDataModule(cohort, batch_size=2)
    datamodule.setup()
    with pytest.raises(ValueError, match="labeler cannot read"):
        PretrainModule(encoder={"name": "tiny", "image_size": [32, 32, 16]}, text={"vocab_size": 64},
                       objective={"findings_weight": 1.0}, tokenizer=datamodule.tokenizer,
                       phecode_vocab=datamodule.phecode_vocab, findings=["not_a_finding"])


def test_the_datamodule_reads_each_case_once_as_the_labeler_does_and_holds_compact_volumes(cohort, tmp_path):
    """Precomputed readings (data.precompute) equal what the labeler, the tokenizer and the
    phecode vocabulary give for each report, the losses are the same with them as without,
    and in_memory volumes are the preprocessed ones rounded to float16 (cache read once)."""
    import random

    import numpy as np

    from volumevlm.text.labeler import findings_matrix, label_findings, report_sentences
    from volumevlm.text.sections import report_sections
    from volumevlm.train.train import build

    cfg = shrunk_config(cohort, tmp_path / "out", "experiment=demo", "data.batch_size=4")
    assert cfg.data.precompute and cfg.data.in_memory and cfg.data.text_max_length == cfg.model.text.max_length
    datamodule, module = build(cfg)
    keys = module.report_finding_keys
    tower = module.model.text
    loader = datamodule.train_dataloader()
    dataset = loader.dataset
    for row, reading in zip(dataset.rows, dataset.readings):
        report = row["report"]
        # the labeler, by hand: hedged counts as present, and on the synthetic cohort its
        # reading is the case's true findings
        by_labeler = findings_matrix([label_findings(report, keys)], keys)[0]
        assert reading.findings.tolist() == by_labeler.tolist() == [row["findings"][k] for k in keys]
        assert reading.statuses == {k: s != "negative" for k, s in label_findings(report, keys).items()}
        stating = [(text, label_findings(context, keys)) for text, context in report_sentences(report)]
        assert [(t, c) for t, c, _ in reading.sentences] == [
            (text, {k: s != "negative" for k, s in labels.items()}) for text, labels in stating if labels]
        assert [t for t, _, _ in reading.sections] == report_sections(report)
        # token ids, padded, are what the tower's tokenizer gives the texts in a batch
        texts = [report, *(t for t, _, _ in reading.sentences), *(t for t, _, _ in reading.sections)]
        ids = [reading.report_tokens, *(i for _, _, i in reading.sentences), *(i for _, _, i in reading.sections)]
        padded, tokenized = tower.pad_token_ids(ids), tower.tokenize(texts)
        assert torch.equal(padded["input_ids"], tokenized["input_ids"])
        assert torch.equal(padded["attention_mask"], tokenized["attention_mask"])
        assert reading.phenotype_targets.tolist() == list(module.model.phecode_vocab.encode(row["phecodes"]))

    batch = next(iter(loader))
    module.eval()
    with torch.no_grad():
        random.seed(5)
        with_readings = module.compute_losses(batch)
        random.seed(5)
        without = module.compute_losses({k: v for k, v in batch.items() if k != "reading"})
    for name in ("loss", "clip", "phenotype", "findings", "sentences"):
        assert torch.allclose(with_readings[name], without[name], atol=1e-5), name

    # in_memory: every volume read once, held as float16, served from memory afterwards
    for _ in loader:  # the first epoch
        pass
    assert all(image is not None and image.dtype == torch.float16 for image in dataset.held)
    first = dataset.base.image(0)
    assert torch.equal(dataset[0]["image"], first.to(torch.float16).float())
    assert (dataset[0]["image"] - first).abs().max() <= 2.0 ** -11  # about 1 HU of a 2000 HU window
    dataset.base.image = lambda index: pytest.fail("a held volume was read again")
    assert torch.equal(dataset[0]["image"], first.to(torch.float16).float())
    from volumevlm.train.datamodule import PretrainDataModule

    with pytest.raises(VolumeVLMError, match="num_workers") as err:
        PretrainDataModule(cohort, in_memory=True, num_workers=1)
    assert "\n" not in str(err.value)
    assert np.isfinite(with_readings["loss"].item())


def test_section_text_term_groups_sections_by_the_labelers_reading(cohort):
    import random

    from volumevlm.train.datamodule import PretrainDataModule
    from volumevlm.train.losses import overlap_supervised_contrastive, supervised_contrastive
    from volumevlm.train.module import PretrainModule

    datamodule = PretrainDataModule(cohort, batch_size=2)
    datamodule.setup()
    module = PretrainModule(encoder={"name": "tiny", "image_size": [32, 32, 16]}, text={"vocab_size": 64},
                            objective={"section_text_weight": 1.0, "section_text_others_per_case": 1},
                            tokenizer=datamodule.tokenizer, phecode_vocab=datamodule.phecode_vocab,
                            findings=["splenomegaly", "ascites"])
    reports = [
        "FINDINGS:\nSPLEEN: Splenomegaly.\nPANCREAS: Unremarkable.\nPERITONEUM: No free fluid.",
        None,
        "FINDINGS:\nSPLEEN: No splenomegaly.\nPERITONEUM: Small volume ascites.",
    ]
    texts, findings, _ = module.section_texts(reports, rng=random.Random(0))
    # Every section that states a finding, and one other per report (the drawn one varies).
    stated = {"SPLEEN: Splenomegaly.": [1, 0], "PERITONEUM: Small volume ascites.": [0, 1]}
    assert set(stated) <= set(texts) and len(texts) == len(stated) + 2
    for text, row in zip(texts, findings.tolist()):
        assert row == stated.get(text, [0, 0]), text
    assert "SPLEEN: No splenomegaly." in texts or "PERITONEUM: No free fluid." in texts or "PANCREAS: Unremarkable." in texts
    # With negations, each stating section also comes denied, read by the labeler.
    module.section_text_negations = True
    denials, _, _ = module.section_texts(reports, rng=random.Random(0))
    assert sorted(set(denials) - set(texts)) == ["PERITONEUM: No small volume ascites.", "SPLEEN: Splenomegaly is absent."]
    module.section_text_affirmations = True
    more, more_findings, _ = module.section_texts(reports, rng=random.Random(0))
    read = dict(zip(more, more_findings.tolist()))
    # "Splenomegaly." is denied after the finding, so its affirmed twin comes too;
    # "Small volume ascites." is denied with "No ...", whose twin is the section itself.
    added = {"SPLEEN: Splenomegaly is absent.": [0, 0], "SPLEEN: Splenomegaly is present.": [1, 0],
             "PERITONEUM: No small volume ascites.": [0, 0]}
    assert set(texts) < set(more) and sorted(set(more) - set(texts)) == sorted(added)
    assert len(more) == len(texts) + len(added)
    assert all(read[text] == row for text, row in added.items())
    module.section_text_negations = module.section_text_affirmations = False
    module.eval()
    with torch.no_grad():
        loss = module.section_text_loss(reports, rng=random.Random(0))
        by_hand = supervised_contrastive(module.model.encode_text(texts), findings, temperature=0.1)
    assert torch.allclose(loss, by_hand, atol=1e-5)
    # Graded positives: a section stating two findings is a half positive of each one's.
    module.section_text_positives = "overlap"
    both = [*reports, "FINDINGS:\nSPLEEN: Splenomegaly. Small volume ascites."]
    with torch.no_grad():
        graded = module.section_text_loss(both, rng=random.Random(0))
        texts, findings, _ = module.section_texts(both, rng=random.Random(0))
        assert [1.0, 1.0] in findings.tolist()
        by_hand = overlap_supervised_contrastive(module.model.encode_text(texts), findings, temperature=0.1)
    assert torch.allclose(graded, by_hand, atol=1e-5)
    with pytest.raises(ValueError, match="section_text_positives"):
        PretrainModule(encoder={"name": "tiny", "image_size": [32, 32, 16]}, text={"vocab_size": 64},
                       objective={"section_text_weight": 1.0, "section_text_positives": "jaccard"},
                       tokenizer=datamodule.tokenizer, phecode_vocab=datamodule.phecode_vocab, findings=["ascites"])
    with pytest.raises(ValueError, match="section_text_temperature"):
        PretrainModule(encoder={"name": "tiny", "image_size": [32, 32, 16]}, text={"vocab_size": 64},
                       objective={"section_text_weight": 1.0, "section_text_temperature": 0.0},
                       tokenizer=datamodule.tokenizer, phecode_vocab=datamodule.phecode_vocab, findings=["ascites"])


def test_section_text_term_is_added_to_the_loss_and_trains(cohort, tmp_path):
    out = tmp_path / "out"
    _, objects = train(shrunk_config(cohort, out, "model.objective.section_text_weight=0.5", "debug=fdr"))
    module, datamodule = objects["module"], objects["datamodule"]
    batch = next(iter(datamodule.train_dataloader()))
    module.eval()
    import random

    with torch.no_grad():
        random.seed(5)
        losses = module.compute_losses(batch)
    assert torch.isfinite(losses["section_text"]) and losses["section_text"] > 0
    expected = losses["clip"] + losses["phenotype"] + 0.5 * losses["section_text"]
    assert torch.allclose(losses["loss"], expected, atol=1e-5)
    assert volumevlm.load(out / "model").text_config is not None


def test_negated_sections_differ_by_negation_and_the_labeler_confirms_the_denial():
    from volumevlm.text.labeler import label_findings
    from volumevlm.train.targets import NEGATION_FORMS, negated_section

    keys = ("splenomegaly", "ascites", "osteopenia", "vertebral_compression_fracture")
    sentence = "Splenomegaly, measuring 15.1 cm in length."
    forms = {"SPLEEN: No splenomegaly, measuring 15.1 cm in length.",
             "SPLEEN: Splenomegaly, measuring 15.1 cm in length is not seen.",
             "SPLEEN: Splenomegaly, measuring 15.1 cm in length is absent."}
    assert len(NEGATION_FORMS) == len(forms)
    denied = negated_section(f"SPLEEN: {sentence}", keys)
    assert denied in forms and denied == negated_section(f"SPLEEN: {sentence}", keys)  # fixed per sentence
    assert label_findings(denied, keys) == {"splenomegaly": "negative"}
    # Only the sentence that states a finding changes; a denial already there stays.
    denied = negated_section("MUSCULOSKELETAL: No compression fracture. Diffuse osteopenia.", keys)
    assert denied.startswith("MUSCULOSKELETAL: No compression fracture. ") and denied != \
        "MUSCULOSKELETAL: No compression fracture. Diffuse osteopenia."
    assert label_findings(denied, keys) == {"vertebral_compression_fracture": "negative", "osteopenia": "negative"}
    # Over many sentences every form is used.
    used = {negated_section(f"PERITONEUM: {size} ascites.", keys).split(" ", 1)[1][:3] for size in
            ("Small", "Moderate", "Large", "Trace", "Mild", "Small volume", "Moderate volume", "Large volume")}
    assert {"No "} < used
    assert negated_section("PERITONEUM: No ascites.", keys) is None  # states nothing present
    assert negated_section("PERITONEUM: Possible trace free fluid in the pelvis.", keys) is None  # hedged only


def test_affirmed_twins_differ_from_the_denials_by_the_negation_alone():
    from volumevlm.text.labeler import label_findings
    from volumevlm.train.targets import AFFIRMATION_FORMS, NEGATION_FORMS, affirmed_section, negated_section

    keys = ("splenomegaly", "ascites", "osteopenia", "pleural_effusion")
    assert len(AFFIRMATION_FORMS) == len(NEGATION_FORMS)
    twins = 0
    for size in ("Small", "Moderate", "Large", "Trace", "Mild", "Small volume", "Moderate volume", "Large volume"):
        section = f"PERITONEUM: {size} ascites. No pleural effusion."
        denied, affirmed = negated_section(section, keys), affirmed_section(section, keys)
        if denied.startswith("PERITONEUM: No "):
            assert affirmed is None  # the twin of "No X." is the section itself
            continue
        twins += 1
        # the same words: drop "not " from "is not seen", "absent" <-> "present"
        assert affirmed == denied.replace(" is not seen.", " is seen.").replace(" is absent.", " is present.")
        assert affirmed != section and affirmed.endswith(" No pleural effusion.")
        assert label_findings(affirmed, keys) == label_findings(section, keys) == {
            "ascites": "positive", "pleural_effusion": "negative"}
    assert twins >= 2  # denials worded after the finding occur over these sentences
    assert affirmed_section("PERITONEUM: No ascites.", keys) is None  # states nothing present
    assert affirmed_section("PERITONEUM: Possible trace free fluid in the pelvis.", keys) is None
