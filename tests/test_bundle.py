"""MONAI bundle export (issue 7): ``volumevlm export-bundle`` on a tiny checkpoint, then
MONAI's own tools run as subprocesses on the bundle (``verify_net_in_out``,
``ckpt_export``, ``run``) and the masks they write are compared with the package's own
segmentation of the same NIfTI files stored in several orientations.

The checkpoint is built from the package's parts (random weights, a tokenizer trained
on two sentences) and the CT volumes come from ``volumevlm synth``: all of it
SYNTHETIC, not clinical data.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import volumevlm
from volumevlm.cli import main as cli_main
from volumevlm.data.transforms import INVERT_TARGET, PreprocessConfig, bundle_pipeline_specs, pipeline, whole_field
from volumevlm.errors import VolumeVLMError
from volumevlm.export.bundle import (
    EMBEDDINGS_CSV,
    METADATA_FIELDS,
    TENSOR_FIELDS,
    SegmentationNetwork,
    check_bundle,
    check_metadata,
    export_bundle,
    trace_network,
)
from volumevlm.io import read_volume
from volumevlm.io.volume import reorient
from volumevlm.models.encoder import EncoderConfig
from volumevlm.models.segmentation import SegmentationConfig, SegmentationNet, segment_to_input

# The shrunk preprocessing of the pretraining tests: 12 x 12 x 20 mm voxels, 32 x 32 x 16.
PRE = PreprocessConfig(target_spacing=(12.0, 12.0, 20.0), spatial_size=(32, 32, 16))
# The shipped head: a conv-stem encoder with the fused U-Net decoder (experiment=segment_demo).
ENCODER = EncoderConfig(name="tiny", image_size=(32, 32, 16), patch_size=(8, 8, 4), dim=32, depth=2, heads=2, num_registers=2,
                        stem="conv")
SEG_METRICS = {"train/loss": 0.9, "val/mean_dice": 0.4321, "val/dice_liver": 0.61, "val/cases": 2.0}
# Stored orientations of the same CT (file name -> axis codes); "sub/" checks that
# sub-folders of dataset_dir are read and mirrored under output_dir.
ORIENTATIONS = {"as_ras": "RAS", "sub/as_lps": "LPS", "as_psl": "PSL"}
# Same thread count here and in MONAI's subprocesses: identical float reductions.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def monai_bundle(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m monai.bundle ARGS`` as a user runs it; fails the test with its output."""
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"monai.bundle {args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def fit_head(net, image_path: Path, label_path: Path, steps: int = 80) -> tuple[list[float], dict[int, float]]:
    """A few Adam steps of the head on one case's label map: the losses, and the Dice on
    that case of each structure the trained head then finds."""
    data = pipeline(PRE, keys=("image",), label_keys=("label",))({"image": str(image_path), "label": str(label_path)})
    x, y = data["image"].as_tensor()[None], data["label"].as_tensor().long()
    # Rare structures weigh more (inverse square root of their share): with plain cross
    # entropy a few dozen steps learn the background alone.
    counts = torch.bincount(y.flatten(), minlength=net.config.num_classes).float()
    weight = (counts.sum() / counts.clamp(min=1)).sqrt()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(net(x), y, weight=weight / weight.mean())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        found = net.eval()(x).argmax(1).numpy()
    truth = y.numpy()
    return losses, {int(k): dice(found == k, truth == k) for k in np.unique(found) if k != 0}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """{"plain": checkpoint without heads, "seg": with a segmentation head, "data": a folder
    of the same synthetic CT stored in ORIENTATIONS, "root": scratch}."""
    from volumevlm.data.synthetic import generate_cohort
    from volumevlm.models.text import TextConfig
    from volumevlm.models.vlm import VolumeVLM
    from volumevlm.text.tokenizer import build_wordpiece_tokenizer
    from volumevlm.text.vocab import PhecodeVocabulary

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("bundle")
    tokenizer = build_wordpiece_tokenizer(["Liver: normal.", "Kidneys: simple renal cyst."], vocab_size=64)
    model = VolumeVLM(
        ENCODER,
        TextConfig(vocab_size=64, dim=16, depth=1, heads=2, max_length=32),
        tokenizer,
        PhecodeVocabulary.build([["250.2"], ["401.1"]]),
        embed_dim=16,
        preprocess=PRE,
    ).eval()
    synthetic = {"synthetic": True, "data_note": "synthetic-data: trained on a SYNTHETIC cohort, NOT clinical data"}
    plain = model.save_pretrained(root / "plain", provenance={**synthetic, "train_cases": 8, "global_step": 3})
    generate_cohort(root / "cohort", n=1, seed=3, shape=(40, 36, 20), workers=1, progress=False)
    image_path = next((root / "cohort" / "images").glob("*.nii.gz"))
    net = SegmentationNet.from_encoder(model.encoder, SegmentationConfig(feature_size=4, roi_size=(32, 32, 16),
                                                                         decoder="fused"))
    # A head that learned something (its masks follow the anatomy), not random weights:
    # the bundle must reproduce a trained head's masks, edges included.
    losses, found = fit_head(net, image_path, next((root / "cohort" / "labels").glob("*.nii.gz")))
    assert losses[-1] < 0.6 * losses[0] and len(found) >= 2 and np.mean(list(found.values())) > 0.4, (losses[::10], found)
    model.attach_head("segmentation", net.eval())
    seg_record = {**synthetic, "train_cases": 8, "global_step": 150, "metrics": SEG_METRICS}
    seg = model.save_pretrained(root / "seg", provenance={**synthetic, "heads": {"segmentation": seg_record}})

    volume = read_volume(image_path)
    data = root / "data"
    for name, codes in ORIENTATIONS.items():
        array, affine = reorient(volume.array, volume.affine, codes)
        image = nib.Nifti1Image(np.rint(array).astype(np.int16), affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        nib.save(image, str(data / f"{name}.nii.gz"))
    return {"plain": plain, "seg": seg, "data": data, "root": root}


@pytest.fixture(scope="module")
def seg_bundle(made):
    bundle = made["root"] / "seg_bundle"
    result = export_bundle(made["seg"], bundle, task="segmentation", log=lambda line: None)
    return bundle, result


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


# ---------------------------------------------------------------------- layout and metadata


def test_the_bundle_has_the_specification_files_and_complete_metadata(made, seg_bundle):
    bundle, result = seg_bundle
    for rel in ("LICENSE", "configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md"):
        assert (bundle / rel).is_file(), rel
    assert check_bundle(bundle) == []
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    assert check_metadata(meta) == []
    assert meta["required_packages_version"]["volumevlm"] == volumevlm.__version__
    import monai

    assert meta["monai_version"] == monai.__version__ and meta["numpy_version"] == np.__version__
    assert meta["pytorch_version"] == torch.__version__.split("+")[0]
    image = meta["network_data_format"]["inputs"]["image"]
    assert (image["format"], image["modality"], image["num_channels"], image["dtype"]) == ("hounsfield", "CT", 1, "float32")
    assert image["spatial_shape"] == [32, 32, 16] and image["value_range"] == [0.0, 1.0] and image["is_patch_data"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    model = volumevlm.load(made["seg"])
    names = model.head("segmentation").label_names
    assert pred["format"] == "segmentation" and pred["num_channels"] == len(names) == 15
    assert pred["channel_def"] == {str(i): n for i, n in names.items()}
    # The figures come with where they came from, and say they are synthetic.
    assert meta["eval_metrics"] == {"val/dice_liver": 0.61, "val/mean_dice": 0.4321}
    # (training losses are not validation figures; a case count is a sample size, not a metric)
    assert "SYNTHETIC" in meta["eval_metrics_provenance"] and "150 training step" in meta["eval_metrics_provenance"]
    assert "val/cases = 2" in meta["eval_metrics_provenance"]
    card = (bundle / "docs/README.md").read_text()
    assert "not for clinical use" in card.lower() and "| val/mean_dice | 0.4321 |" in card
    assert "come from synthetic data" in card and "not clinical data" in card
    assert "Intended use" in card and "| 1 | liver |" in card
    assert "Apache-2.0" in (bundle / "LICENSE").read_text()


def test_metadata_check_names_each_missing_or_mistyped_field(seg_bundle):
    bundle, _ = seg_bundle
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    for name, rule in METADATA_FIELDS.items():
        if rule.required:
            broken = {k: v for k, v in meta.items() if k != name}
            assert check_metadata(broken) == [f"{name}: required field missing"]
    assert check_metadata({**meta, "version": 1}) == ["version: must be a string, got int"]
    assert check_metadata({**meta, "changelog": {"0.1.0": 3}}) == ["changelog: values must be strings (not for ['0.1.0'])"]
    image = meta["network_data_format"]["inputs"]["image"]
    for name in TENSOR_FIELDS:
        fmt = {**meta["network_data_format"], "inputs": {"image": {k: v for k, v in image.items() if k != name}}}
        assert check_metadata({**meta, "network_data_format": fmt}) == [
            f"network_data_format.inputs.image.{name}: required field missing"
        ]
    fmt = {**meta["network_data_format"], "inputs": {"image": {**image, "value_range": [1, 0], "num_channels": True}}}
    assert check_metadata({**meta, "network_data_format": fmt}) == [
        "network_data_format.inputs.image.num_channels: must be an integer, got bool",
        "network_data_format.inputs.image.value_range: must be [] or [min, max] numbers, got [1, 0]",
    ]
    assert check_metadata({**meta, "network_data_format": {"inputs": {}}}) == [
        "network_data_format.outputs: required object missing"
    ]


def test_inference_preprocessing_is_generated_from_the_one_definition(made, seg_bundle, tmp_path):
    """inference.json's preprocessing is exactly bundle_pipeline_specs of the model's
    preprocessing without its centre crop (whole_field: a mask covers the whole input),
    and MONAI's ConfigParser builds from it the same transform as volumevlm's pipeline()."""
    from monai.bundle import ConfigParser

    bundle, _ = seg_bundle
    config = json.loads((bundle / "configs/inference.json").read_text())
    assert config["preprocessing"]["transforms"] == bundle_pipeline_specs(whole_field(PRE), ["image"])
    assert not any(t["_target_"] == "ResizeWithPadOrCropd" for t in config["preprocessing"]["transforms"])
    assert config["network_def"]["_target_"] == "volumevlm.export.bundle.SegmentationNetwork"
    targets = [t["_target_"] for t in config["postprocessing"]["transforms"]]
    assert targets == ["Activationsd", INVERT_TARGET, "SaveImaged"] and config["inferer"]["_target_"] == "SlidingWindowInferer"
    assert config["evaluator"]["_target_"] == "SupervisedEvaluator" and config["run"] == ["$@evaluator.run()"]
    parser = ConfigParser({"preprocessing": config["preprocessing"]})
    from_bundle = parser.get_parsed_content("preprocessing")({"image": str(made["data"] / "as_psl.nii.gz")})["image"]
    ours = pipeline(whole_field(PRE))({"image": str(made["data"] / "as_psl.nii.gz")})["image"]
    assert torch.equal(from_bundle.as_tensor(), ours.as_tensor())
    assert torch.equal(from_bundle.affine, ours.affine)


# ---------------------------------------------------------------------- MONAI's tools


def test_monai_runs_the_bundle_and_its_masks_equal_the_packages_own(made, seg_bundle, tmp_path):
    """``python -m monai.bundle run`` with --dataset_dir/--output_dir over NIfTI files
    stored RAS, LPS and PSL: one mask per file (sub-folder kept), in the file's own
    shape and affine, equal on every voxel to segment_to_input with a trained head."""
    bundle, _ = seg_bundle
    out = tmp_path / "masks"
    monai_bundle(
        "run", "--config_file", "configs/inference.json", "--meta_file", "configs/metadata.json",
        "--dataset_dir", str(made["data"]), "--output_dir", str(out), cwd=bundle,
    )
    model = volumevlm.load(made["seg"])
    head = model.head("segmentation")
    seen = set()
    for name in ORIENTATIONS:
        source = made["data"] / f"{name}.nii.gz"
        mask = nib.load(str(out / f"{name}_seg.nii.gz"))
        ours, _ = segment_to_input(head, source, model.preprocess)
        theirs, expected = np.asarray(mask.dataobj), np.asarray(ours.dataobj)
        assert theirs.shape == expected.shape == read_volume(source).shape
        np.testing.assert_allclose(mask.affine, ours.affine, atol=1e-4)
        labels = set(np.unique(expected).tolist())
        assert len(labels) >= 2  # the trained head's structures, not one constant
        np.testing.assert_array_equal(theirs, expected, err_msg=name)
        seen |= labels
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz")) == sorted(
        f"{n}_seg.nii.gz" for n in ORIENTATIONS
    )


def test_verify_net_in_out_and_ckpt_export_work_and_model_ts_matches(made, seg_bundle, tmp_path):
    """MONAI's checks of the network's input/output and its TorchScript export; the
    model.ts the exporter wrote and the one ckpt_export writes both load and give the
    eager network's logits on a new input."""
    bundle, result = seg_bundle
    monai_bundle(
        "verify_net_in_out", "network_def", "--config_file", "configs/inference.json",
        "--meta_file", "configs/metadata.json", cwd=bundle,
    )
    exported = tmp_path / "exported.ts"
    monai_bundle(
        "ckpt_export", "network_def", "--filepath", str(exported), "--ckpt_file", "models/model.pt",
        "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json", "--use_trace", "True",
        cwd=bundle,
    )
    # The tiny encoder's 4x4x4-token grid is one attention tile: tracing works.
    assert result.torchscript and (bundle / "models/model.ts").is_file()
    net = volumevlm.load(made["seg"]).head("segmentation").eval()
    x = torch.rand(1, 1, 32, 32, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = net(x)
        for path in (bundle / "models/model.ts", exported):
            traced = torch.jit.load(str(path))
            torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-5)
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    assert meta["volumevlm"]["torchscript"].startswith("model.ts traced at input [1, 1, 32, 32, 16]")
    state = torch.load(bundle / "models/model.pt", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_tracing_a_block_sparse_encoder_gives_the_eager_logits(tmp_path):
    """A grid of 4x1x1 attention tiles (window 1: the end tiles never meet), i.e. the
    block-sparse torch path, not dense attention: sparse_attention calls the torch path
    directly without gradients, so tracing records it and the traced module gives the
    eager logits on a new input."""
    encoder = EncoderConfig(image_size=(64, 16, 16), patch_size=(4, 4, 4), dim=16, depth=1, heads=2, num_registers=1)
    segmentation = SegmentationConfig(num_classes=3, label_names={0: "background", 1: "liver", 2: "spleen"},
                                      feature_size=4, roi_size=(64, 16, 16))
    net = SegmentationNetwork(encoder.to_dict(), segmentation.to_dict()).eval()
    assert net.encoder.layouts(encoder.grid())[0].density < 1.0
    result = trace_network(net, [1, 1, 64, 16, 16])
    assert result.module is not None, result.note
    x = torch.rand(1, 1, 64, 16, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), net(x), rtol=1e-5, atol=1e-5)


def test_embedding_bundle_writes_the_models_embeddings(made, tmp_path):
    """--task embedding: the network returns [B, E] (MONAI's verify passes), and the
    bundle's run writes one row per file equal to model.encode_image of the
    preprocessed file."""
    from monai.bundle import verify_net_in_out

    bundle = tmp_path / "embed_bundle"
    assert cli_main(["export-bundle", "--checkpoint", str(made["seg"]), "--out", str(bundle), "--task", "embedding"]) == 0
    assert check_bundle(bundle) == []
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 16
    assert meta["eval_metrics"] == {}  # the pretraining record holds no val/ figures here
    verify_net_in_out(
        net_id="network_def", meta_file=str(bundle / "configs/metadata.json"),
        config_file=str(bundle / "configs/inference.json"), device="cpu",
    )
    out = tmp_path / "emb"
    monai_bundle(
        "run", "--config_file", "configs/inference.json", "--meta_file", "configs/metadata.json",
        "--dataset_dir", str(made["data"]), "--output_dir", str(out), cwd=bundle,
    )
    with open(out / EMBEDDINGS_CSV, newline="") as fh:
        rows = {row[0]: np.array([float(v) for v in row[1:]]) for row in csv.reader(fh)}
    assert len(rows) == len(ORIENTATIONS)
    model = volumevlm.load(made["seg"])
    for name in ORIENTATIONS:
        path = made["data"] / f"{name}.nii.gz"
        with torch.no_grad():
            expected = model.encode_image(volumevlm.preprocess(path, model.preprocess).as_tensor()[None])[0].numpy()
        np.testing.assert_allclose(rows[str(path)], expected, atol=1e-5)
        assert abs(np.linalg.norm(rows[str(path)]) - 1.0) < 1e-5


# ---------------------------------------------------------------------- command line and errors


def test_cli_errors_are_one_line_and_check_reports_a_broken_bundle(made, seg_bundle, tmp_path, capsys):
    # No segmentation head: the one-line recipe, and nothing written.
    target = tmp_path / "no_head"
    assert cli_main(["export-bundle", "--checkpoint", str(made["plain"]), "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no segmentation head" in err and "experiment=segment_demo" in err
    assert not target.exists()
    # A non-empty folder that is not a bundle is never replaced.
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(VolumeVLMError, match="is not a MONAI bundle"):
        export_bundle(made["seg"], occupied)
    assert (occupied / "keep.txt").read_text() == "mine"
    # Without TorchScript: no model.ts, and metadata and model card say so.
    bare = tmp_path / "bare"
    assert cli_main(["export-bundle", "--checkpoint", str(made["seg"]), "--out", str(bare), "--no-torchscript"]) == 0
    capsys.readouterr()
    assert not (bare / "models/model.ts").exists()
    assert json.loads((bare / "configs/metadata.json").read_text())["volumevlm"]["torchscript"].startswith("model.ts not written")
    assert "No `models/model.ts` in this bundle." in (bare / "docs/README.md").read_text()
    # --check: a complete bundle passes; one missing its weights fails in one line.
    assert cli_main(["export-bundle", "--check", str(bare)]) == 0
    (bare / "models/model.pt").unlink()
    capsys.readouterr()
    assert cli_main(["export-bundle", "--check", str(bare)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.pt: required file missing" in err
