"""The 3D ViT encoder: shapes, geometry of the token order, locality of the sparse
attention, RoPE, checkpointing, named sizes. CPU, small configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from volumevlm.errors import InputError, VolumeVLMError
from volumevlm.models.encoder import EncoderConfig, VolumeEncoder, apply_rope, rope_tables
from volumevlm.models.heads import PhenotypeHead, ProjectionHead
from volumevlm.models.registry import available_sizes, encoder_config


def small_config(**overrides) -> EncoderConfig:
    spec = dict(image_size=(16, 16, 16), patch_size=(2, 2, 2), dim=32, depth=2, heads=2, num_registers=2)
    spec.update(overrides)
    return EncoderConfig(**spec)


def seeded_encoder(config: EncoderConfig) -> VolumeEncoder:
    torch.manual_seed(0)
    return VolumeEncoder(config).eval()


def test_output_shapes_and_multiscale_maps():
    enc = seeded_encoder(small_config(depth=4))
    out = enc(torch.rand(3, 1, 16, 16, 16))
    assert out.grid == (8, 8, 8)
    assert out.pooled.shape == (3, 32) and out.tokens.shape == (3, 512, 32) and out.registers.shape == (3, 2, 32)
    assert [tuple(m.shape) for m in out.feature_maps] == [(3, 32, 8, 8, 8)] * 4
    assert torch.isfinite(out.pooled).all()


def test_inputs_not_a_multiple_of_the_patch_are_zero_padded():
    enc = seeded_encoder(small_config())
    x = torch.rand(1, 1, 15, 13, 9)
    out = enc(x)
    assert out.grid == (8, 7, 5)
    padded = F.pad(x, (0, 1, 0, 1, 0, 1))
    assert torch.allclose(enc(padded).pooled, out.pooled, atol=1e-6)


def test_bad_input_is_one_line_error():
    enc = seeded_encoder(small_config())
    with pytest.raises(InputError) as err:
        enc(torch.rand(1, 16, 16, 16))
    assert "\n" not in str(err.value) and "[B, 1, X, Y, Z]" in str(err.value)
    with pytest.raises(InputError):
        enc(torch.zeros(1, 1, 8, 8, 8, dtype=torch.long))


def _grid_order_reference(enc: VolumeEncoder, x: torch.Tensor) -> torch.Tensor:
    """The encoder re-computed in plain grid order (registers first), with each layer's
    attention as dense softmax under the layout's mask mapped to that order: an
    independent check that the tile order is applied once and consistently."""
    c = enc.config
    feats = enc.patch_embed(x)
    B, C, *grid = feats.shape
    grid = tuple(grid)
    layouts = enc.layouts(grid)
    first = layouts[0]
    R = c.num_registers
    # sequence position of [registers..., grid tokens...] in the layout order
    order = torch.cat([torch.arange(R), first.grid_to_seq])
    tokens = torch.cat([enc.registers.expand(B, -1, -1), feats.flatten(2).transpose(1, 2)], dim=1)
    cos, sin = rope_tables(first.coords[order], c.head_dim, c.rope_base)
    for block, layout in zip(enc.blocks, layouts):
        mask = layout.dense_mask()[order][:, order]
        h = block.norm1(tokens)
        q, k, v = block.attn.qkv(h).view(B, -1, 3, c.heads, c.head_dim).permute(2, 0, 3, 1, 4)
        q, k = block.attn.q_norm(q), block.attn.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        scores = (q @ k.transpose(-1, -2)) / c.head_dim**0.5
        o = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        tokens = tokens + block.attn.proj(o.transpose(1, 2).reshape(B, -1, C))
        tokens = tokens + block.mlp(block.norm2(tokens))
    return enc.norm(tokens)[:, R:]


@pytest.mark.parametrize("patterns", [("local", "dilated"), ("dense", "local")])
def test_tile_order_matches_a_grid_order_dense_reference(patterns):
    enc = seeded_encoder(small_config(layer_patterns=patterns, image_size=(20, 18, 14)))
    x = torch.rand(2, 1, 20, 18, 14)  # grid 10x9x7: padding inside tiles
    with torch.no_grad():
        ours = enc(x).tokens
        ref = _grid_order_reference(enc, x)
    assert torch.allclose(ours, ref, atol=2e-5), (ours - ref).abs().max()


def test_local_attention_is_local():
    """No registers, one local layer: a change in one corner patch reaches only tokens
    whose tile is within one tile of it; far tokens are bit-identical."""
    enc = seeded_encoder(small_config(depth=1, num_registers=0, layer_patterns=("local",), image_size=(32, 32, 32)))
    x = torch.rand(1, 1, 32, 32, 32)
    y = x.clone()
    y[..., :2, :2, :2] += 1.0  # token (0, 0, 0), tile (0, 0, 0)
    with torch.no_grad():
        a, b = enc(x).tokens, enc(y).tokens
    changed = (a - b).abs().amax(dim=-1)[0].reshape(16, 16, 16)
    assert changed[0, 0, 0] > 0
    assert changed[:8, :8, :8].amax() > 0  # tiles 0..1 on each axis can see it
    assert changed[8:].abs().max() == 0 and changed[:, 8:].abs().max() == 0 and changed[:, :, 8:].abs().max() == 0


def test_rope_scores_depend_on_coordinate_differences_only():
    D = 24
    q = torch.randn(1, 1, 1, D).expand(1, 1, 2, D).contiguous()
    k = torch.randn(1, 1, 1, D).expand(1, 1, 2, D).contiguous()
    coords = torch.tensor([[1, 2, 3], [4, 0, 5]])
    shifted = coords + torch.tensor([7, 3, 2])
    scores = []
    for c in (coords, shifted):
        cos, sin = rope_tables(c, D, 100.0)
        qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        scores.append(qr[0, 0, 0] @ kr[0, 0, 1])
    assert torch.allclose(scores[0], scores[1], atol=1e-5)
    cos, sin = rope_tables(torch.tensor([[-1, -1, -1]]), D, 100.0)  # registers/padding: identity
    assert torch.equal(apply_rope(q[:, :, :1], cos, sin), q[:, :, :1])


def test_a_model_runs_on_a_grid_it_was_not_built_for():
    enc = seeded_encoder(small_config())
    out = enc(torch.rand(1, 1, 24, 10, 30))
    assert out.grid == (12, 5, 15) and torch.isfinite(out.pooled).all()


def test_gradient_checkpointing_gives_the_same_gradients():
    config = small_config(depth=3)
    x = torch.rand(2, 1, 16, 16, 16)
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        enc = VolumeEncoder(EncoderConfig(**{**config.to_dict(), "grad_checkpointing": flag})).train()
        enc(x).pooled.square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in enc.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_stochastic_depth_only_in_training():
    enc = seeded_encoder(small_config(drop_path=0.5, depth=4))
    x = torch.rand(4, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(enc(x).pooled, enc(x).pooled)
        enc.train()
        torch.manual_seed(1)
        a = enc(x).pooled
        torch.manual_seed(2)
        b = enc(x).pooled
    assert not torch.allclose(a, b)


def test_named_sizes_and_overrides():
    assert {"tiny", "small", "base"} <= set(available_sizes())
    small = encoder_config("small")
    assert small.image_size == (224, 224, 160) and small.grid() == (14, 14, 20)
    assert encoder_config("base").grid() == (28, 28, 20)
    custom = encoder_config("tiny", patch_size=[4, 4, 4], depth=3)
    assert custom.patch_size == (4, 4, 4) and custom.depth == 3 and custom.name == "tiny"
    assert EncoderConfig.from_dict(custom.to_dict()) == custom
    for bad in (lambda: encoder_config("huge"), lambda: encoder_config("tiny", no_such=1),
                lambda: encoder_config("tiny", dim=30, heads=4),
                lambda: encoder_config("tiny", layer_patterns=["local", "sideways", "local", "local"])):
        with pytest.raises(VolumeVLMError) as err:
            bad()
        assert "\n" not in str(err.value)


def test_heads():
    torch.manual_seed(0)
    proj, phen = ProjectionHead(32, 8), PhenotypeHead(32, 5)
    x = torch.randn(4, 32)
    assert proj(x).shape == (4, 8) and phen(x).shape == (4, 5)
    assert torch.allclose(proj(2 * x), 2 * proj(x), atol=1e-6)  # linear, no bias
    assert PhenotypeHead(32, 0)(x).shape == (4, 0)  # an empty phecode vocabulary still runs


def _token_mean(out) -> torch.Tensor:
    """The pooled embedding before its norm: mean of tokens and mean of registers, halved."""
    return 0.5 * (out.tokens.mean(dim=1) + out.registers.mean(dim=1))


def test_pooled_norm_none_is_the_plain_mean_of_tokens_and_registers():
    enc = seeded_encoder(small_config(pooled_norm="none"))
    out = enc(torch.rand(2, 1, 16, 16, 16))
    torch.testing.assert_close(out.pooled, _token_mean(out))


def test_pooled_batch_norm_standardizes_the_batch_and_tracks_running_statistics():
    enc = seeded_encoder(small_config(pooled_norm="batch")).train()
    out = enc(torch.rand(6, 1, 16, 16, 16))
    raw = _token_mean(out).detach()
    expected = (raw - raw.mean(0)) / torch.sqrt(raw.var(0, unbiased=False) + enc.pooled_norm.eps)
    torch.testing.assert_close(out.pooled.detach(), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(enc.pooled_norm.running_mean, 0.1 * raw.mean(0), atol=1e-5, rtol=1e-4)
    # In eval mode the running statistics apply, so one case's embedding does not
    # depend on what else is in its batch.
    enc.eval()
    x = torch.rand(3, 1, 16, 16, 16)
    torch.testing.assert_close(enc(x[:1]).pooled, enc(x).pooled[:1], atol=1e-5, rtol=1e-4)


def test_a_training_batch_of_one_uses_and_updates_the_running_statistics():
    enc = seeded_encoder(small_config(pooled_norm="batch")).train()
    norm = enc.pooled_norm
    norm.running_mean.fill_(0.25)
    norm.running_var.fill_(4.0)
    out = enc(torch.rand(1, 1, 16, 16, 16))
    raw = _token_mean(out).detach()
    torch.testing.assert_close(out.pooled.detach(), (raw - 0.25) / torch.sqrt(torch.tensor(4.0 + norm.eps)))
    torch.testing.assert_close(norm.running_mean, 0.25 + 0.1 * (raw[0] - 0.25))
    assert int(norm.num_batches_tracked) == 1
    out.pooled.sum().backward()  # gradients still reach the encoder
    assert enc.patch_embed.weight.grad is not None and enc.patch_embed.weight.grad.abs().sum() > 0


def test_named_sizes_normalize_the_pooled_embedding_and_bad_values_are_refused():
    assert all(encoder_config(name).pooled_norm == "batch" for name in available_sizes())
    assert EncoderConfig.from_dict({"dim": 32, "heads": 2}).pooled_norm == "none"  # configs from before the option
    with pytest.raises(VolumeVLMError, match="pooled_norm"):
        small_config(pooled_norm="layer")


def test_hu_windows_rewindow_the_preprocessed_input_by_hand():
    from volumevlm.models.encoder import HUWindows

    hu = torch.tensor([-1000.0, -500.0, -160.0, 0.0, 40.0, 240.0, 600.0, 1000.0])
    x = ((hu + 1000.0) / 2000.0).view(1, 1, -1, 1, 1)  # the preprocessing's [-1000, 1000] -> [0, 1]
    out = HUWindows(((-1000.0, 1000.0), (-160.0, 240.0), (150.0, 1000.0)), (-1000.0, 1000.0))(x)
    expected = torch.stack([
        (hu + 1000.0) / 2000.0,
        ((hu + 160.0) / 400.0).clamp(0, 1),
        ((hu - 150.0) / 850.0).clamp(0, 1),
    ]).view(1, 3, -1, 1, 1)
    assert out.shape == (1, 3, 8, 1, 1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_input_windows_feed_one_embedding_channel_each_and_survive_a_round_trip():
    config = encoder_config("tiny", input_windows=[[-1000, 1000], [-160, 240]], image_size=(32, 32, 12))
    encoder = VolumeEncoder(config)
    assert encoder.patch_embed.in_channels == 2 and config.in_channels == 1
    out = encoder(torch.rand(2, 1, 32, 32, 12))
    assert out.pooled.shape == (2, encoder.embed_dim)
    assert EncoderConfig.from_dict(config.to_dict()) == config
    # The patch embedding sees exactly the windowed channels.
    seen = {}
    encoder.patch_embed.register_forward_hook(lambda module, args, output: seen.update(x=args[0]))
    x = torch.rand(1, 1, 32, 32, 12)
    encoder(x)
    torch.testing.assert_close(seen["x"][:, 1], ((x[:, 0] * 2000 - 1000 + 160) / 400).clamp(0, 1), atol=1e-5, rtol=0)
    with pytest.raises(VolumeVLMError, match="low < high"):
        encoder_config("tiny", input_windows=[[240, -160]])
    with pytest.raises(VolumeVLMError, match="in_channels"):
        encoder_config("tiny", input_windows=[[-160, 240]], in_channels=2)
    with pytest.raises(VolumeVLMError, match="HU pairs"):
        encoder_config("tiny", input_windows=[[-160]])


def test_rope_tables_are_built_once_per_grid_and_device(monkeypatch):
    import volumevlm.models.encoder as encoder_module

    built = []
    original = encoder_module.rope_tables
    monkeypatch.setattr(encoder_module, "rope_tables", lambda *a: built.append(1) or original(*a))
    enc = seeded_encoder(small_config())
    x = torch.rand(1, 1, 16, 16, 16)
    first = enc(x).pooled
    assert torch.equal(enc(x).pooled, first) and len(built) == 1
    enc(torch.rand(1, 1, 16, 16, 8))  # another grid: its own tables
    assert len(built) == 2 and len(enc._rope_cache) == 2
    assert not any("rope" in name for name in enc.state_dict())


def test_training_step_reads_nothing_to_the_host(monkeypatch):
    """A training forward + backward of the encoder (sparse local and dilated layers with
    registers and padding) makes no .item() / bool() / .tolist() / .numpy() on any tensor
    after its first step: on CUDA each would be a device sync."""
    enc = VolumeEncoder(small_config(image_size=(14, 12, 10), depth=3, tile=(2, 2, 2), drop_path=0.1)).train()
    assert enc.layouts(enc.config.grid())[0].density < 1.0 and enc.layouts(enc.config.grid())[0].has_padding
    x = torch.rand(2, 1, 14, 12, 10)

    def step():
        enc.zero_grad(set_to_none=True)
        out = enc(x)
        (out.pooled.square().mean() + out.tokens.mean()).backward()

    step()
    calls = []
    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _o=original, **k: calls.append(_n) or _o(self, *a, **k))
    step()
    assert calls == [], f"host reads in the encoder's training step: {calls}"


def test_inference_first_then_training_reuses_the_caches():
    """Embedding under inference_mode first (the cached RoPE tables and layout tensors
    are then built there), then a training step: the caches hold normal tensors."""
    enc = VolumeEncoder(small_config(image_size=(10, 12, 14), tile=(2, 2, 2))).train()
    x = torch.rand(2, 1, 10, 12, 14)
    with torch.inference_mode():
        enc(x)
    enc(x).pooled.sum().backward()
    assert enc.patch_embed.weight.grad is not None


def test_compiled_encoder_has_no_graph_breaks_after_a_warm_up_call():
    """After one eager call per grid (which builds the layouts, RoPE tables and masks),
    the whole encoder compiles with fullgraph=True (attention through the registered
    torch op) and gives eager's outputs and gradients."""
    import torch._dynamo

    torch._dynamo.reset()
    cfg = small_config(image_size=(14, 12, 10), depth=3, tile=(2, 2, 2))
    enc = seeded_encoder(cfg).train()
    x = torch.rand(2, 1, 14, 12, 10, generator=torch.Generator().manual_seed(4))
    eager = enc(x)
    (eager.pooled.square().sum() + eager.tokens.mean()).backward()
    want = [p.grad.clone() for p in enc.parameters()]
    enc.zero_grad(set_to_none=True)
    got = torch.compile(enc, backend="aot_eager", fullgraph=True)(x)
    (got.pooled.square().sum() + got.tokens.mean()).backward()
    torch.testing.assert_close(got.pooled, eager.pooled, rtol=1e-5, atol=1e-6)
    for p, w in zip(enc.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-6)
