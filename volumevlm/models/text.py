"""The report text tower: a BERT-style encoder that turns report texts into vectors.

Two ways to get the encoder, both without network access:

* from config (``TextConfig.pretrained = None``): a small BERT (transformers
  ``BertModel``) sized by the config, with the vocabulary of the tokenizer it is given
  (normally the WordPiece tokenizer trained on the training reports);
* from a local Hugging Face model directory (``TextConfig.pretrained = path``), e.g. a
  clinical BERT saved with ``save_pretrained``; its tokenizer must come from the same
  directory.

The tower pools the encoder's last hidden states into one vector per text
([CLS] token or masked mean). :meth:`TextTower.save` writes only the description of
the architecture (Hugging Face config + ``tower.json``); the weights travel inside the
VolumeVLM checkpoint's single safetensors file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from volumevlm.errors import VolumeVLMError, one_line
from volumevlm.models.encoder import POOLED_NORMS, PooledBatchNorm

TOWER_NAME = "tower.json"
HF_CONFIG_NAME = "config.json"
POOLING_MODES = ("cls", "mean")


@dataclass
class TextConfig:
    """Text tower settings.

    pretrained: a local Hugging Face encoder directory, or None for a small BERT built
        from the fields below (dim/depth/heads are then used; with a pretrained model
        they are ignored).
    vocab_size: WordPiece vocabulary size to train (used by the datamodule; the tower
        always takes its vocabulary size from the tokenizer it is given).
    dim / depth / heads: hidden size, layers, attention heads of the BERT from config.
    max_length: texts are truncated to this many tokens ([CLS] and [SEP] included).
    sections: True trains on organ-system sections instead of whole reports.
    pooling: "cls" (first token's hidden state) or "mean" (mean over real tokens).
    pooled_norm: "batch" normalizes the pooled vector with batch statistics
        (:class:`~volumevlm.models.encoder.PooledBatchNorm`, as the image encoder's
        ``pooled_norm``); "none" leaves it as pooled.
    """

    pretrained: str | None = None
    vocab_size: int = 4096
    dim: int = 128
    depth: int = 2
    heads: int = 4
    max_length: int = 256
    sections: bool = False
    pooling: str = "cls"
    pooled_norm: str = "none"

    def __post_init__(self) -> None:
        if self.pretrained is not None:
            self.pretrained = str(self.pretrained)
        for name in ("vocab_size", "dim", "depth", "heads", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise VolumeVLMError(f"text config: {name} must be a positive integer, got {value!r}")
        if self.max_length < 2:
            raise VolumeVLMError(f"text config: max_length must be at least 2 ([CLS] and [SEP]), got {self.max_length}")
        if self.pooling not in POOLING_MODES:
            raise VolumeVLMError(f"text config: pooling must be one of {list(POOLING_MODES)}, got {self.pooling!r}")
        if self.pooled_norm not in POOLED_NORMS:
            raise VolumeVLMError(f"text config: pooled_norm must be one of {list(POOLED_NORMS)}, got {self.pooled_norm!r}")
        if self.pretrained is None and self.dim % self.heads:
            raise VolumeVLMError(f"text config: dim {self.dim} is not divisible by heads {self.heads}")
        self.sections = bool(self.sections)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TextConfig":
        """TextConfig from a mapping; unknown keys are a one-line VolumeVLMError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise VolumeVLMError(f"text config: unknown fields {unknown}")
        return cls(**dict(data))


def _bert_from_config(config: TextConfig, vocab_size: int, pad_token_id: int) -> nn.Module:
    from transformers import BertConfig, BertModel

    bert_config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=config.dim,
        num_hidden_layers=config.depth,
        num_attention_heads=config.heads,
        intermediate_size=4 * config.dim,
        max_position_embeddings=config.max_length,
        pad_token_id=pad_token_id,
        type_vocab_size=2,
    )
    return BertModel(bert_config, add_pooling_layer=False)


def _load_pretrained(path: str) -> nn.Module:
    from transformers import AutoModel

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise VolumeVLMError(f"{folder}: pretrained text model directory not found")
    if not (folder / HF_CONFIG_NAME).is_file():
        raise VolumeVLMError(f"{folder}: not a Hugging Face model directory (no {HF_CONFIG_NAME})")
    try:
        # float32 whatever the saved dtype: mixed precision is the trainer's business.
        return AutoModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    except Exception as err:  # transformers raises OSError/ValueError/KeyError/safetensors errors
        raise VolumeVLMError(f"{folder}: unreadable pretrained text model ({type(err).__name__}: {one_line(err)})") from None


def _drop_pooler(model: nn.Module) -> nn.Module:
    """Remove a BERT-style pooler: the tower pools itself, and parameters that never get
    gradients would break DDP (find_unused_parameters=False)."""
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


class TextTower(nn.Module):
    """Report texts -> pooled features [B, embed_dim].

    config: :class:`TextConfig`. tokenizer: a Hugging Face fast tokenizer with a pad
    token (its length sets the embedding rows of a BERT built from config).
    model: an already built Hugging Face encoder (used by :meth:`load`); built from
    ``config`` when None.
    """

    def __init__(self, config: TextConfig, tokenizer, model: nn.Module | None = None):
        super().__init__()
        if not isinstance(config, TextConfig):
            raise VolumeVLMError(f"text tower: config must be a TextConfig, got {type(config).__name__}")
        if tokenizer is None:
            raise VolumeVLMError("text tower: a tokenizer is required")
        if tokenizer.pad_token_id is None:
            raise VolumeVLMError("text tower: the tokenizer has no pad token, so batches cannot be padded")
        self.config = config
        self.tokenizer = tokenizer
        if model is None:
            if config.pretrained is None:
                model = _bert_from_config(config, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
            else:
                model = _load_pretrained(config.pretrained)
        self.model = _drop_pooler(model).float()
        rows = self.model.get_input_embeddings().num_embeddings
        if len(tokenizer) > rows:
            raise VolumeVLMError(
                f"text tower: the tokenizer has {len(tokenizer)} tokens but the text model embeds only {rows}"
                " (use the tokenizer saved with the model)"
            )
        self.embed_dim = int(getattr(self.model.config, "hidden_size", self.model.get_input_embeddings().embedding_dim))
        positions = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = min(config.max_length, positions) if isinstance(positions, int) and positions > 0 else config.max_length
        # Reports share their template, so pooled vectors differ from each other by a few
        # findings' words on top of one common vector; batch statistics take the common
        # part away (the image encoder's reason for the same norm, see PooledBatchNorm).
        self.pooled_norm = PooledBatchNorm(self.embed_dim) if config.pooled_norm == "batch" else nn.Identity()

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """{"input_ids", "attention_mask"}: int64 [B, L] (right-padded to the longest text,
        truncated at ``max_length`` tokens). B = 0 gives [0, 0] tensors."""
        from volumevlm.text.tokenizer import as_text_list

        texts = as_text_list(texts, "text tower: tokenize()")
        if not texts:
            empty = torch.zeros(0, 0, dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty.clone()}
        enc = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_attention_mask=True,
            return_token_type_ids=False,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}

    def pad_token_ids(self, token_ids) -> dict[str, torch.Tensor]:
        """What :meth:`tokenize` gives for texts already tokenized (each a sequence of ids,
        truncated at ``max_length``, as the tokenizer makes them one text at a time): the
        same right-padded {"input_ids", "attention_mask"} int64 [B, L]."""
        token_ids = [list(ids) for ids in token_ids]
        length = max((len(ids) for ids in token_ids), default=0)
        if any(len(ids) > self.max_length for ids in token_ids):
            raise VolumeVLMError(f"text tower: token ids longer than max_length {self.max_length}")
        input_ids = torch.full((len(token_ids), length), int(self.tokenizer.pad_token_id), dtype=torch.long)
        attention_mask = torch.zeros(len(token_ids), length, dtype=torch.long)
        for row, ids in enumerate(token_ids):
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled features float [B, embed_dim] of int64 input_ids / attention_mask [B, L]."""
        if input_ids.shape[0] == 0:
            weight = self.model.get_input_embeddings().weight
            return weight.new_zeros(0, self.embed_dim)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, H]
        if self.config.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # [B, L, 1]
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.pooled_norm(pooled)

    # ------------------------------------------------------------------ description

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the architecture (no weights): the Hugging Face ``config.json`` of the
        encoder and ``tower.json`` with the TextConfig. Each file is replaced atomically."""
        folder = Path(directory).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder, prefix=".tower.tmp-"))
        try:
            self.model.config.save_pretrained(str(staging))
            tower = {
                "format": "volumevlm-text-tower",
                "format_version": 1,
                "text_config": asdict(self.config),
                "embed_dim": self.embed_dim,
                "vocab_rows": self.model.get_input_embeddings().num_embeddings,
            }
            (staging / TOWER_NAME).write_text(json.dumps(tower, indent=2) + "\n")
            for name in (HF_CONFIG_NAME, TOWER_NAME):
                os.replace(staging / name, folder / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, directory: str | os.PathLike, tokenizer) -> "TextTower":
        """Rebuild the architecture saved by :meth:`save` (randomly initialised: load the
        VolumeVLM state dict afterwards). Reads no weights and needs no network, not
        even the original pretrained directory."""
        from transformers import AutoConfig, AutoModel

        folder = Path(directory).expanduser()
        if not (folder / TOWER_NAME).is_file() or not (folder / HF_CONFIG_NAME).is_file():
            raise VolumeVLMError(f"{folder}: not a saved text tower (needs {TOWER_NAME} and {HF_CONFIG_NAME})")
        try:
            tower = json.loads((folder / TOWER_NAME).read_text(encoding="utf-8"))
            config = TextConfig.from_dict(tower["text_config"])
        except VolumeVLMError:
            raise
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            raise VolumeVLMError(f"{folder / TOWER_NAME}: unreadable text tower description ({one_line(err)})") from None
        try:
            hf_config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
            model = AutoModel.from_config(hf_config)
        except Exception as err:  # transformers raises OSError/ValueError/KeyError
            raise VolumeVLMError(f"{folder / HF_CONFIG_NAME}: unusable text model config ({one_line(err)})") from None
        return cls(config, tokenizer, model=model)
