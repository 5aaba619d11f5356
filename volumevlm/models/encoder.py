"""The 3D CT image encoder: a ViT over patch tokens with block-sparse 3D attention.

::

    x [B, 1, X, Y, Z]  (preprocessed CT in [0, 1]; any size, zero-padded up to a
                        multiple of the patch size)
      -> optional HU windows (``input_windows``): the input re-windowed into one
         channel per (low, high) HU window, as a radiologist switches windows
      -> Conv3d patch embedding                       -> grid tokens [B, gx*gy*gz, C]
      -> + register tokens, put into the layout's tile order ONCE
      -> depth x Block(norm -> attention -> norm -> MLP), tokens stay in tile order;
         attention = volumevlm.ops.sparse_attention over the layer's pattern:
           "local"    3x3x3 tiles around each tile (window 1)
           "dilated"  the same window with a 2-tile stride (reaches 4x farther)
           "dense"    every token
         positions enter as 3D rotary embeddings (RoPE) of each token's grid
         coordinate, so a model trained at one grid runs at another
      -> pooled = mean of tokens and registers, batch-normed (PooledBatchNorm)
      -> EncoderOutput: pooled [B, C], tokens [B, gx*gy*gz, C] (x-major grid order),
         registers [B, R, C], feature_maps (multi-scale [B, C, gx, gy, gz]).

All layers share one token order (it depends on grid, tile and register count,
never on the window), so the only permutations are one before the first block and
one after the last. Register tokens (global tokens) attend, and are attended by,
every token in every layer: they carry context across the volume in local layers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from volumevlm.errors import InputError, VolumeVLMError
from volumevlm.ops import attention_layout, sparse_attention
from volumevlm.ops.layout import cache_builder

PATTERNS = ("local", "dilated", "dense")
POOLED_NORMS = ("batch", "none")


def _triple(value, name: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        value = (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3 or min(value) < 1:
        raise VolumeVLMError(f"encoder config: {name} must be 3 positive ints, got {value}")
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class EncoderConfig:
    """Hyper-parameters of :class:`VolumeEncoder` (see ``volumevlm/models/sizes/*.json``).

    image_size: nominal input grid in voxels (X, Y, Z); the encoder accepts other sizes.
    patch_size: voxels per token along X, Y, Z.
    layer_patterns: one of ``PATTERNS`` per layer; empty = ``pattern_cycle`` repeated.
    out_indices: layers (0-based) whose outputs become ``feature_maps``; empty = four
    evenly spaced layers ending at the last (UNETR-style skip connections).
    attention_backend: None (Triton on CUDA, torch elsewhere), "triton" or "torch".
    pooled_norm: "batch" normalizes the pooled embedding with batch statistics
    (:class:`PooledBatchNorm`); "none" leaves it as the mean of the tokens.
    input_windows: (low, high) HU windows, each becoming one input channel of the
    patch embedding (:class:`HUWindows`); empty = the single preprocessed channel.
    input_range: the HU range the preprocessing maps to [0, 1] (its ``hu_window``),
    so the encoder can recover HU from its input.
    """

    name: str = "custom"
    image_size: tuple[int, int, int] = (224, 224, 160)
    patch_size: tuple[int, int, int] = (16, 16, 8)
    in_channels: int = 1
    dim: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    num_registers: int = 4
    tile: tuple[int, int, int] = (4, 4, 4)
    window: int = 1
    dilation: int = 2
    pattern_cycle: tuple[str, ...] = ("local", "local", "dilated")
    layer_patterns: tuple[str, ...] = ()
    out_indices: tuple[int, ...] = ()
    drop_path: float = 0.0
    grad_checkpointing: bool = False
    attention_backend: str | None = None
    rope_base: float = 100.0
    qk_norm: bool = True
    # "none" is the default so that configs written before this option load unchanged;
    # the named sizes set "batch".
    pooled_norm: str = "none"
    input_windows: tuple[tuple[float, float], ...] = ()
    input_range: tuple[float, float] = (-1000.0, 1000.0)
    # "patch": one Conv3d per patch (a ViT's patch embedding); "conv": :class:`ConvStem`,
    # ``stem_stages`` strided 3D convolution stages with normalization (see its docstring).
    stem: str = "patch"
    stem_stages: int = 3

    def __post_init__(self):
        check_stem(self)
        try:
            windows = tuple((float(low), float(high)) for low, high in self.input_windows)
            low, high = (float(v) for v in self.input_range)
        except (TypeError, ValueError):
            raise VolumeVLMError(
                f"encoder config: input_windows must be (low, high) HU pairs and input_range one pair, "
                f"got {self.input_windows!r} and {self.input_range!r}"
            ) from None
        object.__setattr__(self, "input_windows", windows)
        object.__setattr__(self, "input_range", (low, high))
        if low >= high or any(a >= b for a, b in windows):
            raise VolumeVLMError(f"encoder config: every HU window needs low < high, got {windows} and input_range {self.input_range}")
        if windows and self.in_channels != 1:
            raise VolumeVLMError(f"encoder config: input_windows re-window a 1-channel CT; in_channels is {self.in_channels}")
        for name in ("image_size", "patch_size", "tile"):
            object.__setattr__(self, name, _triple(getattr(self, name), name))
        for name in ("pattern_cycle", "layer_patterns", "out_indices"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.dim % self.heads:
            raise VolumeVLMError(f"encoder config: dim {self.dim} is not divisible by heads {self.heads}")
        if self.depth < 1 or self.num_registers < 0 or self.window < 0 or self.dilation < 1:
            raise VolumeVLMError(f"encoder config: need depth >= 1, num_registers >= 0, window >= 0, dilation >= 1 ({self})")
        if self.layer_patterns and len(self.layer_patterns) != self.depth:
            raise VolumeVLMError(
                f"encoder config: layer_patterns has {len(self.layer_patterns)} entries for depth {self.depth}"
            )
        bad = [p for p in (*self.pattern_cycle, *self.layer_patterns) if p not in PATTERNS]
        if bad or not self.pattern_cycle:
            raise VolumeVLMError(f"encoder config: unknown attention pattern(s) {bad}; known: {PATTERNS}")
        if any(not 0 <= i < self.depth for i in self.out_indices):
            raise VolumeVLMError(f"encoder config: out_indices {self.out_indices} outside 0..{self.depth - 1}")
        if self.attention_backend not in (None, "triton", "torch"):
            raise VolumeVLMError(f"encoder config: attention_backend must be null, 'triton' or 'torch', got {self.attention_backend!r}")
        if self.pooled_norm not in POOLED_NORMS:
            raise VolumeVLMError(f"encoder config: pooled_norm must be one of {POOLED_NORMS}, got {self.pooled_norm!r}")
        if not 0.0 <= self.drop_path < 1.0:
            raise VolumeVLMError(f"encoder config: drop_path must be in [0, 1), got {self.drop_path}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def patterns(self) -> tuple[str, ...]:
        """The attention pattern of every layer."""
        if self.layer_patterns:
            return self.layer_patterns
        cycle = self.pattern_cycle
        return tuple(cycle[i % len(cycle)] for i in range(self.depth))

    def feature_layers(self) -> tuple[int, ...]:
        """Layers whose outputs are the multi-scale feature maps (sorted)."""
        if self.out_indices:
            return tuple(sorted(set(self.out_indices)))
        return tuple(sorted({max(0, round(self.depth * k / 4) - 1) for k in (1, 2, 3, 4)}))

    def grid(self, spatial: tuple[int, int, int] | None = None) -> tuple[int, int, int]:
        """Token grid of an input of ``spatial`` voxels (default: image_size)."""
        spatial = self.image_size if spatial is None else spatial
        return tuple(math.ceil(s / p) for s, p in zip(spatial, self.patch_size))  # type: ignore[return-value]

    def attention_layouts(self, grid: tuple[int, int, int] | None = None) -> list:
        """The attention layout of every layer for a token grid (default: the nominal
        grid), as the encoder runs them (cached by the ops)."""
        grid = self.grid() if grid is None else grid
        window = (self.window,) * 3
        by_pattern = {
            "local": lambda: attention_layout(grid, self.tile, window, 1, self.num_registers),
            "dilated": lambda: attention_layout(grid, self.tile, window, self.dilation, self.num_registers),
            "dense": lambda: attention_layout(grid, self.tile, None, 1, self.num_registers),
        }
        return [by_pattern[p]() for p in self.patterns()]

    @property
    def embed_channels(self) -> int:
        """Channels the patch embedding sees: one per HU window, else ``in_channels``."""
        return len(self.input_windows) or self.in_channels

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_windows"] = [list(w) for w in self.input_windows]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EncoderConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise VolumeVLMError(f"encoder config: unknown keys {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass
class EncoderOutput:
    """pooled [B, C]; tokens [B, gx*gy*gz, C] x-major; registers [B, R, C];
    grid (gx, gy, gz); feature_maps: [B, C, gx, gy, gz] per ``config.feature_layers()``."""

    pooled: torch.Tensor
    tokens: torch.Tensor
    registers: torch.Tensor
    grid: tuple[int, int, int]
    feature_maps: list[torch.Tensor] = field(default_factory=list)
    # The convolutional stem's maps at higher resolution than the tokens, finest first
    # ([B, c_i, X/s_i, Y/s_i, Z/s_i]); empty with the patch embedding.
    stem_maps: list[torch.Tensor] = field(default_factory=list)


class PooledBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the pooled embedding [B, C].

    Why: every CT shares the same body, air and table, so the mean of the tokens is
    nearly the same vector for every case and the findings live in small differences
    around it. Each token is layer-normed, which removes its own intensity scale, and
    the contrastive loss compares unit vectors, so those differences stay invisible
    until something subtracts the common part and rescales what is left; batch
    statistics do exactly that (the role BatchNorm plays in Merlin's ResNet). Without
    it the tiny encoder stayed at chance on the synthetic findings.

    A training batch of one has no batch statistics: it is normalized with the running
    statistics, and the running mean still moves toward it, so micro-batches of one
    (gradient accumulation on a small GPU) keep the statistics current.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and x.shape[0] == 1):
            return super().forward(x)
        # Clones: autograd keeps the statistics it normalized with, and they move below.
        mean, var = self.running_mean.clone(), self.running_var.clone()
        out = F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)
        with torch.no_grad():
            self.running_mean.lerp_(x.detach().float().mean(0).to(self.running_mean.dtype), self.momentum or 0.1)
            self.num_batches_tracked += 1
        return out


# ---------------------------------------------------------------------- positions


def rope_axis_dims(head_dim: int) -> int:
    """Channels rotated per axis: an even count, the same for X, Y and Z (the rest of
    the head dimension is left unrotated)."""
    return 2 * (head_dim // 6)


def rope_tables(coords: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin float32 [N, P] of the rotation angles of each position's channel pairs.

    coords: long [N, 3] grid coordinates (-1 for registers and padding: no rotation).
    P = 3 * rope_axis_dims(head_dim) // 2 pairs: X's frequencies, then Y's, then Z's.
    """
    per_axis = rope_axis_dims(head_dim) // 2
    if per_axis == 0:
        n = coords.shape[0]
        return torch.ones(n, 0), torch.zeros(n, 0)
    freqs = base ** (-torch.arange(per_axis, dtype=torch.float32) / per_axis)  # [P/3]
    pos = coords.clamp_min(0).to(torch.float32)  # registers/padding at 0: identity rotation
    angles = (pos[:, :, None] * freqs[None, None, :]).reshape(coords.shape[0], 3 * per_axis)
    angles = angles * (coords[:, :1] >= 0).to(torch.float32)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x [B, H, N, D] by the angles of cos/sin [N, P]."""
    P = cos.shape[-1]
    if P == 0:
        return x
    rot, rest = x[..., : 2 * P], x[..., 2 * P :]
    pairs = rot.float().unflatten(-1, (P, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return torch.cat((rotated.to(x.dtype), rest), dim=-1)


# ---------------------------------------------------------------------- blocks


class DropPath(nn.Module):
    """Stochastic depth: drops a sample's whole residual branch with probability p."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # QK-norm keeps attention logits bounded in bf16 (as in ViT-22B).
        head_dim = dim // heads
        self.q_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()

    def forward(self, x, layout, cos, sin, backend):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        # Under CUDA autocast LayerNorm returns float32 while the Linear gave bf16/fp16:
        # bring q and k back to v's dtype (the kernels take one dtype).
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        o = sparse_attention(q.contiguous(), k.contiguous(), v.contiguous(), layout, backend=backend)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, config: EncoderConfig, drop_path: float):
        super().__init__()
        dim = config.dim
        hidden = int(dim * config.mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, config.heads, config.qk_norm)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x, layout, cos, sin, backend):
        x = x + self.drop_path(self.attn(self.norm1(x), layout, cos, sin, backend))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# ---------------------------------------------------------------------- encoder


class HUWindows(nn.Module):
    """[B, 1, ...] CT in [0, 1] (``input_range`` HU mapped linearly) -> [B, W, ...], one
    channel per HU window, each mapped to [0, 1] and clipped.

    Why: a single wide window leaves soft-tissue contrast (steatosis, ascites, lesions)
    in a few percent of the input range, and small models trained from scratch did not
    learn it; the same voxels seen through abdominal, lung and bone windows did (see
    the README's pretraining notes). Windows outside ``input_range`` see clipped values.
    """

    def __init__(self, windows: tuple[tuple[float, float], ...], input_range: tuple[float, float]):
        super().__init__()
        low, high = input_range
        span = high - low
        # Window (a, b) in input units is ((a - low) / span, (b - low) / span): the channel
        # is (x - a') / (b' - a') = x * scale + shift.
        starts = torch.tensor([(a - low) / span for a, _ in windows], dtype=torch.float32)
        widths = torch.tensor([(b - a) / span for a, b in windows], dtype=torch.float32)
        self.register_buffer("scale", (1.0 / widths).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("shift", (-starts / widths).view(1, -1, 1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.scale.to(x.dtype) + self.shift.to(x.dtype)).clamp(0.0, 1.0)


class VolumeEncoder(nn.Module):
    """3D ViT with block-sparse attention (see the module docstring). ``embed_dim`` = C."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.dim
        self.windows = HUWindows(config.input_windows, config.input_range) if config.input_windows else nn.Identity()
        self.patch_embed = build_patch_embed(config)
        self.registers = nn.Parameter(torch.zeros(1, config.num_registers, config.dim))
        rates = torch.linspace(0.0, config.drop_path, config.depth).tolist()
        self.blocks = nn.ModuleList(Block(config, rate) for rate in rates)
        self.norm = nn.LayerNorm(config.dim)
        self.pooled_norm = PooledBatchNorm(config.dim) if config.pooled_norm == "batch" else nn.Identity()
        # RoPE tables per (grid, device, dtype): derived from the config alone, so they
        # are neither parameters nor buffers (no state_dict entry, no .to() copies).
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._layout_cache: dict[tuple, list] = {}
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.registers, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        if isinstance(self.patch_embed, nn.Conv3d):  # ConvStem initializes its own
            w = self.patch_embed.weight
            nn.init.trunc_normal_(w.view(w.shape[0], -1), std=0.02)

    def layouts(self, grid: tuple[int, int, int]) -> list:
        """The attention layout of every layer for a token grid (cached per grid here,
        so a compiled forward reads a dict instead of tracing the layout's construction)."""
        layouts = self._layout_cache.get(grid)
        if layouts is None:
            layouts = self.config.attention_layouts(grid)
            self._layout_cache[grid] = layouts
        return layouts

    def _rope(self, layout, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin float32 [N, P] of ``grid``'s layout on ``device``, built once per
        (grid, device, dtype) and cached: rebuilding them on the host and copying them
        to the device every forward cost a blocking copy per step."""
        key = (grid, device, torch.float32)
        tables = self._rope_cache.get(key)
        if tables is None:
            with cache_builder():  # never inference tensors: training reuses the cache
                cos, sin = rope_tables(layout.coords, self.config.head_dim, self.config.rope_base)
                tables = (cos.to(device), sin.to(device))
            self._rope_cache[key] = tables
        return tables

    def _check_input(self, x: torch.Tensor) -> None:
        c = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != c.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError("encoder input", f"expected a tensor [B, {c.in_channels}, X, Y, Z], got {shape}")
        if not x.is_floating_point():
            raise InputError("encoder input", f"expected a floating-point tensor, got {x.dtype}")

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        """x float [B, in_channels, X, Y, Z] -> :class:`EncoderOutput` (see the module docstring)."""
        self._check_input(x)
        c = self.config
        pad = [0, 0, 0, 0, 0, 0]
        for axis in range(3):  # F.pad lists the last axis first
            pad[2 * (2 - axis) + 1] = (-x.shape[2 + axis]) % c.patch_size[axis]
        if any(pad):
            x = F.pad(x, pad)
        feats, stem_maps = embed_patches(self.patch_embed, self.windows(x))  # [B, C, gx, gy, gz]
        grid = tuple(feats.shape[2:])
        B = feats.shape[0]
        layouts = self.layouts(grid)
        first = layouts[0]
        tokens = first.to_layout(feats.flatten(2).transpose(1, 2), self.registers.expand(B, -1, -1).to(feats.dtype))
        cos, sin = self._rope(first, grid, x.device)
        valid = first.cached("key_valid", x.device, tokens.dtype)[None, :, None]

        backend = c.attention_backend
        keep = set(c.feature_layers())
        maps = []
        for i, (block, layout) in enumerate(zip(self.blocks, layouts)):
            if c.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, layout, cos, sin, backend, use_reentrant=False)
            else:
                tokens = block(tokens, layout, cos, sin, backend)
            # Padding positions never feed attention; zeroing them keeps norms and pooling clean.
            tokens = tokens * valid
            if i in keep:
                maps.append(tokens)

        tokens = self.norm(tokens)
        grid_tokens, registers = first.from_layout(tokens)
        registers = registers if registers is not None else tokens.new_zeros(B, 0, c.dim)
        # Mean of the patch tokens and of the registers: both see the whole volume.
        pooled = grid_tokens.mean(dim=1)
        if registers.shape[1]:
            pooled = 0.5 * (pooled + registers.mean(dim=1))
        pooled = self.pooled_norm(pooled)
        feature_maps = [
            first.from_layout(m)[0].transpose(1, 2).reshape(B, c.dim, *grid) for m in maps
        ]
        return EncoderOutput(pooled=pooled, tokens=grid_tokens, registers=registers, grid=grid, feature_maps=feature_maps,
                             stem_maps=stem_maps)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------- convolutional stem

STEMS = ("patch", "conv")


def check_stem(config: EncoderConfig) -> None:
    """One-line errors for the stem fields of an :class:`EncoderConfig`."""
    if config.stem not in STEMS:
        raise VolumeVLMError(f"encoder config: stem must be one of {STEMS}, got {config.stem!r}")
    if isinstance(config.stem_stages, bool) or not isinstance(config.stem_stages, int) or config.stem_stages < 1:
        raise VolumeVLMError(f"encoder config: stem_stages must be an integer >= 1, got {config.stem_stages!r}")


def _prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    return factors


def stem_strides(patch_size: tuple[int, int, int], stages: int) -> list[tuple[int, int, int]]:
    """Per-stage strides whose product along each axis is that axis's patch size.

    Each axis's prime factors, smallest first, go one per stage from the first stage on
    (downsampling early keeps the full-resolution stages cheap); when an axis has more
    factors than stages, the last stage takes the rest. (8, 8, 6) in 3 stages:
    (2, 2, 2), (2, 2, 3), (2, 2, 1)."""
    per_axis = []
    for size in patch_size:
        factors = _prime_factors(int(size))
        if len(factors) > stages:
            factors = factors[: stages - 1] + [math.prod(factors[stages - 1:])]
        per_axis.append(factors + [1] * (stages - len(factors)))
    return [tuple(axis[i] for axis in per_axis) for i in range(stages)]  # type: ignore[misc]


def stem_channels(dim: int, stages: int) -> list[int]:
    """Output channels of each stage: doubling up to ``dim`` at the last (at least 8)."""
    return [max(8, dim // 2 ** (stages - 1 - i)) for i in range(stages - 1)] + [dim]


class ConvStage(nn.Module):
    """Conv3d (kernel max(3, 2s - 1) per axis, stride s, padding kernel // 2: an input that
    is a multiple of s comes out exactly s times smaller) -> GroupNorm -> GELU."""

    def __init__(self, in_channels: int, out_channels: int, stride: tuple[int, int, int]):
        super().__init__()
        kernel = tuple(max(3, 2 * s - 1) for s in stride)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=tuple(k // 2 for k in kernel),
                              bias=False)
        self.norm = nn.GroupNorm(math.gcd(8, out_channels), out_channels)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class ConvStem(nn.Module):
    """Convolutional patch embedding: ``stages - 1`` :class:`ConvStage` s, then a strided
    convolution onto the token width (no norm: the blocks pre-normalize), the strides
    multiplying to the patch size (:func:`stem_strides`).

    Why: a ViT whose tokens start from one linear map of each patch has to learn local
    3D texture from data, and from a few hundred cases it does not (the demo's encoder
    read the findings worse than a logistic regression on pooled voxels); convolutions
    bring that locality with them, as CNNs and hybrid encoders do. GroupNorm, not
    BatchNorm: the same in training and inference, for any batch size. The stages'
    outputs before the last are kept (:attr:`EncoderOutput.stem_maps`) for a
    segmentation decoder's finer skips.
    """

    def __init__(self, in_channels: int, dim: int, patch_size: tuple[int, int, int], stages: int = 3):
        super().__init__()
        self.strides = stem_strides(patch_size, stages)
        channels = stem_channels(dim, stages)
        widths = [in_channels, *channels[:-1]]
        self.stages = nn.ModuleList(ConvStage(widths[i], channels[i], self.strides[i]) for i in range(stages - 1))
        last = self.strides[-1]
        kernel = tuple(max(3, 2 * s - 1) for s in last)
        self.proj = nn.Conv3d(widths[-1], dim, kernel, stride=last, padding=tuple(k // 2 for k in kernel))
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="linear" if module is self.proj else "relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.proj.weight.data.mul_(0.1)  # tokens start small next to the registers

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(tokens map [B, dim, gx, gy, gz], the stages' maps finest first)."""
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return self.proj(x), maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]


def build_patch_embed(config: EncoderConfig) -> nn.Module:
    """The encoder's patch embedding for ``config.stem``."""
    if config.stem == "conv":
        return ConvStem(config.embed_channels, config.dim, config.patch_size, config.stem_stages)
    return nn.Conv3d(config.embed_channels, config.dim, kernel_size=config.patch_size, stride=config.patch_size)


def embed_patches(patch_embed: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(token map, stem maps) of either patch embedding."""
    if isinstance(patch_embed, ConvStem):
        return patch_embed.forward_features(x)
    return patch_embed(x), []
