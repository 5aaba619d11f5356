"""Open a checkpoint directory: ``volumevlm.load(dir)``, and the model class it returns.

The directory is the one :meth:`volumevlm.models.vlm.VolumeVLM.save_pretrained`
writes (e.g. ``OUT/model`` after ``volumevlm train``): safetensors weights, JSON
config, tokenizer files and the phecode table. Loading needs no network, no Hydra
run directory and unpickles nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from volumevlm.models import vlm


class VolumeVLM(vlm.VolumeVLM):
    """The pretrained model with the inference verbs, what :func:`load` returns.

    The network, its weights and its checkpoint directory are those of
    :class:`volumevlm.models.vlm.VolumeVLM` (training builds and saves that class); this
    subclass adds the verbs that take any CT input: a path (NIfTI, DICOM folder or zip,
    NRRD, MHA), a nibabel image, ``(array, affine)``, a preprocessed tensor, or a list of
    them. :mod:`volumevlm.inference.pipeline` and :mod:`volumevlm.inference.index` hold
    the implementations.
    """

    def embed(self, x: Any) -> torch.Tensor:
        """Unit image embedding float32 [E] of one input ([N, E] for a list)."""
        from volumevlm.inference import pipeline

        return pipeline.embed(self, x)

    def retrieve(self, x: Any, k: int = 5, index: Any = None, kind: str | None = "report"):
        """Nearest entries of a retrieval index (`volumevlm index build`) to x, best first."""
        from volumevlm.inference.index import retrieve

        return retrieve(self, x, k=k, index=index, kind=kind)

    def zero_shot(self, x: Any, findings: Sequence[str] | None = None, prompts: Any = None, anatomy: bool = False):
        """{finding: P(present)} with a prompt set (default: the checkpoint's, else "synthetic");
        ``anatomy``: each finding read in its organ system's embedding (the anatomy head)."""
        from volumevlm.inference import pipeline

        return pipeline.zero_shot(self, x, findings=findings, prompts=prompts, anatomy=anatomy)

    def phenotypes(self, x: Any, top_k: int | None = 10, anatomy: bool = False):
        """[(phecode, description, probability)], most likely first; ``anatomy``: from the
        anatomy head's classifiers on the organs the model segments."""
        from volumevlm.inference import pipeline

        return pipeline.phenotypes(self, x, top_k=top_k, anatomy=anatomy)

    def similarity_map(self, x: Any, finding: str, prompts: Any = None, upsample: str = "linear", out=None):
        """Patch-level cosine map of ``finding`` as a float nibabel image in x's own geometry."""
        from volumevlm.inference import pipeline

        return pipeline.similarity_map(self, x, finding, prompts=prompts, upsample=upsample, out=out)

    def segment(self, x: Any, out=None):
        """Label image (names in its header) in x's own geometry; needs the segmentation head."""
        from volumevlm.inference import pipeline

        return pipeline.segment(self, x, out=out)

    def generate_report(self, x: Any, **generation: Any):
        """Report text by organ system; needs the report head."""
        from volumevlm.inference import pipeline

        return pipeline.generate_report(self, x, **generation)


def load(directory: str | os.PathLike, device: str | torch.device | None = None) -> VolumeVLM:
    """The VolumeVLM saved in ``directory``, in eval mode on ``device`` (default CPU).

    Raises :class:`~volumevlm.errors.VolumeVLMError` (one line naming the directory)
    when it is missing, incomplete or corrupt.
    """
    return VolumeVLM.from_pretrained(directory, device=device)
