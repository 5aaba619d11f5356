"""Zero-shot prompt sets and the model-agnostic zero-shot scorer.

A prompt set is a small YAML file (plain data, not a Hydra config) under
``conf/prompts/``::

    name: synthetic
    description: ...
    templates:
      positive: ["{finding} is present.", "There is {finding}.", ...]
      negative: ["No {finding}.", "{finding} is not present.", ...]
    findings:
      hepatic_steatosis:
        name: hepatic steatosis                 # plain English, fills {finding}
        positive: ["The liver is diffusely hypoattenuating, consistent with hepatic steatosis."]
        negative: ["The liver is normal in attenuation."]   # both lists optional

For one finding, :meth:`PromptSet.texts` returns every generic template filled with
the finding's plain-English name, followed by the finding's own phrasings (which
may, but need not, hold ``{finding}``). The first character of every text is
upper-cased ("hepatic steatosis is present." -> "Hepatic steatosis is present."),
and repeats are dropped keeping the first occurrence.

:func:`zero_shot_probabilities` scores image embeddings against a prompt set the
way Merlin and CT-CLIP do: the positive prompt embeddings of a finding are averaged
and re-normalised (Merlin averages several prompts), likewise the negatives, and
P(present) is the softmax over the (positive, negative) pair of scaled cosine
similarities (CT-CLIP's pairwise softmax).
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from volumevlm.errors import InputError, VolumeVLMError
from volumevlm.resources import PROMPTS_SUBDIR, prompts_dir  # noqa: F401 (public names of this module too)

PLACEHOLDER = "finding"
_KEY = re.compile(r"^[a-z][a-z0-9_]*$")
_TOP_KEYS = ("name", "description", "templates", "findings")
_FINDING_KEYS = ("name", "positive", "negative")
_POLARITIES = ("positive", "negative")


def _check_text(source: str, where: str, text: Any, *, need_placeholder: bool) -> str:
    """One prompt string: non-empty, only ``{finding}`` as a field, balanced braces."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(source, f"{where}: must be a non-empty string, got {text!r}")
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as err:
        raise InputError(source, f"{where}: bad braces in {text!r} ({err}); write {{{{ and }}}} for literal braces") from None
    fields = [(name, spec, conv) for _, name, spec, conv in parsed if name is not None]
    for name, spec, conv in fields:
        if name != PLACEHOLDER:
            raise InputError(source, f"{where}: unknown template field {{{name}}} in {text!r}; only {{{PLACEHOLDER}}} is allowed")
        if spec or conv:
            raise InputError(source, f"{where}: write the placeholder plainly as {{{PLACEHOLDER}}} "
                                     f"(no conversion or format spec) in {text!r}")
    if need_placeholder and not fields:
        raise InputError(source, f"{where}: template {text!r} lacks the {{{PLACEHOLDER}}} placeholder")
    return text


def _check_list(source: str, where: str, value: Any, *, need_placeholder: bool) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InputError(source, f"{where}: must be a list of strings, got {type(value).__name__}")
    if len(value) == 0:
        raise InputError(source, f"{where}: empty list (leave the key out instead, or give at least one prompt)")
    return tuple(_check_text(source, f"{where}[{i}]", t, need_placeholder=need_placeholder) for i, t in enumerate(value))


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _unique(texts: list[str]) -> list[str]:
    return list(dict.fromkeys(texts))


@dataclass(frozen=True)
class FindingPrompts:
    """One finding of a prompt set.

    name: plain-English name that fills ``{finding}``.
    positive, negative: the finding's own extra phrasings (possibly empty tuples).
    """

    name: str
    positive: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        for polarity in _POLARITIES:
            if getattr(self, polarity):
                out[polarity] = list(getattr(self, polarity))
        return out


@dataclass(frozen=True)
class PromptSet:
    """A named set of zero-shot prompts.

    name, description: strings (the description says which dataset it is for).
    templates: {"positive": (str, ...), "negative": (str, ...)}; every template holds
        ``{finding}``.
    findings: {snake_case key: :class:`FindingPrompts`}, in file order.
    source: where it came from (a file path or "<dict>"), used in error messages only.

    Construction validates everything and raises a one-line :class:`InputError`
    naming the source and the offending key.
    """

    name: str
    description: str
    templates: Mapping[str, tuple[str, ...]]
    findings: Mapping[str, FindingPrompts]
    source: str = field(default="<prompt set>", compare=False, repr=False)

    def __post_init__(self) -> None:
        src = self.source
        if not isinstance(self.name, str) or not self.name.strip():
            raise InputError(src, f"name: must be a non-empty string, got {self.name!r}")
        if not isinstance(self.description, str) or not self.description.strip():
            raise InputError(src, f"description: must be a non-empty string, got {self.description!r}")
        if not isinstance(self.templates, Mapping):
            raise InputError(src, f"templates: must be a mapping with keys positive and negative, got {type(self.templates).__name__}")
        extra = sorted(set(map(str, self.templates)) - set(_POLARITIES))
        if extra:
            raise InputError(src, f"templates: unknown key(s) {extra}; use positive and negative")
        templates = {}
        for polarity in _POLARITIES:
            if polarity not in self.templates:
                raise InputError(src, f"templates.{polarity}: missing")
            templates[polarity] = _check_list(src, f"templates.{polarity}", self.templates[polarity], need_placeholder=True)
        if not isinstance(self.findings, Mapping) or len(self.findings) == 0:
            raise InputError(src, "findings: must be a non-empty mapping {key: {name: ..., positive: [...], negative: [...]}}")
        findings = {}
        for key, entry in self.findings.items():
            if not isinstance(key, str) or not _KEY.match(key):
                raise InputError(src, f"findings.{key}: keys must be snake_case (lower-case letters, digits, '_')")
            if isinstance(entry, FindingPrompts):
                entry = entry.to_dict()
            if not isinstance(entry, Mapping):
                raise InputError(src, f"findings.{key}: must be a mapping with a name, got {type(entry).__name__}")
            unknown = sorted(set(map(str, entry)) - set(_FINDING_KEYS))
            if unknown:
                raise InputError(src, f"findings.{key}: unknown key(s) {unknown}; use {list(_FINDING_KEYS)}")
            name = entry.get("name")
            if not isinstance(name, str) or not name.strip():
                raise InputError(src, f"findings.{key}.name: must be a non-empty string, got {name!r}")
            lists = {
                polarity: _check_list(src, f"findings.{key}.{polarity}", entry[polarity], need_placeholder=False)
                if polarity in entry else ()
                for polarity in _POLARITIES
            }
            findings[key] = FindingPrompts(name=name.strip(), **lists)
        object.__setattr__(self, "templates", templates)
        object.__setattr__(self, "findings", findings)
        # A text on both sides would make the pair's softmax meaningless for that finding.
        for key in findings:
            positives, negatives = self.texts(key)
            both = sorted(set(positives) & set(negatives))
            if both:
                raise InputError(src, f"findings.{key}: prompt {both[0]!r} is both positive and negative")

    @property
    def keys(self) -> list[str]:
        """Finding keys in file order."""
        return list(self.findings)

    def texts(self, finding: str) -> tuple[list[str], list[str]]:
        """(positive texts, negative texts) of one finding key: generic templates filled
        with its plain-English name, then its own phrasings; first letter upper-cased,
        repeats dropped."""
        entry = self.findings.get(finding)
        if entry is None:
            raise VolumeVLMError(f"prompt set {self.name!r}: unknown finding {finding!r}; known: {', '.join(self.findings)}")
        out = []
        for polarity in _POLARITIES:
            texts = [t.format(finding=entry.name) for t in self.templates[polarity]]
            texts += [t.format(finding=entry.name) for t in getattr(entry, polarity)]
            out.append(_unique([_capitalise(t.strip()) for t in texts]))
        return out[0], out[1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able plain data (what the YAML file holds), e.g. to store in a checkpoint."""
        return {
            "name": self.name,
            "description": self.description,
            "templates": {p: list(self.templates[p]) for p in _POLARITIES},
            "findings": {key: entry.to_dict() for key, entry in self.findings.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> PromptSet:
        """The inverse of :meth:`to_dict`; validates and raises one-line errors naming ``source``."""
        if not isinstance(data, Mapping):
            raise InputError(source, f"a prompt set must be a mapping with keys {list(_TOP_KEYS)}, got {type(data).__name__}")
        unknown = sorted(set(map(str, data)) - set(_TOP_KEYS))
        if unknown:
            raise InputError(source, f"unknown top-level key(s) {unknown}; use {list(_TOP_KEYS)}")
        missing = [k for k in _TOP_KEYS if k not in data]
        if missing:
            raise InputError(source, f"missing key(s) {missing}")
        return cls(name=data["name"], description=data["description"], templates=data["templates"],
                   findings=data["findings"], source=str(source))


def _yaml_loader():
    """A safe YAML loader that refuses duplicate mapping keys (PyYAML silently keeps the last)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return _Loader


def available_prompt_sets() -> list[str]:
    """Bare names of the prompt sets in :func:`prompts_dir` (sorted)."""
    folder = prompts_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load_prompt_set(name_or_path: str | os.PathLike) -> PromptSet:
    """A prompt set from a YAML file, or by bare name ("synthetic", "merlin30", "ctrate18")
    from :func:`prompts_dir`. A ``Path`` object, or a string naming an existing file,
    holding a path separator or ending in .yaml/.yml, is a path; any other string is a
    bare name."""
    import yaml

    text = os.fspath(name_or_path)
    looks_like_path = (
        isinstance(name_or_path, Path) or os.sep in text or "/" in text
        or text.endswith((".yaml", ".yml")) or Path(text).is_file()
    )
    if looks_like_path:
        path = Path(text).expanduser()
        if not path.is_file():
            raise InputError(path, "no such prompt-set file")
    else:
        if not _KEY.match(text):
            raise VolumeVLMError(f"prompt set {text!r}: not a file and not a valid bare name (snake_case)")
        path = prompts_dir() / f"{text}.yaml"
        if not path.is_file():
            known = ", ".join(available_prompt_sets()) or "none"
            raise VolumeVLMError(f"prompt set {text!r}: not found in {path.parent} (available: {known})")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_yaml_loader())
    except OSError as err:
        raise InputError(path, f"cannot read ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise InputError(path, f"invalid YAML ({' '.join(str(err).split())})") from None
    return PromptSet.from_dict(data, source=str(path))


def zero_shot_probabilities(
    image_emb: torch.Tensor,
    encode_text: Callable[[list[str]], torch.Tensor],
    prompt_set: PromptSet,
    findings: Sequence[str] | None = None,
    *,
    logit_scale: float | torch.Tensor,
) -> torch.Tensor:
    """P(finding present) for each image and finding.

    image_emb: [B, E] float image embeddings (unit length expected; they are
        L2-normalised here anyway so the similarity is a cosine).
    encode_text: maps a list of T strings to a [T, E] float tensor (unit rows expected,
        normalised here as well). It is called ONCE, with every distinct prompt text of
        the requested findings.
    prompt_set: the prompts; findings: keys to score (default: all, in set order).
    logit_scale: the multiplier of cosine similarities (the model's exp(log scale), e.g.
        ~100 for CLIP-style models), a float or 0-d tensor; must be finite and > 0.

    For finding f: p = normalise(mean of its positive prompt embeddings), n likewise
    for the negatives, and P = softmax([s*cos(img, p), s*cos(img, n)])[0]
    = sigmoid(s * (cos(img, p) - cos(img, n))).

    Returns [B, F] float32 on image_emb's device.
    """
    if not isinstance(image_emb, torch.Tensor) or image_emb.ndim != 2:
        raise VolumeVLMError(f"image_emb: must be a [B, E] tensor, got shape {tuple(getattr(image_emb, 'shape', ()))}")
    if not isinstance(prompt_set, PromptSet):
        raise VolumeVLMError(f"prompt_set: must be a PromptSet, got {type(prompt_set).__name__}")
    scale = float(logit_scale)
    if not (scale > 0 and scale < float("inf")):
        raise VolumeVLMError(f"logit_scale: must be finite and > 0, got {scale}")
    keys = prompt_set.keys if findings is None else list(findings)
    if not keys:
        raise VolumeVLMError(f"prompt set {prompt_set.name!r}: no findings requested")
    pairs = [prompt_set.texts(k) for k in keys]  # raises on unknown keys
    unique = _unique([t for pos, neg in pairs for t in pos + neg])
    index = {t: i for i, t in enumerate(unique)}
    emb = encode_text(unique)
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[0] != len(unique):
        raise VolumeVLMError(
            f"encode_text: must return a [{len(unique)}, E] tensor for {len(unique)} texts, got shape {tuple(getattr(emb, 'shape', ()))}")
    if emb.shape[1] != image_emb.shape[1]:
        raise VolumeVLMError(f"encode_text: embedding size {emb.shape[1]} differs from image_emb's {image_emb.shape[1]}")
    emb = F.normalize(emb.to(device=image_emb.device, dtype=torch.float32), dim=-1)
    img = F.normalize(image_emb.float(), dim=-1)

    def centroid(texts: list[str]) -> torch.Tensor:
        rows = emb[torch.tensor([index[t] for t in texts], device=emb.device)]
        return F.normalize(rows.mean(dim=0), dim=-1)

    pos = torch.stack([centroid(p) for p, _ in pairs])  # [F, E]
    neg = torch.stack([centroid(n) for _, n in pairs])  # [F, E]
    logits = scale * torch.stack([img @ pos.T, img @ neg.T], dim=-1)  # [B, F, 2]
    return logits.softmax(dim=-1)[..., 0]
