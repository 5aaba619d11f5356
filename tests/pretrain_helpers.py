"""Shared pieces of the pretraining and inference tests.

A tiny synthetic cohort (NOT clinical data), the overrides that shrink any composed
training config to a size that runs in seconds on a 2-core CPU, and a tiny checkpoint
with both downstream heads (untrained weights: for inputs, geometry and errors, not
quality).
"""

from __future__ import annotations

from pathlib import Path

COHORT_CASES = 12
COHORT_SHAPE = (32, 32, 16)

# Applied after an experiment: sizes small enough for CI, always on the CPU in fp32.
SHRINK = [
    "data.preprocess.target_spacing=[12.0,12.0,20.0]",
    "data.preprocess.spatial_size=[32,32,16]",
    "data.batch_size=4",
    "data.val_batch_size=4",
    "data.num_workers=0",
    "model.encoder.patch_size=[8,8,4]",
    "model.encoder.dim=32",
    "model.encoder.depth=2",
    "model.encoder.heads=2",
    "model.encoder.drop_path=0.0",
    "model.encoder.grad_checkpointing=false",
    "model.text.dim=32",
    "model.text.depth=1",
    "model.text.heads=2",
    "model.text.vocab_size=400",
    "model.text.max_length=128",
    "model.embed_dim=32",
    "model.optimizer.warmup_steps=2",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.strategy=auto",
    "trainer.precision=32-true",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "~callbacks.rich_progress_bar",
]


def make_cohort(folder: Path) -> Path:
    """Write the tiny synthetic cohort (12 cases, 32x32x16) into ``folder``; return it."""
    from volumevlm.data.synthetic import generate_cohort

    generate_cohort(folder, n=COHORT_CASES, seed=0, shape=COHORT_SHAPE, workers=1, progress=False)
    return folder


def shrunk_config(cohort: Path, output_dir: Path, *overrides: str):
    """The real composed config (conf/train.yaml), shrunk, with ``overrides`` applied last."""
    from volumevlm.train.cli import compose_config

    return compose_config([f"data.root={cohort}", f"output_dir={output_dir}", *SHRINK, *overrides])


TINY_REPORT_HEAD = {
    "num_visual_tokens": 4, "resampler_depth": 1, "resampler_heads": 2, "resampler_dropout": 0.0,
    "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 96, "dropout": 0.0,
    "max_target_tokens": 16, "max_new_tokens": 4,
}


def make_checkpoints(root: Path) -> dict[str, Path]:
    """{"plain": a fast_dev_run pretraining checkpoint on the tiny cohort, "full": the
    same model with a segmentation and a report head saved with it, "root", "cohort"}."""
    import torch

    import volumevlm
    from volumevlm.models.report import ReportGenerator
    from volumevlm.models.segmentation import SegmentationConfig, SegmentationNet
    from volumevlm.train.train import train

    cohort = make_cohort(root / "cohort")
    _, objects = train(shrunk_config(cohort, root / "pre", "experiment=demo", "debug=fdr"))
    plain = Path(objects["model_dir"])
    model = volumevlm.load(plain)
    torch.manual_seed(0)
    seg = SegmentationNet.from_encoder(
        model.encoder, SegmentationConfig(feature_size=4, roi_size=model.preprocess.spatial_size)
    )
    model.attach_head("segmentation", seg.eval())
    model.attach_head("report", ReportGenerator.build(TINY_REPORT_HEAD, model).eval())
    full = model.save_pretrained(root / "full")
    return {"plain": plain, "full": full, "root": root, "cohort": cohort}
