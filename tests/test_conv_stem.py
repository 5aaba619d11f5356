"""The encoder's convolutional stem (``EncoderConfig.stem="conv"``): strides and shapes,
the stem's forward against a reference written here with torch.nn.functional, a grid it
was not built for, checkpoints (old ones load as the patch embedding, a stem round-trips,
mismatched weights are refused in one line), and the MONAI bundle's network."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from volumevlm.errors import VolumeVLMError
from volumevlm.models.encoder import ConvStem, EncoderConfig, VolumeEncoder, stem_channels, stem_strides
from volumevlm.models.registry import encoder_config


def test_stem_strides_multiply_to_the_patch_and_channels_grow_to_the_width():
    assert stem_strides((8, 8, 6), 3) == [(2, 2, 2), (2, 2, 3), (2, 2, 1)]
    assert stem_strides((16, 16, 8), 3) == [(2, 2, 2), (2, 2, 2), (4, 4, 2)]
    assert stem_strides((4, 4, 4), 1) == [(4, 4, 4)]
    for patch in ((8, 8, 6), (16, 16, 8), (6, 10, 9)):
        for stages in (1, 2, 3, 4):
            strides = stem_strides(patch, stages)
            assert len(strides) == stages
            assert tuple(int(torch.tensor([s[a] for s in strides]).prod()) for a in range(3)) == patch
    assert stem_channels(64, 3) == [16, 32, 64] and stem_channels(384, 4) == [48, 96, 192, 384]
    with pytest.raises(VolumeVLMError, match="stem"):
        EncoderConfig(stem="resnet")
    with pytest.raises(VolumeVLMError, match="stem_stages"):
        EncoderConfig(stem="conv", stem_stages=0)


def test_every_named_size_takes_the_stem_and_gives_its_token_grid_and_finer_maps():
    for name in ("tiny", "small", "base"):
        config = encoder_config(name, stem="conv")
        assert config.stem == "conv" and config.name == name
    torch.manual_seed(0)
    encoder = VolumeEncoder(encoder_config("tiny", stem="conv", input_windows=[[-1000, 1000], [-160, 240]])).eval()
    with torch.no_grad():
        out = encoder(torch.rand(2, 1, 96, 96, 48))
    assert out.grid == (12, 12, 8) and out.tokens.shape == (2, 12 * 12 * 8, 64) and out.pooled.shape == (2, 64)
    assert [tuple(m.shape) for m in out.stem_maps] == [(2, 16, 48, 48, 24), (2, 32, 24, 24, 8)]
    assert [tuple(m.shape) for m in out.feature_maps] == [(2, 64, 12, 12, 8)] * len(encoder.config.feature_layers())
    # the patch embedding keeps its single convolution and has no stem maps
    patch = VolumeEncoder(encoder_config("tiny")).eval()
    assert isinstance(patch.patch_embed, torch.nn.Conv3d)
    with torch.no_grad():
        assert patch(torch.rand(1, 1, 96, 96, 48)).stem_maps == []


def _stem_reference(stem: ConvStem, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The stem written out: conv (padding kernel // 2), GroupNorm, exact GELU per stage."""
    maps = []
    for stage in stem.stages:
        conv, norm = stage.conv, stage.norm
        x = F.conv3d(x, conv.weight, None, stride=conv.stride, padding=[k // 2 for k in conv.kernel_size])
        x = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, eps=norm.eps)
        x = 0.5 * x * (1.0 + torch.erf(x / 2 ** 0.5))
        maps.append(x)
    proj = stem.proj
    return F.conv3d(x, proj.weight, proj.bias, stride=proj.stride, padding=[k // 2 for k in proj.kernel_size]), maps


def test_stem_only_forward_matches_a_reference():
    torch.manual_seed(1)
    stem = ConvStem(in_channels=2, dim=24, patch_size=(4, 4, 6), stages=3).eval()
    with torch.no_grad():  # non-trivial norm parameters, so the reference checks them too
        for stage in stem.stages:
            stage.norm.weight.uniform_(0.5, 1.5)
            stage.norm.bias.uniform_(-0.2, 0.2)
        x = torch.randn(2, 2, 16, 12, 18)
        tokens, maps = stem.forward_features(x)
        expected, expected_maps = _stem_reference(stem, x)
    assert tokens.shape == (2, 24, 4, 3, 3)
    assert torch.allclose(tokens, expected, atol=1e-5)
    for got, want in zip(maps, expected_maps, strict=True):
        assert torch.allclose(got, want, atol=1e-5)
    # kernels: max(3, 2s - 1) per axis; strides as planned
    assert [s.conv.stride for s in stem.stages] + [stem.proj.stride] == stem_strides((4, 4, 6), 3)
    assert stem.proj.kernel_size == (3, 3, 3) and stem.stages[1].conv.kernel_size == (3, 3, 5)


def test_a_grid_the_stem_was_not_built_for_is_padded_to_whole_patches():
    torch.manual_seed(2)
    config = encoder_config("tiny", stem="conv")
    encoder = VolumeEncoder(config).eval()
    x = torch.rand(1, 1, 80, 72, 40)  # built for 96x96x48; 40 is not a multiple of 6
    with torch.no_grad():
        out = encoder(x)
        padded_tokens, _ = encoder.patch_embed.forward_features(F.pad(x, (0, 2, 0, 0, 0, 0)))
    assert out.grid == (10, 9, 7) and out.tokens.shape == (1, 630, 64)
    assert [tuple(m.shape[2:]) for m in out.stem_maps] == [(40, 36, 21), (20, 18, 7)]
    assert torch.isfinite(out.pooled).all()
    # the encoder's zero padding, then the stem: what the tokens were made from
    assert padded_tokens.shape[2:] == (10, 9, 7)


def test_checkpoints_old_ones_load_a_stem_round_trips_and_mismatched_weights_are_refused(tmp_path):
    import volumevlm
    from pretrain_helpers import make_cohort, shrunk_config
    from volumevlm.train.train import build

    old = encoder_config("tiny").to_dict()
    for key in ("stem", "stem_stages"):  # a config.json written before the stem existed
        old.pop(key)
    assert EncoderConfig.from_dict(old).stem == "patch"

    cohort = make_cohort(tmp_path / "cohort")
    _, module = build(shrunk_config(cohort, tmp_path / "out", "data.cache=false", "model.encoder.stem=conv",
                                    "model.encoder.stem_stages=2"))
    model = module.model.eval()
    directory = model.save_pretrained(tmp_path / "model")
    loaded = volumevlm.load(directory)
    assert loaded.encoder_config.stem == "conv" and isinstance(loaded.encoder.patch_embed, ConvStem)
    x = torch.rand(2, 1, 32, 32, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), loaded.encode_image(x))

    # a config that says "patch" over the stem's weights: refused in one line
    import json

    config = json.loads((directory / "config.json").read_text())
    config["encoder"]["stem"] = "patch"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(VolumeVLMError) as err:
        volumevlm.load(directory)
    assert "\n" not in str(err.value) and "model.safetensors" in str(err.value)


def test_the_bundle_embedding_network_carries_the_stem():
    from volumevlm.export.bundle import EmbeddingNetwork

    config = replace(encoder_config("tiny", stem="conv"), image_size=(32, 32, 24))
    net = EmbeddingNetwork(config.to_dict(), embed_dim=16, input_size=(32, 32, 24)).eval()
    assert isinstance(net.encoder.patch_embed, ConvStem)
    with torch.no_grad():
        out = net(torch.rand(1, 1, 32, 32, 24))
    assert out.shape == (1, 16) and torch.allclose(out.norm(dim=-1), torch.ones(1), atol=1e-5)
