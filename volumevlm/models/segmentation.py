"""The segmentation head: a decoder over the image encoder's feature maps, of three kinds
(``SegmentationConfig.decoder``).

``decoder="fused"`` (the demo's head since 2026-12-07; any encoder)::

    x [B, 1, X, Y, Z] (preprocessed CT in [0, 1])
      zero-padded up to a multiple of the patch size
      -> a U-Net of MONAI blocks trained from scratch, shaped as MONAI's ``UNet``
         (num_res_units=2): the image seen through the encoder's HU windows goes down
         S residual units, each strided by one level's factors (so the last one lands
         on the token grid), a bottom residual unit, then up S levels (concat the skip,
         transposed conv, one residual unit), the top level writing the logits
      -> at the bottom, the pretrained encoder's last token map [B, dim, grid] (its
         OWN VolumeEncoder, fine-tuned or frozen) through a 1x1x1 convolution, ADDED
         to the U-Net's bottleneck; the projection starts at zero, so training starts
         from the plain U-Net and takes from the tokens what lowers the loss
      -> logits [B, num_classes, X, Y, Z] (the padding cropped off)

``decoder="unet"`` (needs an encoder with a convolutional stem)::

    x [B, 1, X, Y, Z] (preprocessed CT in [0, 1])
      zero-padded up to a multiple of the patch size (0 = air after windowing)
      -> its OWN VolumeEncoder (a copy of the pretrained one, fine-tuned or frozen):
           stem_maps (the conv stem's stages, finest first) and feature_maps (tokens)
      -> decoder over S resolution levels (level 0 = voxels, level S = token grid):
           level S:        the last token feature map (bottleneck)
           level 1..S-1:   the stem map of that resolution through a MONAI residual
                           unit (a level the stem does not reach: a token map brought
                           up by transposed convolutions, as below)
           level 0:        a residual unit on the image seen through the encoder's HU
                           windows
           S-1 ... 0:      ResidualUpBlock: transposed conv up one level, concat the
                           skip, a residual unit of two conv-norm-activation subunits
      -> UnetOutBlock -> logits [B, num_classes, X, Y, Z] (the padding cropped off)

``decoder="unetr"`` (UNETR's blocks; any encoder; checkpoints before the option)::

           level S:        the last feature map (bottleneck)
           level 1..S-1:   an earlier feature map brought up by transposed convolutions
                           (UnetrPrUpBlock) to that level (skip connection)
           level 0:        a conv stem on the image itself (UnetrBasicBlock)
           image path (``image_path``): the image, seen through the encoder's own HU
                           windows, goes down a small conv path (per level a conv
                           strided by that level's factors, then a residual block);
                           at every level 0..S its feature map is ADDED to the token
                           skip (to the bottleneck through a 1x1x1 projection)
           S-1 ... 0:      UnetrUpBlock: transposed conv up one level, concat the skip,
                           residual conv block

Why the fused U-Net: boundaries live at the voxel scale, which a ViT with 8x8x6
patches never sees, and the UNETR blocks learned slowly even with the image path: on
the demo cohort, 150 steps read a mean Dice of 0.12 over 14 structures with them and
0.44 with the U-Net decoder on the pretrained stem's maps, whose full-resolution
level also made every step 2.5x slower than a MONAI UNet's. The fused U-Net keeps the
UNet's speed and learning (docs/segmentation.md has the measurements). Checkpoints
written before these options (their config lacks the ``image_path`` or ``decoder``
key) load as they were built.

The patch size need not be a power of two nor isotropic (tiny 8x8x6, small 16x16x8,
base 8x8x8): each axis' patch size is split into its prime factors, one per level
(:func:`stage_factors`), so every transposed convolution has an integer per-axis
stride and the levels multiply back to exactly the patch size.

Inference over volumes of any size goes through :func:`sliding_window_segment`
(``monai.inferers.sliding_window_inference`` at the encoder's nominal image size) and
:func:`segment_to_input` (THE preprocessing, segmentation, and the mask brought back to
the input's own voxel grid).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from volumevlm.data.labels import LABELS
from volumevlm.errors import InputError, VolumeVLMError

# Decoder kinds (SegmentationConfig.decoder).
DECODERS = ("fused", "unet", "unetr")
# Lateral structures: a flip of the left-right axis swaps these label names.
LEFT_RIGHT_SUFFIXES = ("_left", "_right")
NIFTI_DESCRIP = "volumevlm segmentation (label indices); not for clinical use"
# The key of the JSON header extension that carries {index: name} with a saved mask.
LABELS_EXTENSION_KEY = "labels"


def _prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return factors


def stage_factors(patch_size: Sequence[int]) -> list[tuple[int, int, int]]:
    """Per-level upsampling factors whose per-axis product is ``patch_size``.

    Returns S tuples (fx, fy, fz), finest level first: factors[0] takes level 1 to the
    voxel grid, factors[S-1] takes the token grid (level S) to level S-1. S is the
    largest number of prime factors of any axis (at least 1); an axis with fewer gets
    factor 1 at its coarsest levels, so the fine levels upsample every axis.
    E.g. (8, 8, 6) -> [(2, 2, 2), (2, 2, 3), (2, 2, 1)].
    """
    per_axis = [sorted(_prime_factors(int(p))) for p in patch_size]
    levels = max(1, max(len(f) for f in per_axis))
    padded = [f + [1] * (levels - len(f)) for f in per_axis]
    return [tuple(padded[axis][level] for axis in range(3)) for level in range(levels)]  # type: ignore[misc]


@dataclass
class SegmentationConfig:
    """Hyper-parameters of :class:`SegmentationNet`.

    num_classes: output channels, background (index 0) included.
    label_names: {index: structure name} (default: volumevlm.data.labels.LABELS).
    feature_size: decoder width at the voxel level (level l has feature_size * 2**min(l, 3));
        for "fused", the width of the U-Net's first (once-strided) level, as MONAI UNet's channels[0].
    roi_size: sliding-window ROI in voxels (X, Y, Z); the encoder's nominal image_size.
    sw_overlap: sliding-window overlap fraction in [0, 1).
    freeze_encoder: whether training kept the encoder fixed (recorded; the training
        module acts on it).
    norm_name: MONAI norm of the decoder blocks ("instance", "batch", ...).
    res_block: residual conv blocks in the decoder.
    image_path: a conv path on the image feeds every decoder level (see the module
        docstring). A config dict WITHOUT this key (a checkpoint written before it
        existed) means False: :meth:`from_dict` rebuilds the net that was saved.
    decoder: "unetr" (UNETR's blocks: every skip above the voxels is a token map
        brought up by transposed convolutions) or "unet" (a U-Net decoder: the skips of
        the levels the encoder's convolutional stem reaches are the stem's own
        pretrained maps, the voxel level sees the image through the encoder's HU
        windows, and every level is MONAI residual units; see the module docstring).
        "unet" needs an encoder with ``stem="conv"`` and takes no ``image_path``. "fused": a
        U-Net trained from scratch on the image whose bottleneck adds the encoder's
        last token map (any encoder; ``image_path`` does not apply and is stored
        False, as the U-Net is itself the image's path). Missing from a saved config:
        "unetr".
    """

    num_classes: int = len(LABELS)
    label_names: dict[int, str] = field(default_factory=lambda: dict(LABELS))
    feature_size: int = 16
    roi_size: tuple[int, int, int] = (96, 96, 48)
    sw_overlap: float = 0.25
    freeze_encoder: bool = False
    norm_name: str = "instance"
    res_block: bool = True
    image_path: bool = True
    decoder: str = "unetr"

    def __post_init__(self):
        self.num_classes = int(self.num_classes)
        self.label_names = {int(k): str(v) for k, v in dict(self.label_names).items()}
        self.feature_size = int(self.feature_size)
        self.roi_size = tuple(int(v) for v in self.roi_size)  # type: ignore[assignment]
        self.sw_overlap = float(self.sw_overlap)
        self.freeze_encoder = bool(self.freeze_encoder)
        self.image_path = bool(self.image_path)
        if self.decoder not in DECODERS:
            raise VolumeVLMError(f"segmentation config: decoder must be one of {DECODERS}, got {self.decoder!r}")
        if self.decoder == "fused":
            self.image_path = False
        if self.num_classes < 2:
            raise VolumeVLMError(f"segmentation config: num_classes must be at least 2 (background + one), got {self.num_classes}")
        bad = [k for k in self.label_names if not 0 <= k < self.num_classes]
        if bad:
            raise VolumeVLMError(f"segmentation config: label_names indices {bad} outside 0..{self.num_classes - 1}")
        if self.feature_size < 1:
            raise VolumeVLMError(f"segmentation config: feature_size must be positive, got {self.feature_size}")
        if len(self.roi_size) != 3 or min(self.roi_size) < 1:
            raise VolumeVLMError(f"segmentation config: roi_size must be 3 positive ints, got {self.roi_size}")
        if not 0.0 <= self.sw_overlap < 1.0:
            raise VolumeVLMError(f"segmentation config: sw_overlap must be in [0, 1), got {self.sw_overlap}")

    def name_of(self, index: int) -> str:
        return self.label_names.get(int(index), f"label_{int(index)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (label_names keys become strings, as JSON requires)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["label_names"] = {str(k): v for k, v in sorted(self.label_names.items())}
        d["roi_size"] = list(self.roi_size)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SegmentationConfig":
        data = dict(data)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise VolumeVLMError(f"segmentation config: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        # Saved before the image path existed: that net had none.
        data.setdefault("image_path", False)
        data.setdefault("decoder", "unetr")
        return cls(**data)


class ResidualUpBlock(nn.Module):
    """One level of the "unet" decoder: a transposed convolution up by ``factor`` (per
    axis), the skip concatenated, then a MONAI residual unit of two conv-norm-activation
    subunits. Why not UNETR's up block (one transposed conv, one residual block): on
    one batch of the demo cohort, 40 AdamW steps took that decoder's DiceCE loss only
    from 4.2 to 2.7, as slowly as a two-layer local net, while these blocks (width 16)
    reach 0.9 and a MONAI UNet 0.4 (docs/segmentation.md)."""

    def __init__(self, in_channels: int, out_channels: int, factor: Sequence[int], norm: str):
        super().__init__()
        from monai.networks.blocks import ResidualUnit

        self.up = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=tuple(factor), stride=tuple(factor))
        self.block = ResidualUnit(3, 2 * out_channels, out_channels, strides=1, subunits=2, norm=norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))


class SegmentationNet(nn.Module):
    """Encoder + decoder of ``config.decoder``'s kind (see the module docstring).

    encoder_config: the EncoderConfig of the encoder this head owns (random weights
        here; :meth:`from_encoder` copies pretrained ones in).
    config: :class:`SegmentationConfig`.

    forward(x float [B, 1, X, Y, Z]) -> logits float [B, num_classes, X, Y, Z], any
    X, Y, Z (the input is padded to a multiple of the patch size internally).
    """

    head_type: ClassVar[str] = "segmentation"

    def __init__(self, encoder_config, config: SegmentationConfig):
        super().__init__()
        from monai.networks.blocks import ResidualUnit, UnetOutBlock, UnetrBasicBlock, UnetResBlock, UnetrPrUpBlock, UnetrUpBlock

        from volumevlm.models.encoder import VolumeEncoder, stem_channels

        self.config = config
        self.encoder = VolumeEncoder(encoder_config)
        enc = encoder_config
        if enc.in_channels != 1:
            raise VolumeVLMError(f"segmentation: the encoder takes {enc.in_channels} channels; CT segmentation needs 1")
        self.factors = stage_factors(enc.patch_size)
        levels = len(self.factors)
        fs, norm, res = config.feature_size, config.norm_name, config.res_block
        widths = [fs * 2 ** min(level, 3) for level in range(levels + 1)]
        if config.decoder == "fused":
            self._build_fused(widths, norm)
            return
        maps = len(enc.feature_layers())
        # Skip level l (1..S-1) reads an earlier feature map, spread evenly over all but
        # the last (the bottleneck), earlier layers feeding finer levels as in UNETR.
        self.skip_sources = [
            0 if maps < 2 else min(maps - 2, round((level - 1) * (maps - 2) / max(1, levels - 2)))
            for level in range(1, levels)
        ]

        # Decoder levels whose skip is a map of the encoder's conv stem: {level: stem map index}.
        unet = config.decoder == "unet"
        self.stem_levels = self._stem_levels(enc) if unet else {}
        if config.image_path and unet:
            # Measured no better than without it (0.453 vs 0.443 on 16 val cases) and
            # superseded by "fused", which is a from-scratch conv net on the image.
            raise VolumeVLMError("segmentation config: image_path applies to the unetr decoder only; "
                                 "for a conv net on the image use decoder=fused")
        if config.image_path:
            # The stem sees the image through the encoder's HU windows (soft-tissue
            # contrast is a few percent of the [0, 1] input range otherwise).
            self.stem = UnetrBasicBlock(3, enc.embed_channels, fs, kernel_size=3, stride=1, norm_name=norm, res_block=res)
            # Down one level: a conv whose kernel is that level's factor (strided like a
            # patch embedding, so odd factors such as 3 divide exactly), then a residual block.
            def down(level: int) -> nn.Module:
                factor = self.factors[level - 1]
                return nn.Sequential(
                    nn.Conv3d(widths[level - 1], widths[level], kernel_size=factor, stride=factor),
                    UnetResBlock(3, widths[level], widths[level], kernel_size=3, stride=1, norm_name=norm),
                )

            self.image_down = nn.ModuleList(down(level) for level in range(1, levels))
            self.image_bottleneck = nn.Sequential(down(levels), nn.Conv3d(widths[levels], enc.dim, kernel_size=1))
        elif unet:  # the voxel level, like the encoder's stem, sees the HU windows
            self.stem = ResidualUnit(3, enc.embed_channels, fs, strides=1, subunits=2, norm=norm)
        else:
            self.stem = UnetrBasicBlock(3, enc.in_channels, fs, kernel_size=3, stride=1, norm_name=norm, res_block=res)
        self.skips = nn.ModuleList()
        for level in range(1, levels):
            width = widths[level]
            if level in self.stem_levels:
                stem_width = stem_channels(enc.dim, enc.stem_stages)[self.stem_levels[level]]
                self.skips.append(ResidualUnit(3, stem_width, width, strides=1, subunits=2, norm=norm))
                continue
            steps: list[nn.Module] = []
            # From the token grid down to `level`: coarsest factor first.
            for i, stage in enumerate(range(levels - 1, level - 1, -1)):
                steps.append(
                    UnetrPrUpBlock(
                        3, enc.dim if i == 0 else width, width, num_layer=0, kernel_size=3, stride=1,
                        upsample_kernel_size=self.factors[stage], norm_name=norm,
                    )
                )
                if stage > level:  # between upsamplings, a conv block as UNETR's PrUp has
                    steps.append(UnetrBasicBlock(3, width, width, kernel_size=3, stride=1, norm_name=norm, res_block=res))
            self.skips.append(nn.Sequential(*steps))
        self.ups = nn.ModuleList()
        for level in range(levels - 1, -1, -1):  # S-1 ... 0
            in_ch = enc.dim if level == levels - 1 else widths[level + 1]
            self.ups.append(
                ResidualUpBlock(in_ch, widths[level], self.factors[level], norm) if unet else
                UnetrUpBlock(3, in_ch, widths[level], kernel_size=3, upsample_kernel_size=self.factors[level],
                             norm_name=norm, res_block=res)
            )
        self.out = UnetOutBlock(3, fs, config.num_classes)
        # Memory layout of the decoder's activations on the CPU (a speed knob only: the
        # results are the same up to float rounding).
        self.channels_last = True

    def _build_fused(self, widths: list[int], norm: str) -> None:
        """The "fused" decoder's modules: MONAI UNet's layers, level by level (MONAI's
        ``UNet`` nests them, which leaves no place to add the tokens at its bottom)."""
        from monai.networks.blocks import Convolution, ResidualUnit

        enc, levels = self.encoder.config, len(self.factors)
        inputs = [enc.embed_channels, *widths[: levels - 1]]
        self.downs = nn.ModuleList(
            ResidualUnit(3, inputs[level], widths[level], strides=self.factors[level], subunits=2, norm=norm)
            for level in range(levels)
        )
        self.bottom = ResidualUnit(3, widths[levels - 1], widths[levels], strides=1, subunits=2, norm=norm)
        self.token_proj = nn.Conv3d(enc.dim, widths[levels], kernel_size=1)
        nn.init.zeros_(self.token_proj.weight)  # training starts from the plain U-Net
        nn.init.zeros_(self.token_proj.bias)
        self.ups = nn.ModuleList()
        for level in range(levels - 1, -1, -1):  # S-1 ... 0, each up to the grid of `level`'s input
            top = level == 0
            in_channels = widths[level] + (widths[levels] if level == levels - 1 else widths[level])
            out_channels = self.config.num_classes if top else widths[level - 1]
            self.ups.append(nn.Sequential(
                Convolution(3, in_channels, out_channels, strides=self.factors[level], kernel_size=3, norm=norm,
                            is_transposed=True),
                # The top unit ends in a bare convolution: its output is the logits.
                ResidualUnit(3, out_channels, out_channels, strides=1, subunits=1, norm=norm, last_conv_only=top),
            ))
        self.channels_last = True

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(x).feature_maps[-1]
        h = self.encoder.windows(x)
        if self.channels_last and x.device.type == "cpu":  # see forward()
            h = h.contiguous(memory_format=torch.channels_last_3d)
            tokens = tokens.contiguous(memory_format=torch.channels_last_3d)
        skips = []
        for down in self.downs:
            h = down(h)
            skips.append(h)
        h = self.bottom(h) + self.token_proj(tokens)
        for up, skip in zip(self.ups, reversed(skips)):
            h = up(torch.cat([skip, h], dim=1))
        return h

    def _stem_levels(self, enc) -> dict[int, int]:
        """{decoder level: index into the encoder's stem_maps} where a stem map has the
        level's resolution (its strides so far equal the level's factors so far)."""
        from volumevlm.models.encoder import stem_strides

        if enc.stem != "conv":
            raise VolumeVLMError(f"segmentation config: the unet decoder needs an encoder with a convolutional stem "
                                 f"(model.encoder.stem=conv); this encoder has stem={enc.stem!r}")
        level_scale, scale = {}, (1, 1, 1)
        for level, factor in enumerate(self.factors[:-1], start=1):
            scale = tuple(a * b for a, b in zip(scale, factor))
            level_scale[scale] = level
        found, scale = {}, (1, 1, 1)
        for index, stride in enumerate(stem_strides(enc.patch_size, enc.stem_stages)[:-1]):  # the last makes tokens
            scale = tuple(a * b for a, b in zip(scale, stride))
            if scale in level_scale:
                found[level_scale[scale]] = index
        return found

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_encoder(cls, encoder, config: SegmentationConfig) -> "SegmentationNet":
        """A net whose encoder is a copy of ``encoder`` (same config, weights copied;
        the original is left untouched); the decoder is freshly initialised."""
        net = cls(encoder.config, config)
        net.encoder.load_state_dict(copy.deepcopy(encoder.state_dict()))
        return net

    def head_config(self) -> dict[str, Any]:
        """JSON-able: enough to rebuild this net with random weights."""
        return {"segmentation": self.config.to_dict(), "encoder": self.encoder.config.to_dict()}

    @classmethod
    def from_head_config(cls, config: Mapping[str, Any], folder=None, vlm=None) -> "SegmentationNet":
        """Rebuild from :meth:`head_config` (random weights; the checkpoint loader then
        loads them). Without an "encoder" entry the VolumeVLM's encoder config is used."""
        from volumevlm.models.encoder import EncoderConfig

        config = dict(config)
        if "segmentation" not in config:
            raise VolumeVLMError(f"{folder or 'segmentation head'}: head config has no 'segmentation' entry")
        if config.get("encoder") is not None:
            encoder_config = EncoderConfig.from_dict(dict(config["encoder"]))
        elif vlm is not None:
            encoder_config = vlm.encoder_config
        else:
            raise VolumeVLMError(f"{folder or 'segmentation head'}: head config has no encoder entry and no model to take it from")
        return cls(encoder_config, SegmentationConfig.from_dict(config["segmentation"]))

    @property
    def label_names(self) -> dict[int, str]:
        return dict(self.config.label_names)

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x float [B, 1, X, Y, Z] in [0, 1] -> logits float [B, num_classes, X, Y, Z]."""
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != 1:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError("segmentation input", f"expected a tensor [B, 1, X, Y, Z], got {shape}")
        spatial = tuple(x.shape[2:])
        patch = self.encoder.config.patch_size
        pad = [0] * 6
        for axis in range(3):  # F.pad lists the last axis first
            pad[2 * (2 - axis) + 1] = (-spatial[axis]) % patch[axis]
        if any(pad):
            x = F.pad(x, pad)
        if self.config.decoder == "fused":
            return self._forward_fused(x)[:, :, : spatial[0], : spatial[1], : spatial[2]].contiguous()
        encoded = self.encoder(x)
        maps, stem_maps = encoded.feature_maps, encoded.stem_maps
        if self.channels_last and x.device.type == "cpu":
            # The CPU's 3D convolutions (oneDNN) run about twice as fast, backward
            # included, on channels-last activations; the weights stay contiguous.
            x = x.contiguous(memory_format=torch.channels_last_3d)
            maps = [m.contiguous(memory_format=torch.channels_last_3d) for m in maps]
            stem_maps = [m.contiguous(memory_format=torch.channels_last_3d) for m in stem_maps]
        skips = [  # levels 1..S-1
            self.skips[i](stem_maps[self.stem_levels[i + 1]] if i + 1 in self.stem_levels else maps[src])
            for i, src in enumerate(self.skip_sources)
        ]
        h = maps[-1]
        if self.config.image_path:
            image = self.stem(self.encoder.windows(x))
            fine = [image]
            for down in self.image_down:
                fine.append(down(fine[-1]))
            skips = [image] + [token + conv for token, conv in zip(skips, fine[1:])]
            h = h + self.image_bottleneck(fine[-1])
        else:
            skips = [self.stem(self.encoder.windows(x) if self.config.decoder == "unet" else x)] + skips  # level 0 first
        for up, level in zip(self.ups, range(len(self.factors) - 1, -1, -1)):
            h = up(h, skips[level])
        logits = self.out(h)
        return logits[:, :, : spatial[0], : spatial[1], : spatial[2]].contiguous()


# ---------------------------------------------------------------------- inference


@torch.no_grad()
def sliding_window_logits(
    net: nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int] | None = None,
    overlap: float | None = None,
    sw_batch_size: int = 1,
) -> torch.Tensor:
    """Class logits of a preprocessed image by sliding-window inference.

    image: float [1, X, Y, Z] or [B, 1, X, Y, Z] (preprocessed, in [0, 1]); any size,
        larger or smaller than the ROI (smaller inputs are padded with 0, then cropped).
    roi_size / overlap: default ``net.config.roi_size`` / ``net.config.sw_overlap``.
    Returns the Gaussian-blended window logits [C, X, Y, Z] (or [B, C, X, Y, Z]) on the
    image's device. The net is run in whatever mode it is in (call ``net.eval()`` for
    inference).
    """
    from monai.inferers import sliding_window_inference

    if not isinstance(image, torch.Tensor) or image.dim() not in (4, 5) or image.shape[-4] != 1:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError("segmentation input", f"expected a tensor [1, X, Y, Z] or [B, 1, X, Y, Z], got {shape}")
    config = getattr(net, "config", None)
    roi = tuple(int(v) for v in (roi_size if roi_size is not None else config.roi_size))
    overlap = float(overlap if overlap is not None else config.sw_overlap)
    batched = image.dim() == 5
    x = image if batched else image[None]
    x = x.as_tensor() if hasattr(x, "as_tensor") else x
    param = next(net.parameters(), None)
    device = param.device if param is not None else x.device
    logits = sliding_window_inference(
        x.float(), roi, int(sw_batch_size), net, overlap=overlap, mode="gaussian", sw_device=device, device=x.device
    )
    return logits if batched else logits[0]


@torch.no_grad()
def sliding_window_segment(
    net: nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int] | None = None,
    overlap: float | None = None,
    sw_batch_size: int = 1,
) -> torch.Tensor:
    """Label map of a preprocessed image on its own grid: the argmax over classes of
    :func:`sliding_window_logits` (same arguments). Returns int64 labels with the
    image's shape ([1, X, Y, Z] or [B, 1, X, Y, Z]) on the image's device."""
    logits = sliding_window_logits(net, image, roi_size, overlap, sw_batch_size)
    return logits.argmax(dim=-4, keepdim=True)


def segment_to_input(net: SegmentationNet, x, preprocess_config=None):
    """Segment one CT volume and return the mask in the input's own geometry.

    x: anything :func:`volumevlm.data.transforms.preprocess` accepts (NIfTI / NRRD /
        MHA path, DICOM folder or zip, nibabel image, (array, affine), tensor, Volume),
        in HU.
    preprocess_config: the model's PreprocessConfig (``model.preprocess``); the same
        pipeline the encoder was trained with, without its centre pad/crop
        (:func:`volumevlm.data.transforms.whole_field`), so the whole input is segmented.
    The class probabilities (softmax of the blended window logits) are brought to the
    input's grid by linear interpolation and the argmax is taken there
    (:func:`volumevlm.data.transforms.argmax_on_input_grid`), so boundaries fall between
    the coarse grid's voxels rather than on them.
    Returns (nifti_image, label_names): a ``nibabel.Nifti1Image`` holding uint8 (int16
    beyond 255 classes) label indices with exactly the input's shape, stored
    orientation and affine, and
    {index: structure name}. The image header says what it is: ``descrip`` is a short
    note, the intent is NIFTI_INTENT_LABEL, and a JSON "comment" extension carries
    {"labels": {index: name}}, so a saved file keeps its names.
    """
    from volumevlm.data.transforms import preprocess, whole_field
    from volumevlm.io import as_volume

    volume = as_volume(x)  # read once; the same Volume is the geometry reference
    pre = preprocess(volume, whole_field(preprocess_config))
    return probabilities_to_input(net, segment_probabilities(net, pre), pre, volume), dict(net.config.label_names)


def segment_probabilities(net: SegmentationNet, pre) -> torch.Tensor:
    """The class probabilities float32 [C, X, Y, Z] (on the CPU) of one preprocessed
    image on its own grid, in eval mode and without autograd: the model's part of
    :func:`segment_to_input`, which a server runs on its model thread while reading and
    :func:`probabilities_to_input` happen elsewhere. The softmax is taken over dim 0 of
    the one case's logits, as the MONAI bundle's ``Activationsd`` takes it, so both
    give the same probabilities."""
    image = pre.as_tensor() if hasattr(pre, "as_tensor") else pre
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            logits = sliding_window_logits(net, image.to(next(net.parameters()).device))
            probabilities = torch.softmax(logits.float(), dim=0)
    finally:
        net.train(was_training)
    return probabilities.cpu()


def probabilities_to_input(net: SegmentationNet, probabilities: torch.Tensor, pre, volume):
    """Class probabilities [C, X, Y, Z] on the preprocessed grid of ``pre`` as the NIfTI
    mask in ``volume``'s own geometry, its header naming the labels (see
    :func:`segment_to_input`)."""
    import nibabel as nib
    import numpy as np

    from volumevlm.data.transforms import invert_to_input

    names = dict(net.config.label_names)
    dtype = np.uint8 if net.config.num_classes <= 256 else np.int16
    image = invert_to_input(probabilities, pre, volume, mode="probabilities")
    if image.get_data_dtype() != dtype:
        image = nib.Nifti1Image(np.asarray(image.dataobj).astype(dtype), image.affine, image.header)
        image.set_data_dtype(dtype)
    header = image.header
    header["descrip"] = NIFTI_DESCRIP.encode()[:79]
    header.set_intent("label")
    payload = json.dumps({LABELS_EXTENSION_KEY: {str(k): v for k, v in sorted(names.items())}}).encode()
    header.extensions.append(nib.nifti1.Nifti1Extension("comment", payload))
    return image


def save_segmentation(image, path) -> Path:
    """Write a mask from :func:`segment_to_input` to ``path`` (.nii or .nii.gz) atomically.

    The file keeps everything :func:`segment_to_input` put in the header, the label
    names included (a NIfTI-1 "comment" extension holding JSON ``{"labels": {index:
    name}}``; :func:`read_label_names` reads them back). Written to a temporary name
    beside ``path`` first and renamed into place, so a reader never sees half a file.
    """
    from volumevlm.io.writers import save_image_atomic

    return save_image_atomic(image, path)


def read_label_names(image_or_path) -> dict[int, str]:
    """{index: structure name} from a mask written by :func:`segment_to_input` /
    :func:`save_segmentation` (its JSON header extension). A NIfTI file without that
    extension raises InputError naming it."""
    import nibabel as nib

    image = image_or_path if isinstance(image_or_path, nib.Nifti1Image) else nib.load(str(image_or_path))
    where = image.get_filename() or "<segmentation image>"
    for extension in image.header.extensions:
        if extension.get_code() != 6:  # 6 = NIFTI_ECODE_COMMENT
            continue
        try:
            payload = json.loads(extension.get_content())
        except (ValueError, UnicodeDecodeError, TypeError):
            continue
        if isinstance(payload, dict) and isinstance(payload.get(LABELS_EXTENSION_KEY), dict):
            return {int(k): str(v) for k, v in payload[LABELS_EXTENSION_KEY].items()}
    raise InputError(where, "no volumevlm label-name extension in the NIfTI header (not a volumevlm segmentation?)")


def label_swap_table(label_names: Mapping[int, str], num_classes: int) -> torch.Tensor:
    """int64 [num_classes]: index -> the index of its mirror image under a left-right flip
    (kidney_left <-> kidney_right, ...); unpaired labels map to themselves."""
    table = torch.arange(num_classes)
    by_name = {name: index for index, name in label_names.items()}
    left, right = LEFT_RIGHT_SUFFIXES
    for name, index in by_name.items():
        if name.endswith(left):
            mirror = by_name.get(name[: -len(left)] + right)
            if mirror is not None:
                table[index], table[mirror] = mirror, index
    return table

