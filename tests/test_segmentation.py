"""The segmentation head (issue 5): Dice / HD95 against hand-computed cases, masks
brought back to the input's own geometry (NIfTI stored in several orientations and a
DICOM series), save -> volumevlm.load, and the Hydra ``task=segment`` run.

All data here is synthetic (analytic boxes and a tiny ``volumevlm synth`` cohort), NOT
clinical data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

import volumevlm
from pretrain_helpers import make_cohort, shrunk_config
from volumevlm.data.labels import LABELS
from volumevlm.data.transforms import PreprocessConfig
from volumevlm.errors import InputError, VolumeVLMError
from volumevlm.io import read_volume
from volumevlm.models.encoder import EncoderConfig
from volumevlm.models.segmentation import (
    SegmentationConfig,
    SegmentationNet,
    label_swap_table,
    read_label_names,
    save_segmentation,
    segment_to_input,
    sliding_window_segment,
    stage_factors,
)
from volumevlm.train.cli import run_task
from volumevlm.train.segment import (
    SegmentationDataModule,
    SegmentationModule,
    dice_counts,
    hd95_per_class,
    summarize_dice,
    summarize_hd95,
)
from volumevlm.train.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------- metrics


def test_dice_of_two_cubes_with_known_overlap():
    """Two 4x4x4 cubes (label 1) two voxels apart along X share 2x4x4 = 32 voxels:
    Dice = 2 * 32 / (64 + 64) = 0.5. Label 2 is in neither map (no evidence: left out),
    label 3 only in the target (a miss: Dice 0)."""
    pred = torch.zeros(1, 12, 10, 10, dtype=torch.long)
    target = torch.zeros_like(pred)
    pred[0, 2:6, 2:6, 2:6] = 1
    target[0, 4:8, 2:6, 2:6] = 1
    target[0, 9, 8, 8] = 3
    counts = dice_counts(pred, target, num_classes=4)
    assert counts.shape == (1, 4, 3)
    assert counts[0, 1].tolist() == [32.0, 64.0, 64.0]
    assert counts[0, 2].tolist() == [0.0, 0.0, 0.0]
    assert counts[0, 3].tolist() == [0.0, 0.0, 1.0]
    names = {0: "background", 1: "liver", 2: "spleen", 3: "aorta"}
    summary = summarize_dice(counts, names)
    assert summary["dice_liver"] == pytest.approx(0.5)
    assert summary["dice_aorta"] == 0.0
    assert "dice_spleen" not in summary
    assert summary["mean_dice"] == pytest.approx(0.25)  # (0.5 + 0) / 2
    assert summary["mean_dice_large"] == pytest.approx(0.25)  # liver and aorta are both large organs
    with pytest.raises(ValueError):
        dice_counts(pred, target[:, :-1], num_classes=4)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hd95_of_a_one_voxel_shift_is_that_axis_spacing_in_mm(axis):
    """A 6x6x6 cube and the same cube moved one voxel along ``axis``: the moved face (36
    of the 152 surface voxels, 24 % > 5 %) is one voxel from the other surface, every
    other surface voxel lies on it, so HD95 = the spacing of that axis, in mm."""
    spacing = (0.8, 1.5, 3.0)
    target = torch.zeros(1, 16, 16, 16, dtype=torch.long)
    target[0, 4:10, 4:10, 4:10] = 2
    pred = torch.roll(target, shifts=1, dims=1 + axis)
    hd = hd95_per_class(pred, target, num_classes=3, spacing=spacing)
    assert hd.shape == (1, 3)
    assert math.isnan(hd[0, 0]) and math.isnan(hd[0, 1])  # background; label 1 absent
    assert hd[0, 2].item() == pytest.approx(spacing[axis], abs=1e-6)


def test_hd95_ignores_a_stray_voxel_and_skips_missing_structures():
    """The same cube plus one stray voxel far away: the Hausdorff maximum would be the
    stray's distance, its 95th percentile is 0 (1 of 153 surface voxels). A structure
    missing from the prediction has no distance (NaN; Dice reports the miss)."""
    target = torch.zeros(2, 1, 20, 20, 20, dtype=torch.long)
    target[:, 0, 4:10, 4:10, 4:10] = 1
    target[1, 0, 14:16, 14:16, 14:16] = 2
    pred = target.clone()
    pred[0, 0, 17, 17, 17] = 1
    pred[1][pred[1] == 2] = 0
    hd = hd95_per_class(pred, target, num_classes=3, spacing=(2.0, 2.0, 2.0))
    assert hd[0, 1].item() == 0.0
    assert hd[1, 1].item() == 0.0
    assert math.isnan(hd[1, 2])
    summary = summarize_hd95(hd, {0: "background", 1: "liver", 2: "spleen"})
    assert summary == {"hd95_liver": 0.0, "mean_hd95": 0.0, "mean_hd95_large": 0.0}


def test_left_right_flip_swaps_paired_labels_only():
    table = label_swap_table(LABELS, len(LABELS))
    index = {name: i for i, name in LABELS.items()}
    assert table[index["kidney_left"]] == index["kidney_right"]
    assert table[index["kidney_right"]] == index["kidney_left"]
    assert table[index["lung_left"]] == index["lung_right"]
    for name in ("background", "liver", "spleen", "aorta", "vertebrae"):
        assert table[index[name]] == index[name]


def test_decoder_levels_multiply_back_to_the_patch_size():
    for patch in [(8, 8, 6), (16, 16, 8), (8, 8, 8), (8, 8, 4), (5, 3, 1)]:
        factors = stage_factors(patch)
        assert tuple(int(np.prod([f[a] for f in factors])) for a in range(3)) == patch


# ---------------------------------------------------------------------- geometry

# A bright box (HU 500 in air) off every symmetry plane, in world RAS mm: any flip or
# axis swap on the way in or out moves it visibly.
BOX_CENTRE = np.array([12.0, -8.0, 6.0])
BOX_HALF = np.array([12.0, 9.0, 10.0])
BOX_HU = 500.0
PRE = PreprocessConfig(target_spacing=(2.5, 2.5, 2.5), hu_window=(-1000.0, 1000.0), spatial_size=(32, 32, 32))


def grid_affine(spacing, shape, axcodes: str) -> np.ndarray:
    """Voxel -> RAS mm of an axis-aligned grid centred on the world origin, stored in
    ``axcodes`` order (spacing/shape per stored axis; e.g. "PSL" permutes and flips)."""
    axis_of = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    for stored, code in enumerate(axcodes):
        sign = 1.0 if code in "RAS" else -1.0
        affine[axis_of[code], stored] = sign * spacing[stored]
        affine[axis_of[code], 3] = -sign * spacing[stored] * (shape[stored] - 1) / 2.0
    return affine


def world_coordinates(affine: np.ndarray, shape) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), axis=-1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def box_volume(spacing, shape, axcodes: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(HU float32, true box mask bool, affine) on the grid."""
    affine = grid_affine(spacing, shape, axcodes)
    inside = np.all(np.abs(world_coordinates(affine, shape) - BOX_CENTRE) <= BOX_HALF, axis=-1)
    hu = np.where(inside, BOX_HU, -1000.0).astype(np.float32)
    return hu, inside, affine


class ThresholdNet(nn.Module):
    """A stand-in segmentation net with a known answer: label 1 wherever the
    preprocessed intensity is above the midpoint between air (0) and the box (0.75)."""

    def __init__(self, roi_size=(32, 32, 32)):
        super().__init__()
        self.config = SegmentationConfig(num_classes=2, label_names={0: "background", 1: "liver"}, roi_size=roi_size)
        self.scale = nn.Parameter(torch.tensor(50.0))

    def forward(self, x):
        foreground = self.scale * (x - 0.375)
        return torch.cat([torch.zeros_like(foreground), foreground], dim=1)


def write_dicom_series(folder: Path, hu: np.ndarray, affine: np.ndarray) -> Path:
    """The volume as a CT DICOM series, one file per k slice, written with SimpleITK."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    direction = lps[:3, :3] / spacing
    image = sitk.GetImageFromArray(np.transpose(np.rint(hu).astype(np.int16), (2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    image.SetDirection([float(v) for v in direction.reshape(-1)])
    folder.mkdir(parents=True)
    series_uid = "1.2.826.0.1.3680043.8.498.1"
    orientation = "\\".join(f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_k = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.8.498.2",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": orientation,
            "0018|0050": f"{spacing[2]:.6f}",
            "0028|1052": "0",
            "0028|1053": "1",
        }
        for tag, value in tags.items():
            slice_k.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
        writer.Execute(slice_k)
    return folder


def centroid_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return world_coordinates(affine, mask.shape)[mask.astype(bool)].mean(axis=0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


GEOMETRIES = {
    # name: (spacing per stored axis, shape per stored axis, stored axis codes)
    "RAS": ((2.0, 2.5, 3.0), (40, 32, 24), "RAS"),
    "LPS": ((2.0, 2.5, 3.0), (40, 32, 24), "LPS"),
    "PSL permuted": ((2.5, 3.0, 2.0), (32, 24, 40), "PSL"),
}


@pytest.mark.parametrize("stored_as", [*GEOMETRIES, "DICOM series"])
def test_mask_lands_on_the_box_in_the_inputs_own_geometry(stored_as, tmp_path):
    """The mask comes back with the input's shape, affine and voxel order, and covers
    the box where the input has it (world centroid within 1 mm, Dice >= 0.9 against the
    box's voxels), whatever the stored orientation or file format."""
    spacing, shape, axcodes = GEOMETRIES.get(stored_as, GEOMETRIES["LPS"])
    hu, truth, affine = box_volume(spacing, shape, axcodes)
    if stored_as == "DICOM series":
        path = write_dicom_series(tmp_path / "series", hu, affine)
    else:
        path = tmp_path / "ct.nii.gz"
        image = nib.Nifti1Image(hu, affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        nib.save(image, str(path))
    volume = read_volume(path)
    if stored_as == "DICOM series":
        assert volume.meta["format"] == "dicom"
        truth = np.all(np.abs(world_coordinates(volume.affine, volume.shape) - BOX_CENTRE) <= BOX_HALF, axis=-1)
    assert truth.sum() > 400

    mask, names = segment_to_input(ThresholdNet(), path, PRE)
    assert isinstance(mask, nib.Nifti1Image)
    assert mask.shape == volume.shape
    np.testing.assert_allclose(mask.affine, volume.affine, atol=1e-4)
    assert names == {0: "background", 1: "liver"}
    labels = np.asarray(mask.dataobj)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 1}
    assert dice(labels == 1, truth) >= 0.9
    np.testing.assert_allclose(centroid_mm(labels == 1, mask.affine), BOX_CENTRE, atol=1.0)
    # The file's label names travel in its header; the input is untouched.
    out = save_segmentation(mask, tmp_path / "mask.nii.gz")
    reread = nib.load(str(out))
    assert read_label_names(out) == names
    assert int(reread.header["intent_code"]) == 1002  # NIFTI_INTENT_LABEL
    np.testing.assert_array_equal(np.asarray(reread.dataobj), labels)
    np.testing.assert_allclose(read_volume(path).array, volume.array)


def test_the_mask_covers_the_whole_input_not_only_the_encoders_centre_crop():
    """A box in a corner of a volume far larger than spatial_size * target_spacing
    (30 mm here, the volume 80 x 80 x 72 mm) is still found: segmentation runs on the
    whole resampled input (whole_field), not on the centre crop the encoder reads."""
    affine = grid_affine((2.0, 2.5, 3.0), (40, 32, 24), "LPS")
    hu = np.full((40, 32, 24), -1000.0, np.float32)
    truth = np.zeros(hu.shape, bool)
    truth[1:11, 1:9, 1:8] = True  # about 20 x 20 x 21 mm, every side outside the centre 30 mm
    hu[truth] = BOX_HU
    pre = PreprocessConfig(target_spacing=(2.5, 2.5, 2.5), hu_window=(-1000.0, 1000.0), spatial_size=(12, 12, 12))
    centre = np.all(np.abs(world_coordinates(affine, hu.shape) - world_coordinates(affine, hu.shape).mean(axis=(0, 1, 2)))
                    <= 15.0, axis=-1)
    assert not (truth & centre).any()  # the box lies wholly outside the crop's field of view
    mask, _ = segment_to_input(ThresholdNet(roi_size=(16, 16, 16)), (hu, affine), pre)
    labels = np.asarray(mask.dataobj)
    assert mask.shape == hu.shape
    assert dice(labels == 1, truth) >= 0.85


def test_the_real_net_returns_a_mask_in_the_input_geometry_for_any_input_size(tmp_path):
    """SegmentationNet itself (random weights) through segment_to_input: the output has
    the input's shape and affine for an input larger than the ROI in one axis and
    smaller in the others (sliding windows plus padding), with the training label
    indices and names."""
    encoder = EncoderConfig(image_size=(16, 16, 16), patch_size=(4, 4, 4), dim=16, depth=2, heads=2, num_registers=1)
    net = SegmentationNet(encoder, SegmentationConfig(feature_size=4, roi_size=(16, 16, 16)))
    hu, _, affine = box_volume((2.0, 2.5, 3.0), (40, 32, 24), "LPS")
    pre = PreprocessConfig(target_spacing=(2.0, 4.0, 6.0), spatial_size=(40, 12, 10))
    mask, names = segment_to_input(net, (hu, affine), pre)
    assert mask.shape == hu.shape
    np.testing.assert_allclose(mask.affine, affine, atol=1e-6)
    assert names == LABELS
    assert set(np.unique(np.asarray(mask.dataobj))) <= set(LABELS)
    assert read_label_names(mask) == LABELS
    # Sliding windows cover a 40-voxel axis with a 16-voxel ROI and keep its size.
    out = sliding_window_segment(net.eval(), torch.rand(1, 40, 12, 10))
    assert out.shape == (1, 40, 12, 10) and out.dtype == torch.long
    with pytest.raises(InputError):
        sliding_window_segment(net, torch.rand(2, 8, 8, 8))
    with pytest.raises(InputError, match="no volumevlm label-name extension"):
        read_label_names(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)))


def test_frozen_encoder_stays_fixed_while_the_decoder_learns_the_box():
    """A few Dice+CE steps on one box volume: the loss falls, decoder weights move and,
    with freeze_encoder, the encoder's do not."""
    torch.manual_seed(0)
    encoder = EncoderConfig(image_size=(16, 16, 16), patch_size=(4, 4, 4), dim=16, depth=2, heads=2, num_registers=1)
    net = SegmentationNet(encoder, SegmentationConfig(num_classes=2, label_names={0: "background", 1: "liver"},
                                                      feature_size=4, roi_size=(16, 16, 16)))
    module = SegmentationModule(net, optimizer={"lr": 1e-2, "warmup_steps": 0}, freeze_encoder=True)
    module.train()
    assert not net.encoder.training and net.out.training  # a frozen encoder keeps its inference mode
    image = torch.zeros(2, 1, 16, 16, 16)
    image[:, :, 3:11, 5:13, 4:9] = 0.75
    batch = {"image": image, "label": (image > 0.375).long()}
    optimizer = module.configure_optimizers()["optimizer"]
    encoder_before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    decoder_before = net.out.conv.conv.weight.detach().clone()
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0] and losses == sorted(losses, reverse=True)
    assert all(torch.equal(v, net.encoder.state_dict()[k]) for k, v in encoder_before.items())
    assert not torch.equal(decoder_before, net.out.conv.conv.weight)
    assert all(not p.requires_grad for p in net.encoder.parameters())


# ---------------------------------------------------------------------- checkpoint and training


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(cohort, checkpoint dir): a tiny synthetic cohort (NOT clinical data) and a model
    pretrained on it for one fast_dev_run step, composed from the real configs."""
    root = tmp_path_factory.mktemp("seg")
    cohort = make_cohort(root / "cohort")
    cfg = shrunk_config(cohort, root / "pre", "experiment=demo", "debug=fdr")
    _, objects = train(cfg)
    return cohort, Path(objects["model_dir"])


def test_a_checkpoint_without_the_head_says_how_to_train_one(pretrained):
    _, checkpoint = pretrained
    model = volumevlm.load(checkpoint)
    assert not model.has_head("segmentation")
    with pytest.raises(VolumeVLMError) as err:
        model.head("segmentation")
    message = str(err.value)
    assert "\n" not in message
    assert str(checkpoint) in message and "no segmentation head" in message
    assert "experiment=segment_demo" in message


def test_save_and_load_give_identical_segmentation_logits(pretrained, tmp_path):
    _, checkpoint = pretrained
    model = volumevlm.load(checkpoint)
    x = torch.rand(2, 1, *model.preprocess.spatial_size, generator=torch.Generator().manual_seed(1))
    embedding = model.encode_image(x)
    config = SegmentationConfig(feature_size=4, roi_size=model.encoder_config.image_size)
    net = SegmentationNet.from_encoder(model.encoder, config).eval()
    with torch.no_grad():  # the copy is the head's own: training it leaves model.encoder alone
        net.encoder.registers.add_(1.0)
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert not torch.equal(net.encoder.registers, model.encoder.registers)
    model.attach_head("segmentation", net)
    saved = model.save_pretrained(tmp_path / "with_head")
    loaded = volumevlm.load(saved)
    head = loaded.head("segmentation")
    assert isinstance(head, SegmentationNet) and not head.training
    assert head.config.to_dict() == net.config.to_dict()
    assert head.label_names == LABELS
    with torch.no_grad():
        assert torch.equal(head(x), net(x))
        assert torch.equal(loaded.encode_image(x), embedding)
    entry = json.loads((saved / "config.json").read_text())["heads"]["segmentation"]
    assert entry["type"] == "segmentation" and entry["config"]["segmentation"]["feature_size"] == 4


def test_label_fraction_keeps_the_first_share_of_labelled_training_cases(pretrained):
    cohort, checkpoint = pretrained
    preprocess = volumevlm.load(checkpoint).preprocess
    labelled = [json.loads(line) for line in (cohort / "manifest.jsonl").read_text().splitlines() if line.strip()]
    labelled = [row["id"] for row in labelled if row.get("split") == "train" and row.get("label")]
    assert len(labelled) >= 4
    for fraction in (0.25, 0.5, 1.0):
        datamodule = SegmentationDataModule(cohort, preprocess, label_fraction=fraction)
        datamodule.setup()
        expected = max(1, math.ceil(fraction * len(labelled)))
        assert [row["id"] for row in datamodule.train_rows] == labelled[:expected]
        assert datamodule.labelled_train_cases == len(labelled)
    tiny = SegmentationDataModule(cohort, preprocess, label_fraction=1e-6)
    tiny.setup()
    assert len(tiny.train_rows) == 1
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(InputError, match="label_fraction"):
            SegmentationDataModule(cohort, preprocess, label_fraction=bad)


def test_segment_task_from_the_real_configs_attaches_the_head(pretrained, tmp_path):
    """``volumevlm train task=segment experiment=segment_demo init_from=... debug=fdr``:
    one step on the synthetic cohort; the checkpoint it writes loads with the head, gives
    the trained net's logits and keeps the pretrained model's preprocessing."""
    cohort, checkpoint = pretrained
    out = tmp_path / "seg"
    cfg = shrunk_config(
        cohort, out, "task=segment", "experiment=segment_demo", f"init_from={checkpoint}", "debug=fdr",
        "segmentation.feature_size=4", "segmentation.crop_size=[16,16,16]", "segmentation.label_fraction=0.5",
        "segmentation.flip_axes=[0,1]",
    )
    assert cfg.task == "segment"
    metrics, objects = run_task(cfg)
    assert objects["trainer"].global_step == 1
    assert math.isfinite(metrics["train/loss"])
    datamodule = objects["datamodule"]
    assert len(datamodule.train_rows) == math.ceil(0.5 * datamodule.labelled_train_cases)
    pretrained_model = volumevlm.load(checkpoint)
    assert datamodule.preprocess == pretrained_model.preprocess
    model_dir = Path(objects["model_dir"])
    assert model_dir == (out / "model").resolve()
    loaded = volumevlm.load(model_dir)
    head = loaded.head("segmentation")
    x = torch.rand(1, 1, *loaded.preprocess.spatial_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(head(x), objects["net"].eval()(x))
        # The pretrained part of the model is carried over unchanged.
        assert torch.equal(loaded.encode_image(x), pretrained_model.encode_image(x))
    config = json.loads((model_dir / "config.json").read_text())
    assert config["heads"]["segmentation"]["config"]["segmentation"]["label_names"]["1"] == "liver"
    provenance = config["provenance"]["heads"]["segmentation"]
    assert provenance["synthetic"] is True and provenance["label_fraction"] == 0.5
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["task"] == "segment" and summary["data"]["train_cases"] == len(datamodule.train_rows)
    # The shipped decoder is the fused U-Net, and a setting that does not apply to it is
    # refused in one line rather than ignored.
    assert head.config.decoder == "fused" and head.config.roi_size == (80, 80, 48)
    bad = shrunk_config(cohort, tmp_path / "bad", "task=segment", "experiment=segment_demo", f"init_from={checkpoint}",
                        "debug=fdr", "segmentation.image_path=true")
    with pytest.raises(VolumeVLMError, match="segmentation.image_path: applies to decoder=unetr only") as err:
        run_task(bad)
    assert "\n" not in str(err.value)
