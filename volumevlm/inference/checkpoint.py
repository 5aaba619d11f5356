"""Open a checkpoint directory: ``volumevlm.load(dir)``.

The directory is the one :meth:`volumevlm.models.vlm.VolumeVLM.save_pretrained`
writes (e.g. ``OUT/model`` after ``volumevlm train``): safetensors weights, JSON
config, tokenizer files and the phecode table. Loading needs no network, no Hydra
run directory and unpickles nothing.
"""

from __future__ import annotations

import os

import torch

from volumevlm.models.vlm import VolumeVLM


def load(directory: str | os.PathLike, device: str | torch.device | None = None) -> VolumeVLM:
    """The VolumeVLM saved in ``directory``, in eval mode on ``device`` (default CPU).

    Raises :class:`~volumevlm.errors.VolumeVLMError` (one line naming the directory)
    when it is missing, incomplete or corrupt.
    """
    return VolumeVLM.from_pretrained(directory, device=device)
