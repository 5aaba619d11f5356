"""The one zero-shot rule of the package: a prompt set against image embeddings.

Training's validation (``VolumeVLM.zero_shot_from_embeddings``), ``volumevlm evaluate``,
the inference verbs and the HTTP service all score zero-shot findings here, so they agree:
the prompts of each finding are embedded by the model's text tower, averaged per polarity,
and P(present) is the pairwise softmax of :func:`volumevlm.text.prompts.zero_shot_probabilities`.
A model's prompt set is the one its checkpoint names, else the bundled ``synthetic`` set.

It lives in the models layer (it needs the model's text tower, nothing above it), below
``train``, ``eval`` and ``inference``, which all use it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from volumevlm.errors import VolumeVLMError
from volumevlm.text.findings import finding_text

# config.json key under which a checkpoint carries its zero-shot prompt set (a bundled
# set's name, a YAML path, or the set itself as PromptSet.to_dict() data), and the set a
# new checkpoint names (conf/prompts/synthetic.yaml).
PROMPT_SET_KEY = "prompt_set"
DEFAULT_PROMPT_SET = "synthetic"


@contextmanager
def inference_mode(module: torch.nn.Module):
    """Eval mode and no autograd for the duration; the module's mode is restored after."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)


def _snake(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(text).strip().lower()).strip("_")


def default_prompt_set(model):
    """The checkpoint's own prompt set (config.json ``prompt_set``, or a ``prompt_set``
    attribute set on the model) when it has one, else the bundled ``synthetic`` set."""
    from volumevlm.text.prompts import PromptSet, load_prompt_set

    attached = getattr(model, "prompt_set", None)
    if attached is not None:
        return resolve_prompt_set(attached, model)
    source = getattr(model, "source", None)
    if source is not None:
        path = Path(source) / "config.json"
        try:
            saved = json.loads(path.read_text(encoding="utf-8")).get(PROMPT_SET_KEY)
        except (OSError, ValueError, AttributeError):
            saved = None
        if isinstance(saved, Mapping):
            return PromptSet.from_dict(saved, source=f"{path}:{PROMPT_SET_KEY}")
        if isinstance(saved, str) and saved.strip():
            return load_prompt_set(saved)
    return load_prompt_set(DEFAULT_PROMPT_SET)


def resolve_prompt_set(prompts: Any, model):
    """A PromptSet from: None (:func:`default_prompt_set`), a PromptSet, a bundled name or
    YAML path, PromptSet data (a mapping), or a (present, absent) pair of templates holding
    ``{finding}`` (applied to the model's findings, like ``zero_shot_scores``)."""
    from volumevlm.text.prompts import PromptSet, load_prompt_set

    if prompts is None:
        return default_prompt_set(model)
    if isinstance(prompts, PromptSet):
        return prompts
    if isinstance(prompts, (str, os.PathLike)):
        return load_prompt_set(prompts)
    if isinstance(prompts, Mapping):
        return PromptSet.from_dict(prompts, source="<prompts>")
    if isinstance(prompts, Sequence) and len(prompts) == 2 and all(isinstance(p, str) for p in prompts):
        return PromptSet(
            name="templates",
            description="a (present, absent) template pair given at call time",
            templates={"positive": [prompts[0]], "negative": [prompts[1]]},
            findings={key: {"name": finding_text(key)} for key in model.findings},
            source="<prompts>",
        )
    raise VolumeVLMError(
        f"prompts: expected a prompt-set name, a YAML path, a PromptSet or a (present, absent) template pair, got {type(prompts).__name__}"
    )


def with_findings(prompt_set, findings: Sequence[str] | None) -> tuple[Any, list[str], list[str]]:
    """(prompt set, keys to score, names to report them under).

    findings None: every finding of the set. A requested finding that is not a key of the
    set is scored with the set's generic templates only, its name spelled from the request
    ("pleural effusion" or "pleural_effusion" -> "pleural effusion"): zero-shot is
    open-vocabulary, the prompt set only adds phrasings."""
    from volumevlm.text.prompts import PromptSet

    if findings is None:
        return prompt_set, prompt_set.keys, prompt_set.keys
    if isinstance(findings, str):
        findings = [findings]
    requested = [str(f) for f in findings]
    if not requested:
        raise VolumeVLMError("findings: an empty list (give None for every finding of the prompt set)")
    data = prompt_set.to_dict()
    keys = []
    for name in requested:
        key = name if name in prompt_set.findings else _snake(name)
        if not key or not key[0].isalpha():
            raise VolumeVLMError(f"findings: {name!r} is not a usable finding name")
        if key not in data["findings"]:
            data["findings"][key] = {"name": name.replace("_", " ").strip()}
        keys.append(key)
    if len(data["findings"]) != len(prompt_set.findings):
        prompt_set = PromptSet.from_dict(data, source=f"{prompt_set.source} + requested findings")
    return prompt_set, keys, requested


def zero_shot_from_sections(model, image_emb: torch.Tensor, section_emb: torch.Tensor, anatomy, prompts: Any = None,
                            findings: Sequence[str] | None = None) -> tuple[torch.Tensor, list[str], list[str | None]]:
    """Zero-shot read in organ-system embeddings: (P(present) float32 [B, F], names,
    the section each finding was read in or None).

    section_emb [B, S, E]: the anatomy head's output (:class:`volumevlm.models.anatomy.AnatomyHead`)
    for the same B cases as the unit global ``image_emb`` [B, E]. A finding the head routes
    to a section is scored with that section's embedding, any other with the global one;
    the prompts and the pairwise softmax are :func:`zero_shot_from_embeddings`'."""
    from volumevlm.text.prompts import zero_shot_probabilities

    prompt_set, keys, names = with_findings(resolve_prompt_set(prompts, model), findings)
    if section_emb.ndim != 3 or section_emb.shape[0] != image_emb.shape[0] or section_emb.shape[1] != len(anatomy.sections):
        raise VolumeVLMError(f"section embeddings {list(section_emb.shape)} do not match {image_emb.shape[0]} images "
                             f"and the anatomy head's {len(anatomy.sections)} sections")
    where = [anatomy.section_index(key) for key in keys]
    probs = torch.zeros(image_emb.shape[0], len(keys))
    with inference_mode(model):
        for index in dict.fromkeys(where):
            columns = [j for j, w in enumerate(where) if w == index]
            emb = image_emb if index is None else section_emb[:, index]
            probs[:, columns] = zero_shot_probabilities(emb.to(model.device), _text_encoder(model), prompt_set,
                                                        [keys[j] for j in columns], logit_scale=model.scale()).float().cpu()
    return probs, names, [None if w is None else anatomy.sections[w] for w in where]


def _text_encoder(model):
    def encode(texts: list[str]) -> torch.Tensor:
        return model.encode_text(texts).float()

    return encode


def zero_shot_from_embeddings(model, image_emb: torch.Tensor, prompts: Any = None,
                              findings: Sequence[str] | None = None) -> tuple[torch.Tensor, list[str]]:
    """(P(present) float32 [B, F], names) of unit image embeddings [B, E] with a prompt set
    (template-averaged, pairwise softmax: :func:`volumevlm.text.prompts.zero_shot_probabilities`)."""
    from volumevlm.text.prompts import zero_shot_probabilities

    prompt_set, keys, names = with_findings(resolve_prompt_set(prompts, model), findings)
    with inference_mode(model):
        probs = zero_shot_probabilities(image_emb.to(model.device), _text_encoder(model), prompt_set, keys,
                                        logit_scale=model.scale())
    return probs.float().cpu(), names
