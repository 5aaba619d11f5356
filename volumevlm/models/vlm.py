"""VolumeVLM: the 3D CT image encoder and the report text tower in one embedding space.

::

    image [B, 1, X, Y, Z] -> VolumeEncoder -> pooled [B, C_img] -> ProjectionHead -> [B, E]
                                                              \\-> PhenotypeHead  -> [B, V] phecode logits
    report texts (list[str]) -> TextTower -> [B, C_txt] -> ProjectionHead -> [B, E]

Similarities are ``logit_scale.exp() * image_emb @ text_emb.T`` with a learnable
temperature (CLIP's parametrisation, initialised at 1 / 0.07).

A trained model is saved as a self-describing directory (:meth:`VolumeVLM.save_pretrained`)
that loads with no network, no Hydra run directory and no pickle::

    config.json        encoder / text / preprocessing configs, embedding size, findings,
                       versions and provenance (e.g. trained on SYNTHETIC data)
    model.safetensors  all weights
    tokenizer/         the tokenizer (Hugging Face save_pretrained files)
    text/              the text tower's own description (Hugging Face config files)
    phecodes.json      the phecode vocabulary (order = phenotype logit columns)
    heads/<name>/      extra files of a downstream head, if it has any

The verbs on any CT input (``embed``, ``zero_shot``, ``segment``, ...) are added by
:class:`volumevlm.inference.checkpoint.VolumeVLM`, the subclass :func:`volumevlm.load`
returns: this class is the network, that one the user-facing model.

Downstream heads (segmentation, report generation) are attached with
:meth:`VolumeVLM.attach_head`; config.json lists them under ``"heads"`` (type + config)
and their weights live in model.safetensors under ``heads.<name>.``, so one directory
accumulates the heads that later training runs add.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from volumevlm.data.transforms import PreprocessConfig
from volumevlm.errors import VolumeVLMError, one_line
from volumevlm.io.writers import _replace_folder
from volumevlm.models.zero_shot import DEFAULT_PROMPT_SET, PROMPT_SET_KEY  # noqa: F401 (public here too)
from volumevlm.text.findings import FINDING_SETS, finding_text  # noqa: F401 (finding_text: public here too)

CHECKPOINT_FORMAT = "volumevlm-checkpoint"
CHECKPOINT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
TEXT_DIR = "text"
PHECODES_NAME = "phecodes.json"
# exp(logit_scale) is clipped here, as CLIP does, so the temperature cannot collapse.
MAX_LOGIT_SCALE = math.log(100.0)
HEADS_DIR = "heads"
# Head type -> "module:Class"; imported only when a checkpoint holds that head.
HEAD_TYPES: dict[str, str] = {
    "segmentation": "volumevlm.models.segmentation:SegmentationNet",
    "report": "volumevlm.models.report:ReportGenerator",
    "anatomy": "volumevlm.models.anatomy:AnatomyHead",
}
# What to run when a verb needs a head the checkpoint lacks.
HEAD_RECIPES: dict[str, str] = {
    "segmentation": "volumevlm train experiment=segment_demo init_from=CKPT data.root=DIR",
    "report": "volumevlm train experiment=report_demo init_from=CKPT data.root=DIR",
    "anatomy": "volumevlm train experiment=report_demo init_from=CKPT data.root=DIR (a checkpoint with a segmentation head)",
}
# A (present, absent) template pair any zero-shot call accepts as ``prompts``; {finding} is
# the plain-English name. Without ``prompts`` the model's prompt set is used.
DEFAULT_PROMPTS: tuple[str, str] = ("{finding} is present.", "No {finding}.")




class VolumeVLM(nn.Module):
    """The vision-language model.

    encoder_config: :class:`~volumevlm.models.encoder.EncoderConfig`.
    text_config: :class:`~volumevlm.models.text.TextConfig`.
    tokenizer: a Hugging Face fast tokenizer (e.g. WordPiece trained on training reports).
    phecode_vocab: :class:`~volumevlm.text.vocab.PhecodeVocabulary` (phenotype columns).
    embed_dim: size E of the shared embedding space.
    preprocess: the PreprocessConfig images must go through before :meth:`encode_image`.
    findings: finding keys for zero-shot scoring (default: the synthetic cohort's).
    init_temperature: initial softmax temperature (logit_scale = ln(1 / T)).
    text_tower: an already built TextTower (used when loading); built from text_config if None.
    """

    def __init__(
        self,
        encoder_config,
        text_config,
        tokenizer,
        phecode_vocab,
        embed_dim: int = 256,
        preprocess: PreprocessConfig | None = None,
        findings: Sequence[str] | None = None,
        init_temperature: float = 0.07,
        text_tower: nn.Module | None = None,
    ):
        super().__init__()
        from volumevlm.models.encoder import VolumeEncoder
        from volumevlm.models.heads import PhenotypeHead, ProjectionHead
        from volumevlm.models.text import TextTower

        if findings is None:
            findings = FINDING_SETS["synthetic"]
        self.encoder_config = encoder_config
        self.text_config = text_config
        self.tokenizer = tokenizer
        self.phecode_vocab = phecode_vocab
        self.embed_dim = int(embed_dim)
        self.preprocess = preprocess if preprocess is not None else PreprocessConfig()
        if encoder_config.input_windows and tuple(encoder_config.input_range) != tuple(self.preprocess.hu_window):
            raise VolumeVLMError(
                f"model config: the encoder's input_range {list(encoder_config.input_range)} HU must equal the "
                f"preprocessing hu_window {list(self.preprocess.hu_window)} for its HU windows to mean what they say"
            )
        self.findings = [str(name) for name in findings]
        self.init_temperature = float(init_temperature)

        self.encoder = VolumeEncoder(encoder_config)
        self.image_projection = ProjectionHead(self.encoder.embed_dim, self.embed_dim)
        self.text = text_tower if text_tower is not None else TextTower(text_config, tokenizer)
        self.text_projection = ProjectionHead(self.text.embed_dim, self.embed_dim)
        self.phenotype_head = PhenotypeHead(self.encoder.embed_dim, len(phecode_vocab.codes), phecode_vocab.prevalence())
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / self.init_temperature)))
        self.heads = nn.ModuleDict()
        # Where this model was loaded from (named in errors); None when built in memory.
        self.source: Path | None = None

    # ------------------------------------------------------------------ downstream heads

    def attach_head(self, name: str, module: nn.Module) -> None:
        """Add (or replace) a downstream head; it is saved with the model from now on."""
        if name not in HEAD_TYPES:
            raise VolumeVLMError(f"head {name!r}: unknown head name (known: {', '.join(HEAD_TYPES)})")
        if getattr(module, "head_type", None) != name:
            raise VolumeVLMError(f"head {name!r}: the module's head_type is {getattr(module, 'head_type', None)!r}")
        self.heads[name] = module

    def has_head(self, name: str) -> bool:
        return name in self.heads

    def head(self, name: str) -> nn.Module:
        """The head called ``name``, or a one-line error saying how to train it."""
        if name not in self.heads:
            where = self.source if self.source is not None else "this model"
            recipe = HEAD_RECIPES.get(name)
            hint = f" (train one with: {recipe})" if recipe else ""
            raise VolumeVLMError(f"{where}: this checkpoint has no {name} head{hint}")
        return self.heads[name]

    # ------------------------------------------------------------------ verbs

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clipped at 100: the multiplier of cosine similarities (scalar)."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled encoder features [B, C_img] of preprocessed images x [B, 1, X, Y, Z]."""
        return self.encoder(x).pooled

    def encode_image(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image embeddings [B, E] (unit length if normalize) of x float [B, 1, X, Y, Z] in [0, 1]."""
        emb = self.image_projection(self.image_features(x))
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, texts: Sequence[str], normalize: bool = True, token_ids=None) -> torch.Tensor:
        """Text embeddings [B, E] (unit length if normalize) of B report texts; ``token_ids``
        (one id sequence per text, truncated at the tower's max_length) skips tokenizing."""
        tokens = self.text.tokenize(list(texts)) if token_ids is None else self.text.pad_token_ids(token_ids)
        emb = self.text_projection(
            self.text(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))
        )
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_reports(self, reports: Sequence[str]) -> torch.Tensor:
        """Unit embeddings [B, E] of whole reports as pretraining matched them to images: the
        report itself, or (a text tower trained on sections) the re-normalised mean of its
        organ-system sections' embeddings. What evaluation's retrieval and a report index
        compare images with."""
        from volumevlm.text.sections import report_sections

        if not getattr(self.text_config, "sections", False):
            return self.encode_text(list(reports)).float()
        return torch.stack([F.normalize(self.encode_text(report_sections(r)).float().mean(dim=0), dim=-1) for r in reports])

    def phenotype_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Phecode logits [B, V] (columns = ``phecode_vocab.codes``) of images x [B, 1, X, Y, Z]."""
        return self.phenotype_head(self.image_features(x))

    def forward(self, images: torch.Tensor, texts: Sequence[str] | None = None) -> dict[str, torch.Tensor | None]:
        """One pass for training: {"image_emb" [B, E] unit, "phenotype_logits" [B, V],
        "text_emb" [T, E] unit or None (T = len(texts)), "logit_scale" scalar (exp, clipped),
        "image_features" [B, C] the pooled encoder output the heads read}."""
        pooled = self.image_features(images)
        return {
            "image_features": pooled,
            "image_emb": F.normalize(self.image_projection(pooled), dim=-1),
            "phenotype_logits": self.phenotype_head(pooled),
            "text_emb": self.encode_text(texts) if texts else None,
            "logit_scale": self.scale(),
        }

    def zero_shot_from_embeddings(
        self, image_emb: torch.Tensor, findings: Sequence[str] | None = None, prompts: Any = None
    ) -> torch.Tensor:
        """P(finding present) [B, F] (on image_emb's device) from unit image embeddings [B, E].

        The one zero-shot rule (:func:`volumevlm.models.zero_shot.zero_shot_from_embeddings`),
        so training's validation, ``volumevlm evaluate`` and the API agree: prompts None is the
        model's prompt set (the bundled ``synthetic`` set unless the checkpoint names one),
        or a set's name / YAML path / a (present, absent) template pair such as DEFAULT_PROMPTS.
        Runs in eval mode without autograd (the module's mode is restored)."""
        from volumevlm.models.zero_shot import zero_shot_from_embeddings

        probs, _ = zero_shot_from_embeddings(self, image_emb, prompts, list(findings or self.findings))
        return probs.to(image_emb.device)

    @torch.no_grad()
    def zero_shot_scores(
        self, x: torch.Tensor, findings: Sequence[str] | None = None, prompts: Any = None
    ) -> torch.Tensor:
        """P(finding present) [B, F] for preprocessed images x [B, 1, X, Y, Z]."""
        return self.zero_shot_from_embeddings(self.encode_image(x), findings, prompts)

    # ------------------------------------------------------------------ checkpoint directory

    def config_dict(self, provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The JSON-able description config.json holds."""
        import transformers

        import volumevlm

        return {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "model_type": "VolumeVLM",
            "embed_dim": self.embed_dim,
            "init_temperature": self.init_temperature,
            "encoder": self.encoder_config.to_dict(),
            "text": _text_config_dict(self.text_config),
            "preprocess": self.preprocess.to_dict(),
            "findings": list(self.findings),
            PROMPT_SET_KEY: DEFAULT_PROMPT_SET,
            "num_phecodes": len(self.phecode_vocab.codes),
            "heads": {name: {"type": head.head_type, "config": head.head_config()} for name, head in self.heads.items()},
            "versions": {
                "volumevlm": volumevlm.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            "provenance": dict(provenance or {}),
            "note": volumevlm.NOT_FOR_CLINICAL_USE,
        }

    def save_pretrained(self, directory: str | os.PathLike, provenance: Mapping[str, Any] | None = None) -> Path:
        """Write the checkpoint directory atomically (a temp dir next to it, then renamed).

        provenance: JSON-able facts about the training (data, command, metrics); a model
        trained on the synthetic cohort should say so here. Returns the directory.
        """
        from safetensors.torch import save_model

        target = Path(directory).expanduser().resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        try:
            save_model(self, str(tmp / WEIGHTS_NAME), metadata={"format": CHECKPOINT_FORMAT})
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config_dict(provenance), indent=2, default=str) + "\n")
            self.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            self.text.save(tmp / TEXT_DIR)
            (tmp / PHECODES_NAME).write_text(_phecodes_json(self.phecode_vocab))
            for name, head in self.heads.items():
                if hasattr(head, "save_extra"):
                    head_folder = tmp / HEADS_DIR / name
                    head_folder.mkdir(parents=True, exist_ok=True)
                    head.save_extra(head_folder)
            _replace_folder(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device | None = None) -> "VolumeVLM":
        """Load a directory written by :meth:`save_pretrained` (no network, no pickle).

        Raises VolumeVLMError (one line naming the directory) when it is missing,
        incomplete or corrupt. The model is returned in eval mode on ``device``
        (default CPU).
        """
        from safetensors.torch import load_model

        from volumevlm.models.encoder import EncoderConfig
        from volumevlm.models.text import TextConfig, TextTower
        from volumevlm.text.vocab import PhecodeVocabulary

        folder = Path(directory).expanduser()
        if not folder.is_dir():
            raise VolumeVLMError(f"{folder}: checkpoint directory not found")
        config = _read_config(folder)
        for name in (WEIGHTS_NAME, TOKENIZER_DIR, TEXT_DIR, PHECODES_NAME):
            if not (folder / name).exists():
                raise VolumeVLMError(f"{folder}: not a complete volumevlm checkpoint (missing {name})")
        try:
            encoder_config = EncoderConfig.from_dict(config["encoder"])
            text_config = TextConfig(**config["text"])
            preprocess = PreprocessConfig.from_dict(config["preprocess"])
            tokenizer = _load_tokenizer(folder / TOKENIZER_DIR)
            vocab = PhecodeVocabulary.from_json((folder / PHECODES_NAME).read_text())
            text_tower = TextTower.load(folder / TEXT_DIR, tokenizer=tokenizer)
            model = cls(
                encoder_config,
                text_config,
                tokenizer,
                vocab,
                embed_dim=config["embed_dim"],
                preprocess=preprocess,
                findings=config.get("findings"),
                init_temperature=config.get("init_temperature", 0.07),
                text_tower=text_tower,
            )
            for name, entry in (config.get("heads") or {}).items():
                model.attach_head(name, _build_head(name, entry, folder / HEADS_DIR / name, model))
        except VolumeVLMError:
            raise
        except (KeyError, TypeError, ValueError, OSError) as err:
            raise VolumeVLMError(f"{folder}: inconsistent checkpoint ({type(err).__name__}: {one_line(err)})") from None
        try:
            missing, unexpected = load_model(model, str(folder / WEIGHTS_NAME), strict=False)
        except RuntimeError as err:
            if "size mismatch" not in str(err):
                raise VolumeVLMError(f"{folder / WEIGHTS_NAME}: unreadable weights ({one_line(err)})") from None
            raise VolumeVLMError(f"{folder / WEIGHTS_NAME}: weight shapes do not match config.json") from None
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise VolumeVLMError(f"{folder / WEIGHTS_NAME}: unreadable weights ({one_line(err)})") from None
        if missing or unexpected:
            raise VolumeVLMError(
                f"{folder / WEIGHTS_NAME}: weights do not match config.json "
                f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
            )
        model.source = folder
        model.eval()
        return model.to(device) if device is not None else model


# ---------------------------------------------------------------------- helpers


def _build_head(name: str, entry: Any, folder: Path, vlm: "VolumeVLM") -> nn.Module:
    """Rebuild head ``name`` (random weights) from its config.json entry."""
    if not isinstance(entry, dict) or "type" not in entry:
        raise VolumeVLMError(f"{folder.parent.parent}: config.json heads.{name} has no type")
    target = HEAD_TYPES.get(entry["type"])
    if target is None:
        raise VolumeVLMError(
            f"{folder.parent.parent}: head {name!r} has type {entry['type']!r}, which this volumevlm does not know"
        )
    module_name, class_name = target.split(":")
    head_class = getattr(importlib.import_module(module_name), class_name)
    return head_class.from_head_config(dict(entry.get("config") or {}), folder, vlm)


def _text_config_dict(config) -> dict[str, Any]:
    from dataclasses import asdict

    d = asdict(config)
    if d.get("pretrained") is not None:
        d["pretrained"] = str(d["pretrained"])
    return d


def _phecodes_json(vocab) -> str:
    text = vocab.to_json()
    return text if text.endswith("\n") else text + "\n"


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise VolumeVLMError(f"{folder}: not a volumevlm checkpoint directory (no {CONFIG_NAME})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VolumeVLMError(f"{path}: unreadable checkpoint config ({one_line(err)})") from None
    if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT:
        raise VolumeVLMError(f"{path}: not a volumevlm checkpoint config (format is not {CHECKPOINT_FORMAT!r})")
    if int(config.get("format_version", 0)) > CHECKPOINT_VERSION:
        raise VolumeVLMError(
            f"{path}: checkpoint format {config['format_version']} is newer than this volumevlm reads ({CHECKPOINT_VERSION})"
        )
    return config


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise VolumeVLMError(f"{folder}: unreadable tokenizer ({one_line(err)})") from None
