"""Report generation: a visual-prefix causal language model on top of the frozen image encoder.

::

    encoder tokens [B, N, C] (+ registers)  --VisualResampler-->  [B, K, d] --Linear--> [B, K, H]
                                                                  (K = num_visual_tokens)
    findings [B, F] in [0, 1]  --mix of learned "absent"/"present" embeddings-->  [B, F, H]
    [findings F] [visual prefix K] [BOS] [prompt tokens] [report tokens] [EOS]  --causal LM-->
                                                        next-token loss on the report tokens only

Findings conditioning (``findings`` in the config; diagnosis-driven report generation):
with the compressed visual tokens alone, a small decoder trained on templated reports
writes the most common (normal) report for every case. The decoder therefore also reads
one prefix token per finding. While it trains those say what the labeler
(:mod:`volumevlm.text.labeler`) reads in the training report (teacher forcing, each
flipped with probability ``findings_noise``); at inference they are the image's own
calls: a linear findings classifier on the frozen encoder's tokens
(:func:`finding_features`, fitted by :func:`volumevlm.train.report.fit_findings_classifier`)
at per-finding thresholds. ``generate(..., findings=...)`` writes from given findings
instead (the labeler's reading of a known report: the "oracle" figures). A head saved
without ``findings`` (before this existed) loads and writes as it did.

The image encoder is NOT part of this head: it is the VolumeVLM's shared ``encoder``,
frozen while the report head trains. The head holds

* :class:`VisualResampler`: ``num_visual_tokens`` learned queries cross-attend to the
  encoder's grid tokens and register tokens (a Perceiver resampler / Q-Former in the
  spirit of the token-compression papers), so the decoder always sees a fixed budget of
  visual tokens whatever the volume size; a linear map takes them to the decoder width.
* the decoder, either
    - ``pretrained: null`` (default): a small GPT-2-style causal LM built from the config
      (transformers ``GPT2LMHeadModel``; ``n_layer``, ``n_embd``, ``n_head``,
      ``n_positions``) over the VolumeVLM's OWN WordPiece tokenizer: vocabulary = that
      tokenizer's, ``[CLS]`` is the begin-of-sequence token, ``[SEP]`` the end-of-sequence
      token and ``[PAD]`` the padding token. That tokenizer is uncased, so generated text
      is lower case; :func:`tidy_wordpiece_text` restores punctuation spacing and sentence
      capitals. The decoder is rebuilt from :meth:`ReportGenerator.head_config` alone (it
      stores the GPT-2 config dict); the weights live in the checkpoint's model.safetensors.
    - ``pretrained: /local/hf/dir``: ``AutoModelForCausalLM.from_pretrained(dir,
      local_files_only=True)`` with the directory's own tokenizer (saved into the
      checkpoint's ``heads/report/tokenizer`` by :meth:`ReportGenerator.save_extra`),
      optionally with LoRA adapters through ``peft`` (not a volumevlm dependency). LoRA
      adapters are merged (:meth:`ReportGenerator.merge_lora`) before saving, so the saved
      decoder is a plain model.

With ``sections: true`` (the default, as Merlin does) a report is written organ system by
organ system: for each section name (the headers of the synthetic reports,
:data:`volumevlm.text.sections.SECTIONS`, then ``IMPRESSION``) the prompt is the header
("LIVER AND BILIARY TREE:") and the decoder continues it; the report is the sections
joined in order. Trained on synthetic reports, generated text is NOT a clinical report.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from volumevlm.errors import InputError, VolumeVLMError, one_line
from volumevlm.models.anatomy import (
    DEFAULT_ORGAN_STATISTICS,
    LEGACY_ORGAN_STATISTICS,
    check_organ_statistics,
    organ_statistics_width,
)
from volumevlm.text.sections import IMPRESSION_HEADER, SECTIONS, split_report

IGNORE_INDEX = -100
TOKENIZER_DIR = "tokenizer"
DEFAULT_SECTION_NAMES: tuple[str, ...] = (*SECTIONS, IMPRESSION_HEADER)
# What the findings classifier may read (ReportConfig.findings_features).
FINDINGS_FEATURES = ("grid", "organs")
GENERATION_KEYS = ("max_new_tokens", "num_beams", "repetition_penalty", "no_repeat_ngram_size", "length_penalty",
                   "do_sample", "top_p", "temperature", "consistent_candidates", "bank_fallback")
# Texts the section bank keeps per section and labeler reading (ReportConfig.section_bank).
BANK_TEXTS_PER_READING = 4


@dataclass
class ReportConfig:
    """Hyper-parameters of :class:`ReportGenerator`.

    Visual tokens: ``num_visual_tokens`` (K, the fixed budget of visual tokens the decoder
    sees), ``resampler_dim`` (width d of the resampler; None = the encoder's width),
    ``resampler_depth`` / ``resampler_heads`` / ``resampler_dropout``,
    ``position_frequencies`` (Fourier frequencies per axis of the grid-position encoding
    added to the encoder tokens; 0 = none).

    Decoder: ``pretrained`` (None = a new GPT-2-style model over the VolumeVLM tokenizer;
    else a local Hugging Face directory), ``n_layer`` / ``n_embd`` / ``n_head`` /
    ``n_positions`` (positions must hold K + prompt + report tokens) / ``dropout`` for the
    new model; ``lora`` (pretrained only; needs ``pip install peft``), ``lora_r``,
    ``lora_alpha``, ``lora_dropout``, ``lora_target_modules`` (None = peft's default
    for the architecture).

    Text: ``sections`` (write section by section), ``section_names`` (empty = the
    synthetic reports' organ systems + IMPRESSION), ``max_target_tokens`` (training
    targets are truncated to this many tokens: per section, or the whole report).

    Findings: ``findings`` (labeler keys, :data:`volumevlm.text.labeler.KNOWN_FINDINGS`)
    whose presence conditions the decoder, one prefix token per finding in front of the
    visual tokens; empty = no findings conditioning (the heads saved before it existed).
    ``findings_noise``: during training the decoder reads the labeler's reading of the
    training report (teacher forcing), each finding flipped with this probability so it
    learns to write what the prefix says without trusting it blindly.
    ``findings_in_prompt``: the present findings are also written, as words, in front of
    each section's header ("splenomegaly. SPLEEN:"): a small decoder learns to copy a word
    it reads long before it learns what 18 new prefix embeddings mean. ``section_findings``
    names the findings each section's prompt may carry (section -> findings, fitted from
    the training reports by :func:`section_findings_of`); a section it does not list, and
    IMPRESSION, carry every present finding. ``findings_features``: what the findings
    classifier reads at inference: ``grid`` (the mean and max over the encoder's grid
    tokens, :func:`finding_features`) or ``organs`` (the tokens averaged inside each organ
    of the model's own segmentation, plus each organ's size and HU histogram:
    :func:`image_finding_features`; needs a segmentation head, whose class count is kept
    as ``organ_classes`` when the classifier is fitted; ``organ_statistics`` names the
    histogram recipe, :data:`volumevlm.models.anatomy.ORGAN_STATISTICS`).

    Generation defaults: ``max_new_tokens`` (per section when ``sections``),
    ``num_beams`` (1 = greedy), ``repetition_penalty`` (1.0 = off),
    ``no_repeat_ngram_size`` (0 = off), ``length_penalty`` (beam search only),
    ``do_sample`` (False = deterministic search), ``top_p`` / ``temperature`` (sampling only),
    ``consistent_candidates`` (heads conditioned on findings: each section is written this
    many ways, the best beams or samples, and the labeler picks the one that states what
    the case's findings say; 1 = the decoder's first choice, see :meth:`ReportGenerator.generate`),
    ``bank_fallback`` (a section none of whose candidates states the case's findings is
    taken from ``section_bank`` instead: of the bank's texts that state them, the one the
    decoder finds most likely after the case's prefix; see :meth:`ReportGenerator.generate`).
    ``section_bank``: section -> texts of the training reports, a few per labeler reading
    (fitted by :func:`section_bank_of` when the head is trained; None = no bank).
    """

    num_visual_tokens: int = 32
    resampler_dim: int | None = None
    resampler_depth: int = 2
    resampler_heads: int = 4
    resampler_dropout: float = 0.1
    position_frequencies: int = 4
    pretrained: str | None = None
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 256
    dropout: float = 0.1
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] | None = None
    sections: bool = True
    section_names: tuple[str, ...] = ()
    max_target_tokens: int = 96
    max_new_tokens: int = 64
    num_beams: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0
    do_sample: bool = False
    top_p: float = 1.0
    temperature: float = 1.0
    consistent_candidates: int = 1
    bank_fallback: bool = False
    section_bank: dict[str, tuple[str, ...]] | None = None
    findings: tuple[str, ...] = ()
    findings_noise: float = 0.01
    findings_in_prompt: bool = False
    section_findings: dict[str, tuple[str, ...]] | None = None
    findings_features: str = "grid"
    organ_classes: int = 0
    organ_statistics: str = DEFAULT_ORGAN_STATISTICS

    def __post_init__(self):
        self.section_names = tuple(str(s) for s in (self.section_names or DEFAULT_SECTION_NAMES))
        if self.findings:
            from volumevlm.text.labeler import KNOWN_FINDINGS, resolve_findings

            self.findings = tuple(resolve_findings([str(f) for f in self.findings]))
            unknown = [f for f in self.findings if f not in KNOWN_FINDINGS]
            if unknown or len(set(self.findings)) != len(self.findings):
                raise VolumeVLMError(f"report config: findings must be distinct findings the labeler knows, got {list(self.findings)}")
        else:
            self.findings = ()
        self.findings_in_prompt = bool(self.findings_in_prompt)
        if self.findings_features not in FINDINGS_FEATURES:
            raise VolumeVLMError(f"report config: findings_features must be one of {list(FINDINGS_FEATURES)}, "
                                 f"got {self.findings_features!r}")
        check_organ_statistics(self.organ_statistics)
        if isinstance(self.organ_classes, bool) or not isinstance(self.organ_classes, int) or self.organ_classes < 0:
            raise VolumeVLMError(f"report config: organ_classes must be an integer >= 0, got {self.organ_classes!r}")
        if self.findings_in_prompt and not self.findings:
            raise VolumeVLMError("report config: findings_in_prompt needs findings (report.head.findings or condition_on_findings)")
        if self.section_findings is not None:
            if not isinstance(self.section_findings, Mapping):
                raise VolumeVLMError(f"report config: section_findings must map section names to findings, got {self.section_findings!r}")
            mapped = {str(k): tuple(str(f) for f in v) for k, v in self.section_findings.items()}
            stray = sorted({f for v in mapped.values() for f in v} - set(self.findings))
            if stray:
                raise VolumeVLMError(f"report config: section_findings names findings the head does not have: {stray}")
            self.section_findings = mapped
        if self.section_bank is not None:
            if not isinstance(self.section_bank, Mapping) or any(
                    not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts)
                    for texts in self.section_bank.values()):
                raise VolumeVLMError("report config: section_bank must map section names to lists of texts")
            self.section_bank = {str(k): tuple(v) for k, v in self.section_bank.items()}
        if not isinstance(self.bank_fallback, bool):
            raise VolumeVLMError(f"report config: bank_fallback must be true or false, got {self.bank_fallback!r}")
        if self.bank_fallback and not self.sections:
            raise VolumeVLMError("report config: bank_fallback replaces sections, so it needs sections: true")
        self.do_sample = bool(self.do_sample)
        if not (0.0 < float(self.top_p) <= 1.0 and float(self.temperature) > 0.0 and 0.0 <= float(self.findings_noise) < 0.5):
            raise VolumeVLMError(
                f"report config: need 0 < top_p <= 1, temperature > 0 and 0 <= findings_noise < 0.5, got "
                f"{self.top_p!r}, {self.temperature!r}, {self.findings_noise!r}"
            )
        if self.lora_target_modules is not None:
            self.lora_target_modules = tuple(str(m) for m in self.lora_target_modules)
        if self.pretrained is not None:
            self.pretrained = str(self.pretrained)
        positive = ("num_visual_tokens", "resampler_depth", "resampler_heads", "n_layer", "n_embd", "n_head",
                    "n_positions", "max_target_tokens", "max_new_tokens", "num_beams", "lora_r", "consistent_candidates")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise VolumeVLMError(f"report config: {name} must be a positive integer, got {value!r}")
        if self.resampler_dim is not None and (self.resampler_dim < 1 or self.resampler_dim % self.resampler_heads):
            raise VolumeVLMError(
                f"report config: resampler_dim {self.resampler_dim} must be positive "
                f"and divisible by resampler_heads {self.resampler_heads}"
            )
        if self.n_embd % self.n_head:
            raise VolumeVLMError(f"report config: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        for name in ("resampler_dropout", "dropout", "lora_dropout"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise VolumeVLMError(f"report config: {name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.position_frequencies < 0 or self.no_repeat_ngram_size < 0 or self.repetition_penalty <= 0:
            raise VolumeVLMError(
                "report config: position_frequencies and no_repeat_ngram_size must be >= 0 and repetition_penalty > 0"
            )
        if self.lora and self.pretrained is None:
            raise VolumeVLMError("report config: lora needs a pretrained decoder (set pretrained: /local/hf/dir)")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "ReportConfig":
        """From a (Hydra/JSON) mapping; unknown keys raise a one-line VolumeVLMError."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise VolumeVLMError(f"report config: unknown keys {unknown}; known: {sorted(known)}")
        for key in ("section_names", "lora_target_modules", "findings"):
            if isinstance(values.get(key), str):
                raise VolumeVLMError(f"report config: {key} must be a list of strings, got one string")
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["section_names"] = list(self.section_names)
        out["findings"] = list(self.findings)
        if self.section_findings is not None:
            out["section_findings"] = {k: list(v) for k, v in self.section_findings.items()}
        if self.section_bank is not None:
            out["section_bank"] = {k: list(v) for k, v in self.section_bank.items()}
        if self.lora_target_modules is not None:
            out["lora_target_modules"] = list(self.lora_target_modules)
        return out

    def generation(self) -> dict[str, Any]:
        """The generation defaults as keyword arguments of :meth:`ReportGenerator.generate`."""
        return {key: getattr(self, key) for key in GENERATION_KEYS}


# ---------------------------------------------------------------------- visual tokens


def encoder_features(output) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(tokens [B, N + R, C], grid) from a VolumeEncoder's EncoderOutput: the N = gx*gy*gz
    grid tokens (x-major) followed by the R register tokens; grid = (gx, gy, gz)."""
    tokens = torch.cat([output.tokens, output.registers], dim=1) if output.registers.shape[1] else output.tokens
    return tokens, tuple(int(g) for g in output.grid)


def grid_coordinates(grid: Sequence[int], device=None) -> torch.Tensor:
    """Token centres in [-1, 1] per axis, float32 [gx*gy*gz, 3], x-major (the encoder's token order)."""
    axes = [(torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n * 2.0 - 1.0 for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def finding_feature_width(config: "ReportConfig", encoder_dim: int) -> int:
    """Input width of the findings classifier of a head with ``config`` on an encoder of width C."""
    if config.findings_features == "organs":
        if config.organ_classes < 2:
            raise VolumeVLMError("report config: findings_features=organs needs organ_classes (the segmentation "
                                 "head's class count, background included)")
        return (config.organ_classes - 1) * (int(encoder_dim) + organ_statistics_width(config.organ_statistics))
    return 2 * int(encoder_dim)


def finding_features(tokens: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
    """What the findings classifier reads: [B, 2C], the mean and the max over the grid
    tokens of encoder tokens [B, N (+ R), C] (registers, after the grid, are left out when
    ``grid`` says where the grid ends). The max keeps a small local abnormality (a
    stone, a lesion) that the mean over the whole body washes out."""
    if tokens.ndim != 3:
        raise VolumeVLMError(f"findings classifier: expected encoder tokens [B, N, C], got {list(tokens.shape)}")
    if grid is not None:
        tokens = tokens[:, : int(math.prod(grid))]
    tokens = tokens.float()
    return torch.cat([tokens.mean(dim=1), tokens.amax(dim=1)], dim=-1)


class _CrossAttentionBlock(nn.Module):
    """Latents attend to [inputs; latents] (Flamingo's resampler), then an MLP; pre-norm residuals."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm_latents = nn.LayerNorm(dim)
        self.norm_inputs = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, latents: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        q = self.norm_latents(latents)
        kv = torch.cat([self.norm_inputs(inputs), q], dim=1)
        latents = latents + self.drop(self.attn(q, kv, kv, need_weights=False)[0])
        return latents + self.drop(self.mlp(self.norm_mlp(latents)))


class VisualResampler(nn.Module):
    """A fixed number of visual tokens from any number of encoder tokens.

    in_dim: encoder width C. out_dim: decoder hidden size H. num_queries: K.
    dim: resampler width d (None = in_dim). depth / heads / dropout: cross-attention blocks.
    position_frequencies: Fourier frequencies per axis for the grid-position encoding
    (0 = none). The encoder's tokens carry position only through its rotary attention, so
    each grid token gets an explicit encoding of its (x, y, z) centre; register tokens get
    one learned "register" vector instead.

    forward(tokens float [B, N, C], grid (gx, gy, gz) or None) -> float [B, K, H]; with a
    grid, the first gx*gy*gz tokens are the x-major grid and the rest are registers.
    ``visual_tokens`` gives the [B, K, d] resampler output before the map to H.
    """

    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 32, dim: int | None = None, depth: int = 2,
                 heads: int = 4, mlp_ratio: float = 4.0, dropout: float = 0.0, position_frequencies: int = 4):
        super().__init__()
        dim = int(dim or in_dim)
        if dim % heads:
            raise VolumeVLMError(f"visual resampler: width {dim} is not divisible by heads {heads}")
        self.in_dim, self.out_dim, self.dim, self.num_queries = int(in_dim), int(out_dim), dim, int(num_queries)
        self.position_frequencies = int(position_frequencies)
        self.input_proj = nn.Linear(in_dim, dim) if dim != in_dim else nn.Identity()
        if self.position_frequencies:
            self.position_proj = nn.Linear(6 * self.position_frequencies, dim)
            self.register_embedding = nn.Parameter(torch.zeros(dim))
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.blocks = nn.ModuleList(_CrossAttentionBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.output_proj = nn.Linear(dim, out_dim)

    def position_encoding(self, grid: Sequence[int], device) -> torch.Tensor:
        """[gx*gy*gz, d]: the projected sin/cos features of each grid token's centre."""
        coords = grid_coordinates(grid, device)  # [N, 3]
        scales = (2.0 ** torch.arange(self.position_frequencies, device=device, dtype=torch.float32)) * math.pi
        angles = (coords[:, :, None] * scales).flatten(1)  # [N, 3F]
        return self.position_proj(torch.cat([angles.sin(), angles.cos()], dim=-1))

    def visual_tokens(self, tokens: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        """[B, K, d] from tokens [B, N, C]."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.in_dim:
            raise VolumeVLMError(
                f"visual resampler: expected encoder tokens [B, N, {self.in_dim}], got {list(tokens.shape)}"
            )
        x = self.input_proj(tokens)
        if grid is not None and self.position_frequencies:
            n_grid = int(math.prod(grid))
            if n_grid > x.shape[1]:
                raise VolumeVLMError(f"visual resampler: grid {tuple(grid)} has {n_grid} tokens but only {x.shape[1]} were given")
            pos = self.position_encoding(grid, x.device).to(x.dtype)
            extra = self.register_embedding.to(x.dtype).expand(x.shape[1] - n_grid, -1)
            x = x + torch.cat([pos, extra], dim=0)[None]
        latents = self.queries.to(x.dtype).expand(x.shape[0], -1, -1)
        for block in self.blocks:
            latents = block(latents, x)
        return self.norm(latents)

    def forward(self, tokens: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        return self.output_proj(self.visual_tokens(tokens, grid))


# ---------------------------------------------------------------------- text helpers


# Sentence ends inside a section's text, and the "2. " of a numbered impression item.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")
_LIST_NUMBER = re.compile(r"^\d+\.\s+")


@functools.lru_cache(maxsize=65536)
def _labeler_reading(text: str, findings: tuple[str, ...]) -> np.ndarray:
    """The labeler's reading of one text over ``findings``: bool [F], hedged = present.
    Cached: the candidates of a section repeat the same few sentences case after case."""
    from volumevlm.text.labeler import findings_matrix, label_reports

    reading = findings_matrix(label_reports([text], findings), findings, uncertain_as=1)[0] == 1
    reading.setflags(write=False)
    return reading


def finding_words(key: str) -> str:
    """A finding key as the words a prompt writes ("abdominal_aortic_aneurysm" -> "abdominal aortic aneurysm")."""
    return key.replace("_", " ")


def section_findings_of(reports: Sequence[str], findings: Sequence[str], section_names: Sequence[str],
                        share: float = 0.2) -> dict[str, list[str]]:
    """Which findings each organ section reports, read from reports: a finding belongs to
    the section where the labeler reads it present most often, and to every section where
    it does at least ``share`` times as often (IMPRESSION, which restates them all, is left out).
    Returns {section: [finding keys in ``findings`` order]} for the sections seen."""
    from volumevlm.text.labeler import findings_matrix, label_reports

    counts: dict[str, Any] = {}
    for report in reports:
        for name, text in section_pairs(report, section_names):
            if name == IMPRESSION_HEADER:
                continue
            # int64: the labeler's matrix is int8, and a finding stated in more than 127
            # reports would wrap around to a negative count.
            row = findings_matrix(label_reports([f"{name}: {text}"], findings), findings, uncertain_as=1)[0].astype(np.int64)
            counts[name] = counts.get(name, 0) + row
    if not counts:
        return {}
    most = np.max(np.stack(list(counts.values())), axis=0)
    out = {}
    for name, row in counts.items():
        out[name] = [f for j, f in enumerate(findings) if row[j] > 0 and row[j] >= share * most[j]]
    return out


def section_bank_of(reports: Sequence[str], findings: Sequence[str], section_names: Sequence[str],
                    per_reading: int = BANK_TEXTS_PER_READING) -> dict[str, list[str]]:
    """Texts a section may be taken from when the decoder cannot write it (``bank_fallback``),
    read from (training) reports: for each section, the texts grouped by what the labeler
    reads in them over ``findings`` (the same reading :meth:`ReportGenerator.consistent_choice`
    checks), the ``per_reading`` most frequent of each reading (first seen first on ties).
    Returns {section: [texts]} for the sections seen, readings in first-seen order."""
    findings = tuple(findings)
    counts: dict[str, dict[str, int]] = {}
    for report in reports:
        for name, text in section_pairs(report, section_names):  # texts with their spaces tidied
            counts.setdefault(name, {})
            counts[name][text] = counts[name].get(text, 0) + 1
    bank: dict[str, list[str]] = {}
    for name in section_names:
        if name not in counts:
            continue
        by_reading: dict[bytes, list[str]] = {}
        for text in counts[name]:  # first-seen order
            by_reading.setdefault(_labeler_reading(f"{name}: {text}", findings).tobytes(), []).append(text)
        bank[name] = [text for texts in by_reading.values()
                      for text in sorted(texts, key=lambda t: -counts[name][t])[:per_reading]]
    return bank


def tidy_wordpiece_text(text: str) -> str:
    """Readable text from an uncased WordPiece decode: no space before . , ; : % ),
    none after (, none around - and /, "4. 2 cm" -> "4.2 cm", sentences capitalised."""
    text = re.sub(r"\s+([.,;:%)])", r"\1", text)
    text = re.sub(r"\(\s+", "(", text)
    text = re.sub(r"\s*([-/])\s*", r"\1", text)
    # The synthetic reports write decimals with one digit before a unit; the BERT
    # pre-tokenizer splits them at the point ("4 . 2 cm").
    text = re.sub(r"(\d)\. (\d) (cm|mm)\b", r"\1.\2 \3", text)
    text = re.sub(r"(^|[.;]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), text.strip())
    return text


def section_pairs(report: str, section_names: Sequence[str]) -> list[tuple[str, str]]:
    """(section name, text) of a report, in ``section_names`` order, for the sections it has
    (non-empty text). A report with none of them gives [] (see ReportGenerator.training_texts)."""
    parts = split_report(report)
    return [(name, parts[name]) for name in section_names if parts.get(name, "").strip()]


def _load_local_decoder(directory: str):
    """(decoder, tokenizer) from a local Hugging Face directory; one-line errors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(directory).expanduser()
    if not folder.is_dir():
        raise InputError(folder, "report decoder directory not found (report.pretrained must be a local Hugging Face folder)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise InputError(folder, f"no usable tokenizer for the report decoder ({one_line(err)})") from None
    try:
        decoder = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise InputError(folder, f"no usable causal language model ({one_line(err)})") from None
    return decoder, tokenizer


def _decoder_from_config(config: Mapping[str, Any]):
    """A causal LM with random weights from its Hugging Face config dict."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(config)
    model_type = values.pop("model_type", None)
    if not model_type:
        raise VolumeVLMError("report head config: the decoder config has no model_type")
    try:
        hf_config = AutoConfig.for_model(model_type, **values)
        return AutoModelForCausalLM.from_config(hf_config)
    except (KeyError, ValueError, TypeError) as err:
        raise VolumeVLMError(f"report head config: cannot rebuild the {model_type} decoder ({one_line(err)})") from None


def _apply_lora(decoder, config: ReportConfig):
    try:
        import peft
    except ImportError:
        raise VolumeVLMError("report config: lora needs the peft package, which is not installed (pip install peft)") from None
    lora = peft.LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules) if config.lora_target_modules else None,
        task_type="CAUSAL_LM",
    )
    try:
        return peft.get_peft_model(decoder, lora)
    except ValueError as err:
        raise VolumeVLMError(f"report config: LoRA cannot be applied to this decoder ({one_line(err)}); set lora_target_modules") from None


# ---------------------------------------------------------------------- the head


class ReportGenerator(nn.Module):
    """The report head: visual resampler + causal LM decoder (see the module docstring).

    config: :class:`ReportConfig`. encoder_dim: width C of the encoder tokens.
    tokenizer: the decoder's tokenizer (the VolumeVLM's for the default decoder).
    decoder: a transformers causal LM (``get_input_embeddings``, ``generate``).
    tokenizer_source: "vlm" (the VolumeVLM's own tokenizer) or "own" (the pretrained
    decoder's, saved by :meth:`save_extra`).

    Build a new one with :meth:`build`; a checkpoint rebuilds it with
    :meth:`from_head_config`.
    """

    head_type: ClassVar[str] = "report"

    def __init__(self, config: ReportConfig, encoder_dim: int, tokenizer, decoder: nn.Module, tokenizer_source: str = "vlm"):
        super().__init__()
        self.config = config
        self.encoder_dim = int(encoder_dim)
        self.tokenizer = tokenizer
        self.tokenizer_source = tokenizer_source
        self.decoder = decoder
        self.hidden_size = int(decoder.get_input_embeddings().weight.shape[1])
        self.resampler = VisualResampler(
            self.encoder_dim,
            self.hidden_size,
            num_queries=config.num_visual_tokens,
            dim=config.resampler_dim,
            depth=config.resampler_depth,
            heads=config.resampler_heads,
            dropout=config.resampler_dropout,
            position_frequencies=config.position_frequencies,
        )
        self.bos_id, self.eos_id, self.pad_id = _special_ids(tokenizer, decoder)
        if config.findings:
            n = len(config.findings)
            # A linear probe of the frozen encoder (fitted by the training task, see
            # volumevlm.train.report.fit_findings_classifier) predicts the findings at
            # inference, so no report is needed; the decoder reads one prefix token per
            # finding: the learned "absent" and "present" embeddings mixed by P(present).
            self.findings_classifier = nn.Linear(finding_feature_width(config, self.encoder_dim), n)
            nn.init.zeros_(self.findings_classifier.weight)
            nn.init.zeros_(self.findings_classifier.bias)
            self.register_buffer("finding_thresholds", torch.full((n,), 0.5))
            self.finding_embeddings = nn.Parameter(torch.randn(n, 2, self.hidden_size) * 0.02)

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(cls, config: ReportConfig | Mapping[str, Any] | None, vlm) -> "ReportGenerator":
        """A new head (random resampler; a new GPT-2 decoder, or the local pretrained one)
        for the VolumeVLM ``vlm`` (its encoder width, and its tokenizer for the default decoder)."""
        config = config if isinstance(config, ReportConfig) else ReportConfig.from_dict(config)
        encoder_dim = int(vlm.encoder.config.dim)
        if config.pretrained is None:
            decoder = cls._new_gpt2(config, vlm.tokenizer)
            return cls(config, encoder_dim, vlm.tokenizer, decoder, tokenizer_source="vlm")
        decoder, tokenizer = _load_local_decoder(config.pretrained)
        if config.lora:
            decoder = _apply_lora(decoder, config)
        return cls(config, encoder_dim, tokenizer, decoder, tokenizer_source="own")

    @staticmethod
    def _new_gpt2(config: ReportConfig, tokenizer):
        from transformers import GPT2Config, GPT2LMHeadModel

        ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (("bos", "[CLS]"), ("eos", "[SEP]"), ("pad", "[PAD]"))}
        if any(i is None or i == tokenizer.unk_token_id for i in ids.values()):
            raise VolumeVLMError("report decoder: the VolumeVLM tokenizer lacks [CLS]/[SEP]/[PAD]")
        gpt2 = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=config.n_positions,
            n_embd=config.n_embd,
            n_layer=config.n_layer,
            n_head=config.n_head,
            resid_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            attn_pdrop=config.dropout,
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
            pad_token_id=ids["pad"],
        )
        return GPT2LMHeadModel(gpt2)

    def head_config(self) -> dict[str, Any]:
        """JSON-able description that rebuilds this head (random weights) with :meth:`from_head_config`."""
        if self.has_unmerged_lora():
            raise VolumeVLMError("report head: LoRA adapters are not merged; call merge_lora() before saving")
        decoder_config = self.decoder.config.to_dict()
        # Paths and versions of the machine that trained it do not describe the architecture.
        for key in ("_name_or_path", "transformers_version"):
            decoder_config.pop(key, None)
        return {
            "config": self.config.to_dict(),
            "encoder_dim": self.encoder_dim,
            "decoder_config": decoder_config,
            "tokenizer": self.tokenizer_source,
        }

    @classmethod
    def from_head_config(cls, config: Mapping[str, Any], folder: str | Path | None, vlm) -> "ReportGenerator":
        """Rebuild (random weights) from :meth:`head_config`'s dict; folder = the
        checkpoint's heads/report (holds the tokenizer of a pretrained decoder)."""
        try:
            saved = dict(config["config"])
            if saved.get("findings_features") == "organs":
                # A head saved before the setting existed read the legacy histograms.
                saved.setdefault("organ_statistics", LEGACY_ORGAN_STATISTICS)
            report_config = ReportConfig.from_dict(saved)
            encoder_dim = int(config["encoder_dim"])
            decoder_config = config["decoder_config"]
            source = config.get("tokenizer", "vlm")
        except (KeyError, TypeError) as err:
            raise VolumeVLMError(f"report head config: incomplete ({type(err).__name__}: {one_line(err)})") from None
        # The saved decoder is plain: adapters were merged before saving.
        report_config.lora = False
        decoder = _decoder_from_config(decoder_config)
        if source == "vlm":
            tokenizer = vlm.tokenizer
        else:
            from transformers import AutoTokenizer

            where = Path(folder) / TOKENIZER_DIR if folder is not None else None
            if where is None or not where.is_dir():
                raise VolumeVLMError(f"{where}: the report head's tokenizer is missing from the checkpoint")
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(where), local_files_only=True)
            except (OSError, ValueError) as err:
                raise InputError(where, f"unreadable report tokenizer ({one_line(err)})") from None
        return cls(report_config, encoder_dim, tokenizer, decoder, tokenizer_source=source)

    def save_extra(self, folder: str | Path) -> None:
        """Files beside the weights: the pretrained decoder's tokenizer (nothing for the default decoder)."""
        if self.tokenizer_source != "vlm":
            target = Path(folder) / TOKENIZER_DIR
            target.mkdir(parents=True, exist_ok=True)
            self.tokenizer.save_pretrained(str(target))

    def has_unmerged_lora(self) -> bool:
        return hasattr(self.decoder, "merge_and_unload") and hasattr(self.decoder, "peft_config")

    def merge_lora(self) -> None:
        """Fold LoRA adapters into the decoder weights (no-op without them): the decoder becomes plain."""
        if self.has_unmerged_lora():
            self.decoder = self.decoder.merge_and_unload()

    # ------------------------------------------------------------------ text <-> ids

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_text(self, section: str, present: Sequence[str] = ()) -> str:
        """The prompt of a section: its header with a colon ("LIVER AND BILIARY TREE:"),
        with ``findings_in_prompt`` preceded by the words of the present findings that
        section reports ("splenomegaly. SPLEEN:"; see :meth:`section_words`)."""
        words = self.section_words(section, present)
        return f"{words}. {section}:" if words else f"{section}:"

    def section_words(self, section: str, present: Sequence[str]) -> str:
        """The present findings (keys) a section's prompt names, as words in the head's
        finding order ("" when none, or without ``findings_in_prompt``)."""
        if not self.config.findings_in_prompt or not present:
            return ""
        mapping = self.config.section_findings or {}
        allowed = set(mapping[section]) if section in mapping and section != IMPRESSION_HEADER else None
        chosen = set(present)
        keys = [f for f in self.config.findings if f in chosen and (allowed is None or f in allowed)]
        return ", ".join(finding_words(k) for k in keys)

    def present_findings(self, findings: torch.Tensor) -> list[list[str]]:
        """Finding keys at >= 0.5 per case of a findings tensor [B, F] over ``config.findings``."""
        return [[self.config.findings[j] for j in range(findings.shape[1]) if float(row[j]) >= 0.5] for row in findings]

    def training_texts(self, report: str, present: Sequence[str] = ()) -> list[tuple[str | None, str]]:
        """(prompt, target) pairs a report trains on: one per section present (prompt =
        the header, with ``findings_in_prompt`` after the words of ``present``) with
        ``sections``; else, or when the report has none of the sections, (None, whole report)."""
        if self.config.sections:
            pairs = section_pairs(report, self.config.section_names)
            if pairs:
                return [(self.prompt_text(name, present), text) for name, text in pairs]
        return [(None, report.strip())]

    def reference_text(self, report: str) -> str:
        """The part of a reference report this head is trained to write, laid out as
        :meth:`generate` lays out its output (for comparing the two): with ``sections``,
        the report's sections in order (a missing one is left out) under ``FINDINGS:`` and
        ``IMPRESSION:``; else the whole report. Headers such as EXAMINATION or TECHNIQUE,
        which the generator never writes, are dropped."""
        pairs = [(name, text) for name, text in section_pairs(report, self.config.section_names)] if self.config.sections else []
        if not pairs:
            return report.strip() + "\n"
        return self._assemble(dict(pairs))

    def encode_targets(self, targets: Sequence[str], prompts: Sequence[str | None] | None = None) -> dict[str, torch.Tensor]:
        """Token tensors of M training sequences ``[BOS] prompt target [EOS]`` (right-padded).

        Returns {"input_ids" long [M, T], "attention_mask" long [M, T], "labels" long [M, T]}:
        labels are the target and EOS ids, IGNORE_INDEX (-100) on BOS, prompt and padding.
        Targets are truncated to ``config.max_target_tokens`` tokens.
        """
        prompts = list(prompts) if prompts is not None else [None] * len(targets)
        if len(prompts) != len(targets):
            raise VolumeVLMError(f"report targets: {len(targets)} targets but {len(prompts)} prompts")
        rows, labels = [], []
        for prompt, target in zip(prompts, targets):
            head = [self.bos_id, *(self._encode(prompt) if prompt else [])]
            body = [*self._encode(target)[: self.config.max_target_tokens], self.eos_id]
            rows.append(head + body)
            labels.append([IGNORE_INDEX] * len(head) + body)
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        lab = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for i, (row, label) in enumerate(zip(rows, labels)):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            lab[i, : len(label)] = torch.tensor(label)
        return {"input_ids": ids, "attention_mask": mask, "labels": lab}

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids (stops at EOS; special tokens dropped)."""
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return tidy_wordpiece_text(text) if self.tokenizer_source == "vlm" else text.strip()

    # ------------------------------------------------------------------ findings

    def findings_readings(self, reports: Sequence[str]) -> torch.Tensor:
        """The labeler's reading of reports: float [B, F] over ``config.findings``, 1 where
        a report affirms (or hedges on) a finding, 0 where it denies or does not mention it."""
        from volumevlm.text.labeler import findings_matrix, label_reports

        self._need_findings()
        labels = label_reports(list(reports), self.config.findings)
        return torch.from_numpy(findings_matrix(labels, self.config.findings, uncertain_as=1).astype("float32"))

    def findings_of(self, present: Sequence[Any]) -> torch.Tensor:
        """float [B, F] from B collections of finding names (plain English or keys): 1 = present."""
        from volumevlm.text.labeler import resolve_findings

        self._need_findings()
        out = torch.zeros(len(present), len(self.config.findings))
        column = {key: j for j, key in enumerate(self.config.findings)}
        for i, names in enumerate(present):
            if isinstance(names, str):
                raise VolumeVLMError("report findings: give a collection of finding names per case, not one string")
            for key in resolve_findings(list(names)):
                if key not in column:
                    raise VolumeVLMError(f"report findings: {key!r} is not one of this head's findings {list(self.config.findings)}")
                out[i, column[key]] = 1.0
        return out

    @torch.no_grad()
    def predict_findings(self, encoder_tokens: torch.Tensor | None, grid: Sequence[int] | None = None,
                         features: torch.Tensor | None = None) -> torch.Tensor:
        """P(present) float [B, F] over ``config.findings`` from the image alone (the findings
        classifier). ``features``: the classifier's input, precomputed (required for an
        ``organs`` head: :func:`image_finding_features` computes it with the model's
        segmentation head); else the grid features of ``encoder_tokens``."""
        self._need_findings()
        if features is None:
            if self.config.findings_features != "grid":
                raise VolumeVLMError(
                    "report head: its findings classifier reads organ features; compute them with "
                    "volumevlm.models.report.image_finding_features(head, tokens, grid, images, "
                    "model.head('segmentation'), hu_window=model.preprocess.hu_window), or call generate_reports")
            features = finding_features(encoder_tokens, grid)
        weight = self.findings_classifier.weight
        if features.ndim != 2 or features.shape[1] != weight.shape[1]:
            raise VolumeVLMError(f"report head: findings features {list(features.shape)}, the classifier reads "
                                 f"[B, {weight.shape[1]}]")
        return torch.sigmoid(self.findings_classifier(features.to(weight.device, weight.dtype)))

    def findings_calls(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Present (1.0) / absent (0.0) [B, F]: probabilities at or above each finding's threshold."""
        return (probabilities >= self.finding_thresholds.to(probabilities.device)).to(probabilities.dtype)

    def _need_findings(self) -> None:
        if not self.config.findings:
            raise VolumeVLMError("report head: this head is not conditioned on findings (its config lists none)")

    def findings_prefix(self, findings: torch.Tensor) -> torch.Tensor:
        """Prefix embeddings [B, F, H] of findings float [B, F] in [0, 1] (P(present) or 0/1)."""
        n = len(self.config.findings)
        if findings.ndim != 2 or findings.shape[1] != n:
            raise VolumeVLMError(f"report head: findings must be [B, {n}] over {list(self.config.findings)}, got {list(findings.shape)}")
        table = self.finding_embeddings
        p = findings.to(device=table.device, dtype=table.dtype).clamp(0.0, 1.0)[..., None]
        return (1.0 - p) * table[None, :, 0] + p * table[None, :, 1]

    # ------------------------------------------------------------------ training

    def visual_prefix(self, encoder_tokens: torch.Tensor, grid: Sequence[int] | None = None,
                      findings: torch.Tensor | Sequence[Any] | None = None) -> torch.Tensor:
        """Prefix embeddings [B, P, H] of encoder tokens [B, N, C]: with findings
        conditioning, F finding tokens then the K visual tokens (P = F + K), else the K
        visual tokens. findings: float [B, F] (1 = present; e.g. the labeler's reading of
        the true report), or B collections of finding names; None = the image's own
        predicted calls (:meth:`predict_findings` at the fitted thresholds)."""
        dtype = self.decoder.get_input_embeddings().weight.dtype
        visual = self.resampler(encoder_tokens.to(dtype), grid)
        if not self.config.findings:
            if findings is not None:
                raise VolumeVLMError("report head: findings were given but this head is not conditioned on findings")
            return visual
        findings = self.case_findings(encoder_tokens, grid, findings)
        if findings.shape[0] != visual.shape[0]:
            raise VolumeVLMError(f"report head: findings for {findings.shape[0]} cases but {visual.shape[0]} images")
        return torch.cat([self.findings_prefix(findings).to(dtype), visual], dim=1)

    def case_findings(self, encoder_tokens: torch.Tensor, grid: Sequence[int] | None = None,
                      findings: torch.Tensor | Sequence[Any] | None = None) -> torch.Tensor:
        """The findings a case is written from, float [B, F]: the given ones (a tensor, or
        collections of names), else the image's calls (:meth:`predict_findings` at the
        fitted thresholds)."""
        if findings is None:
            return self.findings_calls(self.predict_findings(encoder_tokens, grid))
        if not isinstance(findings, torch.Tensor):
            return self.findings_of(findings)
        return findings

    def prefix_inputs(
        self,
        encoder_tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        grid: Sequence[int] | None = None,
        case_index: torch.Tensor | None = None,
        findings: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The decoder's inputs with the prefix (:meth:`visual_prefix`) in front.

        encoder_tokens [B, N, C]; input_ids / attention_mask / labels long [M, T]; case_index
        long [M] (which case each text row belongs to; None = row i is case i, M = B);
        findings float [B, F] or None (see :meth:`visual_prefix`).
        Returns {"inputs_embeds" [M, P + T, H], "attention_mask" [M, P + T],
        "labels" [M, P + T] (IGNORE_INDEX on the P prefix positions)}.
        """
        prefix = self.visual_prefix(encoder_tokens, grid, findings)
        if case_index is not None:
            prefix = prefix[case_index.to(prefix.device)]
        if prefix.shape[0] != input_ids.shape[0]:
            raise VolumeVLMError(f"report head: {prefix.shape[0]} visual prefixes for {input_ids.shape[0]} text rows (pass case_index)")
        k = prefix.shape[1]
        text = self.decoder.get_input_embeddings()(input_ids)
        out = {
            "inputs_embeds": torch.cat([prefix, text], dim=1),
            "attention_mask": torch.cat([attention_mask.new_ones(attention_mask.shape[0], k), attention_mask], dim=1),
        }
        if labels is not None:
            out["labels"] = torch.cat([labels.new_full((labels.shape[0], k), IGNORE_INDEX), labels], dim=1)
        return out

    def forward(
        self,
        encoder_tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        grid: Sequence[int] | None = None,
        case_index: torch.Tensor | None = None,
        findings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy (scalar) over the labelled report tokens; the
        prefix (and BOS/prompt/padding) carry IGNORE_INDEX labels. Shapes as in
        :meth:`prefix_inputs`; training passes the labeler's findings of the reports."""
        inputs = self.prefix_inputs(encoder_tokens, input_ids, attention_mask, labels, grid, case_index, findings)
        logits = self.decoder(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"]).logits
        # Position t predicts token t + 1.
        shifted = inputs["labels"][:, 1:]
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=IGNORE_INDEX)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        encoder_tokens: torch.Tensor,
        prompts: Sequence[str] | None = None,
        grid: Sequence[int] | None = None,
        findings: torch.Tensor | Sequence[Any] | None = None,
        return_sources: bool = False,
        **generation: Any,
    ) -> list[str] | list[tuple[str, list[str]]]:
        """Reports of B cases from their encoder tokens [B, N, C] (see :func:`encoder_features`).

        prompts: None -> whole reports (with ``sections``: header by header, joined as
        ``FINDINGS:`` lines and an ``IMPRESSION:`` block); or B strings, each continued
        (the continuation only is returned). findings (heads conditioned on findings):
        None = the image's own predicted findings; or float [B, F] / B collections of
        finding names to write from (e.g. the labeler's reading of a known report).
        generation: overrides of the config's defaults (max_new_tokens, num_beams,
        repetition_penalty, no_repeat_ngram_size, length_penalty, do_sample, top_p,
        temperature, consistent_candidates, bank_fallback). Deterministic unless do_sample.
        Returns B strings; with ``return_sources`` (whole reports of a sectioned head) B
        pairs (report, the sections taken from the section bank).

        Heads conditioned on findings write each section ``consistent_candidates`` ways and
        keep :meth:`consistent_choice`; with ``bank_fallback``, a section whose kept text
        still states a finding wrongly is replaced by :meth:`bank_choice` (a text of the
        training reports that states the case's findings there, the decoder's likeliest).
        """
        unknown = sorted(set(generation) - set(GENERATION_KEYS))
        if unknown:
            raise VolumeVLMError(f"report generation: unknown settings {unknown}; known: {list(GENERATION_KEYS)}")
        settings = {**self.config.generation(), **generation}
        candidates = settings.pop("consistent_candidates")
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise VolumeVLMError(f"report generation: consistent_candidates must be a positive integer, got {candidates!r}")
        bank_fallback = settings.pop("bank_fallback")
        if not isinstance(bank_fallback, bool):
            raise VolumeVLMError(f"report generation: bank_fallback must be True or False, got {bank_fallback!r}")
        if not self.config.findings:
            candidates, bank_fallback = 1, False  # nothing to be consistent with
        if bank_fallback and not self.config.section_bank:
            raise VolumeVLMError("report generation: bank_fallback needs the head's section bank, which this head "
                                 "does not have (heads trained with condition_on_findings keep one)")
        if return_sources and (prompts is not None or not self.config.sections):
            raise VolumeVLMError("report generation: return_sources applies to whole reports written section by section")
        was_training = self.training
        self.eval()
        try:
            if self.config.findings:
                findings = self.case_findings(encoder_tokens, grid, findings)
            prefix = self.visual_prefix(encoder_tokens, grid, findings)
            batch = prefix.shape[0]
            present = self.present_findings(findings) if self.config.findings else [[] for _ in range(batch)]
            in_prompt = present if self.config.findings_in_prompt else [[] for _ in range(batch)]
            if prompts is not None:
                prompts = list(prompts)
                if len(prompts) != batch:
                    raise VolumeVLMError(f"report generation: {len(prompts)} prompts for {batch} cases")
                return [texts[0] for texts in self._continue(prefix, prompts, settings)]
            if not self.config.sections:
                written = self._continue(prefix, [None] * batch, settings, candidates)
                return [self.consistent_choice(None, texts, present[i]) for i, texts in enumerate(written)]
            found: dict[str, list[str]] = {}
            banked: list[list[str]] = [[] for _ in range(batch)]
            for name in self.config.section_names:
                prompts_of = [self.prompt_text(name, in_prompt[i]) for i in range(batch)]
                written = self._continue(prefix, prompts_of, settings, candidates)
                found[name] = [self.consistent_choice(name, texts, present[i]) for i, texts in enumerate(written)]
                if bank_fallback:
                    for i in range(batch):
                        text = self.bank_choice(name, found[name][i], present[i], prefix[i], prompts_of[i])
                        if text is not None:
                            found[name][i] = text
                            banked[i].append(name)
            reports = [self._assemble({name: texts[i] for name, texts in found.items()}) for i in range(batch)]
            return list(zip(reports, banked)) if return_sources else reports
        finally:
            self.train(was_training)

    def consistent_choice(self, section: str | None, candidates: Sequence[str], present: Sequence[str]) -> str:
        """Of a section's candidate texts (the decoder's preferred first), the one whose
        labeler reading disagrees least with the case's findings ``present`` (keys); ties go
        to the decoder's order (the disagreements: :meth:`reading_errors`). One candidate
        is returned as it is."""
        if len(candidates) == 1 or not self.config.findings:
            return candidates[0]
        return candidates[int(np.argmin(self.reading_errors(section, candidates, present)))]

    def reading_errors(self, section: str | None, texts: Sequence[str], present: Sequence[str]) -> np.ndarray:
        """How many findings each of ``texts`` (written for ``section``) states wrongly for a
        case whose findings are ``present`` (keys), int [len(texts)]: in a section that
        ``section_findings`` maps, the findings it reports must read as present exactly when
        they are, and any other finding it states must be present; IMPRESSION (and
        ``section`` None, the whole report) must state exactly the present findings; a
        section the mapping does not name must state no absent finding."""
        self._need_findings()
        keys = self.config.findings
        mapping = self.config.section_findings or {}
        if section is None or section == IMPRESSION_HEADER:
            scope = set(keys)
        else:
            scope = set(mapping.get(section, ()))
        stated = set(present)
        want = np.array([k in stated for k in keys])
        in_scope = np.array([k in scope for k in keys])
        header = f"{section}: " if section else ""
        read = np.stack([_labeler_reading(header + text, keys) for text in texts])
        return ((read != want) & in_scope).sum(axis=1) + (read & ~want & ~in_scope).sum(axis=1)

    def bank_choice(self, section: str, written: str, present: Sequence[str], prefix: torch.Tensor,
                    prompt: str) -> str | None:
        """The section bank's replacement for the decoder's ``written`` text of ``section``,
        or None to keep it: of the bank's texts for the section with fewer
        :meth:`reading_errors` than ``written`` (the fewest), the one with the highest mean
        token log-likelihood under the decoder after the case's ``prefix`` [P, H] and
        ``prompt`` (so the image still chooses among texts that state its findings). When no
        bank text states the findings exactly, :meth:`spliced_text` is taken if it has fewer
        errors than both."""
        bank = (self.config.section_bank or {}).get(section) or ()
        if not bank:
            return None
        wrong = int(self.reading_errors(section, [written], present)[0])
        if wrong == 0:  # most sections: the bank is not read
            return None
        errors = self.reading_errors(section, bank, present)
        best = int(errors.min())
        if best > 0:  # no bank text states these findings exactly: try a spliced one
            spliced = self.spliced_text(section, written, present)
            if spliced is not None and int(self.reading_errors(section, [spliced], present)[0]) < min(best, wrong):
                return spliced
        if best >= wrong:
            return None
        texts = [t for t, e in zip(bank, errors) if e == best]
        if len(texts) == 1:
            return texts[0]
        return texts[int(np.argmax(self.text_log_likelihood(prefix, prompt, texts)))]

    def spliced_text(self, section: str, written: str, present: Sequence[str], max_added: int = 3) -> str | None:
        """``written`` (the decoder's text of ``section``) edited sentence by sentence, or
        None when the edit does not have fewer :meth:`reading_errors`: its sentences that
        deny a present finding or state an absent one are left out, then, while that lowers
        the errors (at most ``max_added`` times), the section bank's sentence that lowers
        them most is added (the bank's order breaks ties). Only bank sentences the labeler
        reads as stating a present finding are tried.

        For calls the training reports never combined (a renal cyst with hydronephrosis and
        no stone): no whole text of the bank states them, and the decoder writes the cyst
        and "No hydronephrosis."; the edit keeps the cyst and puts a bank sentence stating
        hydronephrosis in place of the denial. The IMPRESSION is renumbered."""
        from volumevlm.text.labeler import label_reports

        keys = self.config.findings
        header = f"{section}: "
        wanted = set(present)

        def sentences(text: str) -> list[str]:
            pieces = (_LIST_NUMBER.sub("", piece).strip() for piece in _SENTENCE_BREAK.split(text))
            return [piece for piece in pieces if piece and not _LIST_NUMBER.fullmatch(piece + " ")]

        def wrong(sentence: str) -> bool:
            status = label_reports([header + sentence], keys)[0]
            return any((k in wanted) == (v == "negative") for k, v in status.items() if v in ("positive", "negative"))

        def joined(kept: list[str]) -> str:
            if section == IMPRESSION_HEADER:
                return " ".join(f"{i}. {sentence}" for i, sentence in enumerate(kept, start=1))
            return " ".join(kept)

        kept = [sentence for sentence in sentences(written) if not wrong(sentence)]
        wanted_columns = [keys.index(k) for k in wanted if k in keys]
        pool: list[str] = []
        for text in (self.config.section_bank or {}).get(section) or ():
            for sentence in sentences(text):
                if sentence not in kept and sentence not in pool and not wrong(sentence) \
                        and _labeler_reading(header + sentence, keys)[wanted_columns].any():
                    pool.append(sentence)
        errors = int(self.reading_errors(section, [joined(kept)], present)[0])
        for _ in range(max_added):
            if errors == 0 or not pool:
                break
            tried = self.reading_errors(section, [joined([*kept, sentence]) for sentence in pool], present)
            if int(tried.min()) >= errors:
                break
            errors = int(tried.min())
            kept.append(pool.pop(int(tried.argmin())))
        if not kept or errors >= int(self.reading_errors(section, [written], present)[0]):
            return None
        return joined(kept)

    @torch.no_grad()
    def text_log_likelihood(self, prefix: torch.Tensor, prompt: str | None, texts: Sequence[str]) -> np.ndarray:
        """Mean log-probability per token of each text (and its EOS) after one case's prefix
        [P, H] and ``prompt`` under the decoder, float [len(texts)] (eval mode)."""
        targets = self.encode_targets(list(texts), [prompt] * len(texts))
        device = prefix.device
        embeds = self.decoder.get_input_embeddings()(targets["input_ids"].to(device))
        inputs = torch.cat([prefix[None].expand(len(texts), -1, -1).to(embeds.dtype), embeds], dim=1)
        mask = torch.cat([torch.ones(len(texts), prefix.shape[0], dtype=torch.long, device=device),
                          targets["attention_mask"].to(device)], dim=1)
        logits = self.decoder(inputs_embeds=inputs, attention_mask=mask).logits[:, prefix.shape[0]:].float()
        labels = targets["labels"].to(device)
        # Position t predicts token t + 1.
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = labels[:, 1:]
        scored = target != IGNORE_INDEX
        token_logp = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * scored
        return (token_logp.sum(1) / scored.sum(1).clamp(min=1)).cpu().numpy()

    @staticmethod
    def _assemble(parts: Mapping[str, str]) -> str:
        lines = ["FINDINGS:"]
        lines += [f"{name}: {text or 'Unremarkable.'}" for name, text in parts.items() if name != IMPRESSION_HEADER]
        if IMPRESSION_HEADER in parts:
            lines += ["", "IMPRESSION:", parts[IMPRESSION_HEADER]]
        return "\n".join(lines) + "\n"

    def _continue(self, prefix: torch.Tensor, prompts: list[str | None], settings: Mapping[str, Any],
                  candidates: int = 1) -> list[list[str]]:
        """``candidates`` continuations of [prefix BOS prompt] per case (the decoder's
        preferred first: beam order, or sampling order); cases sharing a prompt run as one
        batch (equal lengths, so no padding inside the prompt)."""
        out: list[list[str]] = [[] for _ in prompts]
        groups: dict[str | None, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(prompt, []).append(i)
        embed = self.decoder.get_input_embeddings()
        for prompt, rows in groups.items():
            ids = torch.tensor([self.bos_id, *(self._encode(prompt) if prompt else [])], device=prefix.device)
            text = embed(ids)[None].expand(len(rows), -1, -1)
            inputs = torch.cat([prefix[rows], text], dim=1)
            limit = int(self.decoder.config.max_position_embeddings) if hasattr(self.decoder.config, "max_position_embeddings") else None
            new_tokens = int(settings["max_new_tokens"])
            if limit is not None and inputs.shape[1] + new_tokens > limit:
                new_tokens = limit - inputs.shape[1]
                if new_tokens < 1:
                    raise VolumeVLMError(
                        f"report generation: the prompt ({inputs.shape[1]} positions with the visual prefix) "
                        f"fills the decoder's {limit} positions"
                    )
            generated = self._hf_generate(inputs, new_tokens, settings, candidates).tolist()
            # generate returns each input's sequences next to each other.
            for k, row in enumerate(rows):
                out[row] = [self.decode(seq) for seq in generated[k * candidates:(k + 1) * candidates]]
        return out

    def _hf_generate(self, inputs_embeds: torch.Tensor, max_new_tokens: int, settings: Mapping[str, Any],
                     candidates: int = 1) -> torch.Tensor:
        from transformers import GenerationConfig

        sample = bool(settings["do_sample"])
        # Deterministic search returns its best beams, so it needs at least that many.
        beams = int(settings["num_beams"]) if sample else max(int(settings["num_beams"]), candidates)
        sampling = {"top_p": float(settings["top_p"]), "temperature": float(settings["temperature"])} if sample else {}
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            **sampling,
            num_beams=beams,
            num_return_sequences=candidates,
            repetition_penalty=float(settings["repetition_penalty"]),
            no_repeat_ngram_size=int(settings["no_repeat_ngram_size"]),
            length_penalty=float(settings["length_penalty"]) if beams > 1 else 1.0,
            bos_token_id=self.bos_id,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
        )
        mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        with warnings.catch_warnings():
            # The penalties apply to the generated tokens only (the prompt is embeddings):
            # that is what we want, and transformers warns about it on every call.
            warnings.simplefilter("ignore", UserWarning)
            return self.decoder.generate(inputs_embeds=inputs_embeds, attention_mask=mask, generation_config=config)


def _special_ids(tokenizer, decoder) -> tuple[int, int, int]:
    """(BOS, EOS, PAD) ids: [CLS]/[SEP]/[PAD] for the VolumeVLM WordPiece tokenizer;
    else the decoder's or tokenizer's own (PAD falls back to EOS, as GPT-2 has none)."""
    vocab = tokenizer.get_vocab()
    if all(t in vocab for t in ("[CLS]", "[SEP]", "[PAD]")):
        return vocab["[CLS]"], vocab["[SEP]"], vocab["[PAD]"]
    config = getattr(decoder, "config", None)
    bos = getattr(config, "bos_token_id", None) if config is not None else None
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    bos = tokenizer.bos_token_id if bos is None else bos
    eos = tokenizer.eos_token_id if eos is None else eos
    if eos is None:
        raise VolumeVLMError("report decoder: its tokenizer has no end-of-sequence token")
    bos = eos if bos is None else bos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return int(bos), int(eos), int(pad)


# ---------------------------------------------------------------------- convenience


@torch.no_grad()
def generate_reports(vlm, images: torch.Tensor, prompts: Sequence[str] | None = None, findings: Any = None,
                     **generation: Any) -> list[str]:
    """Reports for preprocessed images float [B, 1, X, Y, Z] in [0, 1] (``vlm.preprocess``):
    the VolumeVLM's encoder (no grad, eval mode) then its report head (findings: see
    :meth:`ReportGenerator.generate`; None = the image's own predictions). Raises the
    VolumeVLMError of ``vlm.head("report")`` when the checkpoint has no report head."""
    head = vlm.head("report")
    if images.ndim != 5 or images.shape[1] != 1:
        raise VolumeVLMError(f"generate_reports: images must be [B, 1, X, Y, Z], got {list(images.shape)}")
    was_training = vlm.encoder.training
    vlm.encoder.eval()
    try:
        tokens, grid = encoder_features(vlm.encoder(images.to(vlm.device)))
    finally:
        vlm.encoder.train(was_training)
    if findings is None and head.config.findings and head.config.findings_features != "grid":
        features = image_finding_features(head, tokens, grid, images, vlm.head("segmentation"),
                                          hu_window=vlm.preprocess.hu_window)
        findings = head.findings_calls(head.predict_findings(None, features=features))
    return head.generate(tokens, prompts=prompts, grid=grid, findings=findings, **generation)


@torch.no_grad()
def image_finding_features(head: "ReportGenerator", tokens: torch.Tensor, grid: Sequence[int],
                           images: torch.Tensor | None = None, segmentation: nn.Module | None = None,
                           organs: torch.Tensor | None = None, cache_dir=None,
                           hu_window: Sequence[float] | None = None) -> torch.Tensor:
    """The input of ``head``'s findings classifier for B cases with encoder tokens
    [B, N (+ R), C] on ``grid``.

    A ``grid`` head reads :func:`finding_features`. An ``organs`` head reads, per organ of
    the model's own label map (:mod:`volumevlm.models.anatomy`), the tokens averaged
    inside it, then its share of the volume and its HU histogram: [B, K * (C + 1 + bins)].
    A stone, a cyst or calcium is a small change inside one organ: averaged over that
    organ it stays visible, averaged over the body it does not. It needs the preprocessed
    images [B, 1, X, Y, Z] the tokens came from and the model's ``segmentation`` head, or
    ``organs`` [B, K, C + 1 + bins] (:func:`~volumevlm.models.anatomy.organ_features`,
    with the head's ``organ_statistics``) already computed from them; the label maps are
    cached under ``cache_dir`` (:func:`~volumevlm.models.anatomy.cached_organ_labels`);
    ``hu_window``: the preprocessing's (the HU bins need it)."""
    if head.config.findings_features == "grid":
        return finding_features(tokens, grid)
    from volumevlm.models.anatomy import cached_organ_labels, organ_features

    if organs is None:
        if images is None or segmentation is None:
            raise VolumeVLMError("report head: organ findings features need the images and the model's segmentation head")
        classes = int(segmentation.config.num_classes)
        organs = organ_features(tokens, grid, images, cached_organ_labels(segmentation, images, cache_dir), classes,
                                head.config.organ_statistics, hu_window)
    if head.config.organ_classes and organs.shape[1] != head.config.organ_classes - 1:
        raise VolumeVLMError(f"report head: its findings classifier was fitted on {head.config.organ_classes - 1} "
                             f"organs, the model's segmentation head finds {organs.shape[1]}")
    return organs.flatten(1)
