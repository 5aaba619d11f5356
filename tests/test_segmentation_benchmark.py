"""The segmentation decoder's image path (shapes and skips on grids it was not built for,
old checkpoints), the foreground-centred crops, and benchmarks/segmentation.py (its Dice
against a hand computation, its label fractions, a tiny end-to-end run).

All data is synthetic (hand-made label maps and a tiny ``volumevlm synth`` cohort), NOT
clinical data.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain_helpers import make_cohort, shrunk_config
from volumevlm.errors import VolumeVLMError
from volumevlm.models.encoder import EncoderConfig
from volumevlm.models.segmentation import SegmentationConfig, SegmentationNet, stage_factors

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "segmentation.py"
WINDOWS = ((-1000.0, 1000.0), (-160.0, 240.0), (150.0, 1000.0))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("volumevlm_segmentation_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------- decoder


@pytest.mark.parametrize("patch", [(8, 8, 6), (4, 4, 2), (2, 2, 2)])
def test_image_path_feeds_every_level_at_its_own_grid_for_unseen_input_sizes(patch):
    """Built for 32x32x24, run on grids that are not multiples of the patch: the logits
    keep the input's shape; the conv path's map at each level has the padded grid divided
    by the factors so far, the same grid as the token skip it is added to."""
    enc = EncoderConfig(image_size=(32, 32, 24), patch_size=patch, dim=16, depth=2, heads=2, num_registers=1,
                        input_windows=WINDOWS)
    net = SegmentationNet(enc, SegmentationConfig(feature_size=4, roi_size=(32, 32, 24))).eval()
    factors = stage_factors(patch)
    seen: dict[str, tuple] = {}
    hooks = [net.stem.register_forward_hook(lambda m, i, o: seen.__setitem__("level0", tuple(o.shape)))]
    for level, down in enumerate(net.image_down, start=1):
        hooks.append(down.register_forward_hook(lambda m, i, o, level=level: seen.__setitem__(f"level{level}", tuple(o.shape))))
    for level, skip in enumerate(net.skips, start=1):
        hooks.append(skip.register_forward_hook(lambda m, i, o, level=level: seen.__setitem__(f"token{level}", tuple(o.shape))))
    hooks.append(net.image_bottleneck.register_forward_hook(lambda m, i, o: seen.__setitem__("bottleneck", tuple(o.shape))))
    for shape in [(29, 35, 17), (40, 18, 30)]:
        seen.clear()
        x = torch.rand(2, 1, *shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = net(x)
        assert logits.shape == (2, net.config.num_classes, *shape)
        padded = [s + (-s) % p for s, p in zip(shape, patch)]
        # The stem sees the encoder's HU windows: one channel per window.
        assert seen["level0"] == (2, 4, *padded)
        grid = list(padded)
        for level in range(1, len(factors)):
            grid = [g // f for g, f in zip(grid, factors[level - 1])]
            assert seen[f"level{level}"][2:] == tuple(grid)
            assert seen[f"token{level}"][2:] == tuple(grid)
        tokens = [s // p for s, p in zip(padded, patch)]
        assert seen["bottleneck"] == (2, enc.dim, *tokens)
    for hook in hooks:
        hook.remove()


def test_the_image_path_reaches_the_logits_beside_the_tokens():
    """Zeroing the conv path's contribution below the stem changes the logits: the
    image path's skips are used, not computed and dropped."""
    enc = EncoderConfig(image_size=(16, 16, 16), patch_size=(4, 4, 4), dim=16, depth=1, heads=2, num_registers=0)
    net = SegmentationNet(enc, SegmentationConfig(feature_size=4, roi_size=(16, 16, 16))).eval()
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = net(x)
        for module in net.image_down:
            module[0].weight.zero_()
            module[0].bias.zero_()
        net.image_bottleneck[1].weight.zero_()
        net.image_bottleneck[1].bias.zero_()
        without = net(x)
    assert not torch.allclose(before, without)


def test_a_config_saved_before_the_image_path_rebuilds_the_net_it_was():
    enc = EncoderConfig(image_size=(16, 16, 16), patch_size=(4, 4, 4), dim=16, depth=2, heads=2)
    new = SegmentationNet(enc, SegmentationConfig(feature_size=4, roi_size=(16, 16, 16)))
    assert new.config.image_path and new.config.to_dict()["image_path"] is True
    legacy_dict = new.config.to_dict()
    del legacy_dict["image_path"]
    legacy = SegmentationNet(enc, SegmentationConfig.from_dict(legacy_dict))
    assert not legacy.config.image_path and not hasattr(legacy, "image_down")
    # Its saved weights (no image path, a 1-channel stem) load strictly into the rebuilt net...
    state = legacy.state_dict()
    rebuilt = SegmentationNet(enc, SegmentationConfig.from_dict(legacy_dict))
    rebuilt.load_state_dict(state, strict=True)
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), legacy.eval()(x))
    # ...and are refused by a net with the image path, whose keys differ.
    with pytest.raises(RuntimeError, match="image_down"):
        new.load_state_dict(state, strict=True)
    assert SegmentationConfig.from_dict(new.config.to_dict()).image_path is True


@pytest.mark.parametrize("patch, stages", [((8, 8, 6), 3), ((4, 4, 2), 2), ((16, 16, 8), 3)])
def test_unet_decoder_stem_skips_feed_the_levels_the_stem_reaches_for_unseen_input_sizes(patch, stages):
    """With the unet decoder the skips of the levels the conv stem reaches are the stem's own
    maps (same grid as that level), the other levels keep token skips, the voxel level
    sees the HU windows, and the logits keep any input's shape."""
    from volumevlm.models.encoder import stem_strides

    enc = EncoderConfig(image_size=(32, 32, 24), patch_size=patch, dim=16, depth=2, heads=2, num_registers=1,
                        input_windows=WINDOWS, stem="conv", stem_stages=stages)
    net = SegmentationNet(enc, SegmentationConfig(feature_size=4, roi_size=(32, 32, 24), image_path=False,
                                                  decoder="unet")).eval()
    factors = stage_factors(patch)
    # Which levels the stem reaches, worked out by hand from the strides.
    level_grids, scale = {}, (1, 1, 1)
    for level, factor in enumerate(factors[:-1], start=1):
        scale = tuple(a * b for a, b in zip(scale, factor))
        level_grids[scale] = level
    expected, scale = {}, (1, 1, 1)
    for index, stride in enumerate(stem_strides(patch, stages)[:-1]):
        scale = tuple(a * b for a, b in zip(scale, stride))
        if scale in level_grids:
            expected[level_grids[scale]] = index
    assert net.stem_levels == expected and expected  # every case here shares at least one level
    seen: dict[str, tuple] = {}
    hooks = [net.stem.register_forward_hook(lambda m, i, o: seen.__setitem__("level0_in", tuple(i[0].shape)))]
    for level, skip in enumerate(net.skips, start=1):
        hooks.append(skip.register_forward_hook(
            lambda m, i, o, level=level: seen.__setitem__(f"skip{level}", (tuple(i[0].shape), tuple(o.shape)))))
    for shape in [(29, 35, 17), (40, 18, 30)]:
        seen.clear()
        x = torch.rand(2, 1, *shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = net(x)
            stem_maps = net.encoder(torch.nn.functional.pad(
                x, [0, (-shape[2]) % patch[2], 0, (-shape[1]) % patch[1], 0, (-shape[0]) % patch[0]])).stem_maps
        assert logits.shape == (2, net.config.num_classes, *shape)
        padded = [s + (-s) % p for s, p in zip(shape, patch)]
        assert seen["level0_in"] == (2, len(WINDOWS), *padded)
        grid = list(padded)
        for level in range(1, len(factors)):
            grid = [g // f for g, f in zip(grid, factors[level - 1])]
            read, made = seen[f"skip{level}"]
            assert made[2:] == tuple(grid)
            if level in expected:
                assert read == tuple(stem_maps[expected[level]].shape)
            else:  # a token map
                assert read[1] == enc.dim
    for hook in hooks:
        hook.remove()


def test_the_unet_decoders_stem_skips_reach_the_logits():
    """Zeroing the stem-map skip blocks changes the logits: the stem's maps are used."""
    enc = EncoderConfig(image_size=(16, 16, 16), patch_size=(4, 4, 4), dim=16, depth=1, heads=2, num_registers=0,
                        stem="conv", stem_stages=2)
    net = SegmentationNet(enc, SegmentationConfig(feature_size=4, roi_size=(16, 16, 16), image_path=False,
                                                  decoder="unet")).eval()
    assert net.stem_levels == {1: 0}
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = net(x)
        for parameter in net.skips[0].parameters():
            parameter.zero_()
        without = net(x)
    assert not torch.allclose(before, without)


@pytest.mark.parametrize("patch,stem", [((8, 8, 6), "conv"), ((4, 4, 2), "patch"), ((2, 2, 2), "conv")])
def test_fused_decoder_is_a_unet_whose_bottom_meets_the_token_grid_on_unseen_sizes(patch, stem):
    """decoder=fused on grids that are not multiples of the patch: the logits keep the
    input's shape, each down unit's map has the padded grid divided by the factors so
    far, and the last one (and the bottom) sits on the encoder's token grid, where the
    tokens are added."""
    enc = EncoderConfig(image_size=(32, 32, 24), patch_size=patch, dim=16, depth=1, heads=2, num_registers=1,
                        input_windows=WINDOWS, stem=stem, stem_stages=2)
    net = SegmentationNet(enc, SegmentationConfig(feature_size=4, roi_size=(32, 32, 24), decoder="fused")).eval()
    assert net.config.image_path is False  # the U-Net is the image's path; nothing else to add
    factors = stage_factors(patch)
    seen: dict[str, tuple] = {}
    for level, down in enumerate(net.downs, start=1):
        down.register_forward_hook(lambda m, i, o, level=level: seen.__setitem__(f"level{level}", tuple(o.shape)))
    net.bottom.register_forward_hook(lambda m, i, o: seen.__setitem__("bottom", tuple(o.shape)))
    net.token_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("tokens", tuple(o.shape)))
    for shape in [(29, 35, 17), (40, 18, 30)]:
        x = torch.rand(2, 1, *shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = net(x)
        assert logits.shape == (2, net.config.num_classes, *shape)
        grid = [s + (-s) % p for s, p in zip(shape, patch)]
        for level, factor in enumerate(factors, start=1):
            grid = [g // f for g, f in zip(grid, factor)]
            assert seen[f"level{level}"][2:] == tuple(grid)
        assert seen["bottom"][2:] == seen["tokens"][2:] == tuple(grid)
        assert tuple(grid) == tuple(-(-s // p) for s, p in zip(shape, patch))  # the token grid


def test_fused_decoder_starts_as_a_plain_unet_and_then_reads_the_tokens():
    """The token projection starts at zero, so at initialization the encoder cannot
    change the logits (training starts from the plain U-Net); once the projection is
    nonzero, different encoder weights give different logits; and one optimizer step
    on a real loss moves the projection off zero."""
    enc = EncoderConfig(image_size=(16, 16, 12), patch_size=(4, 4, 3), dim=16, depth=1, heads=2, num_registers=1,
                        input_windows=WINDOWS, stem="conv", stem_stages=2)
    net = SegmentationNet(enc, SegmentationConfig(num_classes=3, label_names={1: "a", 2: "b"}, feature_size=4,
                                                  roi_size=(16, 16, 12), decoder="fused")).eval()
    x = torch.rand(1, 1, 16, 16, 12, generator=torch.Generator().manual_seed(5))

    def logits_with_encoder_scaled(scale: float) -> torch.Tensor:
        state = {k: v.clone() for k, v in net.encoder.state_dict().items()}
        with torch.no_grad():
            for parameter in net.encoder.blocks.parameters():
                parameter.mul_(scale)
            out = net(x)
        net.encoder.load_state_dict(state)
        return out

    assert torch.equal(logits_with_encoder_scaled(1.0), logits_with_encoder_scaled(3.0))
    label = torch.randint(0, 3, (1, 16, 16, 12), generator=torch.Generator().manual_seed(6))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    net.train()
    torch.nn.functional.cross_entropy(net(x), label).backward()
    optimizer.step()
    net.eval()
    assert net.token_proj.weight.abs().sum() > 0
    assert not torch.allclose(logits_with_encoder_scaled(1.0), logits_with_encoder_scaled(3.0))


def test_unet_decoder_refuses_a_patch_encoder_in_one_line():
    enc = EncoderConfig(image_size=(16, 16, 16), patch_size=(4, 4, 4), dim=16, depth=1, heads=2)
    with pytest.raises(VolumeVLMError, match="the unet decoder needs an encoder with a convolutional stem"):
        SegmentationNet(enc, SegmentationConfig(feature_size=4, roi_size=(16, 16, 16), image_path=False, decoder="unet"))
    with pytest.raises(VolumeVLMError, match="image_path applies to the unetr decoder only"):
        SegmentationNet(EncoderConfig(image_size=(16, 16, 16), patch_size=(4, 4, 4), dim=16, depth=1, heads=2,
                                      stem="conv", stem_stages=2),
                        SegmentationConfig(feature_size=4, roi_size=(16, 16, 16), image_path=True, decoder="unet"))
    with pytest.raises(VolumeVLMError, match="decoder must be one of"):
        SegmentationConfig(image_path=False, decoder="unet++")
    # A config saved before the option rebuilds the UNETR decoder it had.
    saved = SegmentationConfig(image_path=False).to_dict()
    del saved["decoder"]
    assert SegmentationConfig.from_dict(saved).decoder == "unetr"


def test_foreground_crops_are_centred_on_a_present_structure():
    from volumevlm.train.segment import SegmentationModule

    enc = EncoderConfig(image_size=(16, 16, 16), patch_size=(4, 4, 4), dim=16, depth=1, heads=2)
    net = SegmentationNet(enc, SegmentationConfig(feature_size=4, roi_size=(16, 16, 16)))
    label = torch.zeros(40, 40, 20, dtype=torch.long)
    label[30:33, 5:7, 15:17] = 4  # a small structure far from the centre
    module = SegmentationModule(net, crop_size=(8, 8, 8), foreground_crop=1.0)
    torch.manual_seed(0)
    for _ in range(20):
        start = module.crop_start(label, (8, 8, 8))
        window = label[start[0]:start[0] + 8, start[1]:start[1] + 8, start[2]:start[2] + 8]
        assert window.shape == (8, 8, 8) and bool((window == 4).any())
    uniform = SegmentationModule(net, crop_size=(8, 8, 8), foreground_crop=0.0)
    hits = 0
    for _ in range(50):
        start = uniform.crop_start(label, (8, 8, 8))
        hits += bool((label[start[0]:start[0] + 8, start[1]:start[1] + 8, start[2]:start[2] + 8] == 4).any())
    assert hits < 25
    with pytest.raises(VolumeVLMError, match="foreground_crop"):
        SegmentationModule(net, foreground_crop=1.5)


# ---------------------------------------------------------------------- benchmark


def test_benchmark_dice_and_hd95_equal_a_hand_computation(bench):
    names = {0: "background", 1: "liver", 2: "spleen", 3: "heart"}
    target = np.zeros((6, 6, 4), dtype=np.int64)
    pred = np.zeros_like(target)
    target[0:2, 0:2, 0:2] = 1  # 8 voxels
    pred[0:2, 0:2, 0:1] = 1    # 4 voxels, all inside: Dice 2*4/12
    pred[4, 4, 0] = 1          # one stray voxel: Dice 2*4/13
    target[3:5, 0:3, 0:1] = 2  # 6 voxels, spleen missed entirely: Dice 0
    # heart in neither: no Dice for it.
    case_a = bench.score_case(pred, target, names, (1.0, 1.0, 1.0))
    assert case_a["dice"] == {"liver": pytest.approx(8 / 13), "spleen": 0.0, "heart": None}
    assert case_a["hd95"]["spleen"] == math.inf and case_a["hd95"]["heart"] is None
    case_b = bench.score_case(target, target, names, (1.0, 1.0, 1.0))
    assert case_b["dice"]["liver"] == 1.0 and case_b["hd95"]["liver"] == 0.0
    summary = bench.summarize([case_a, case_b])
    assert summary["per_label"]["liver"]["dice"] == pytest.approx((8 / 13 + 1.0) / 2)
    assert summary["per_label"]["spleen"]["dice"] == pytest.approx(0.5)
    assert "heart" not in summary["per_label"]
    assert summary["mean_dice"] == pytest.approx(((8 / 13 + 1) / 2 + 0.5) / 2)
    # HD95 averages the finite distances only (the missed spleen has none in case a).
    assert summary["per_label"]["spleen"]["hd95_mm"] == 0.0 and summary["per_label"]["spleen"]["hd95_cases"] == 1
    assert summary["mean_dice_headline"] == pytest.approx(summary["mean_dice"])  # liver and spleen are headline organs


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from volumevlm.train.train import train

    root = tmp_path_factory.mktemp("segbench")
    cohort = make_cohort(root / "cohort")
    _, objects = train(shrunk_config(cohort, root / "pre", "experiment=demo", "debug=fdr"))
    return cohort, Path(objects["model_dir"])


def test_tiny_benchmark_run_trains_both_nets_on_the_stated_share_of_cases(bench, pretrained, tmp_path):
    """The yardstick in one process, ours in a second that merges the first's file (how a
    slow machine splits the run): both at each fraction on the stated share of cases."""
    cohort, checkpoint = pretrained
    rows = [json.loads(line) for line in (cohort / "manifest.jsonl").read_text().splitlines() if line.strip()]
    labelled = [r for r in rows if r.get("split") == "train" and r.get("label")]
    common = ["--checkpoint", str(checkpoint), "--data", str(cohort), "--fractions", "1.0,0.25", "--steps", "1",
              "--eval-cases", "2", "--crop", "16,16,16", "--feature-size", "4", "--threads", "1",
              "--out", str(tmp_path / "results")]
    first = bench.main([*common, "--nets", "unet"])
    partial = sorted((tmp_path / "results").glob("segmentation-cpu-*"))
    assert [f.name.endswith("-unet.json") for f in partial] == [True]  # no plot of half a comparison
    argv = [*common, "--nets", "ours", "--merge", str(partial[0])]
    results = bench.main(argv)
    runs = results["runs"]
    assert set(runs) == {"ours@1", "unet@1", "ours@0.25", "unet@0.25"}
    assert runs["unet@1"] == first["runs"]["unet@1"]
    for fraction in (1.0, 0.25):
        expected = max(1, math.ceil(fraction * len(labelled)))
        assert runs[f"ours@{fraction:g}"]["train_cases"] == runs[f"unet@{fraction:g}"]["train_cases"] == expected
    for run in runs.values():
        metrics = run["metrics"]
        assert metrics["cases"] == 2
        assert all(0.0 <= v["dice"] <= 1.0 for v in metrics["per_label"].values())
    files = sorted(set((tmp_path / "results").glob("segmentation-cpu-*")) - set(partial))
    assert [f.suffix for f in files] == [".json", ".png"]
    saved = json.loads(files[0].read_text())
    assert saved["command"] == "benchmarks/segmentation.py " + " ".join(argv)
    assert saved["merged_from"] and "--nets unet" in saved["merged_from"][0]
    assert saved["data"]["synthetic"] is True and "NOT clinical" in saved["data"]["note"]
    assert saved["device"].startswith("cpu") and all(saved["versions"][k] for k in ("torch", "monai", "lightning"))
    assert saved["runs"] == json.loads(json.dumps(runs))
    with pytest.raises(SystemExit, match="not comparable"):
        bench.main([*common[:-2], "--steps", "2", "--out", str(tmp_path / "other"), "--merge", str(files[0])])
