"""Inference: open checkpoint directories (``volumevlm.load``), pipeline verbs, retrieval
index, batch prediction.

``load`` is imported on first use: it pulls in the model and MONAI, which the index and
batch modules' command-line entry points should not pay for before they need a model.
"""

from __future__ import annotations

__all__ = ["load"]


def __getattr__(name: str):
    if name == "load":
        from volumevlm.inference.checkpoint import load

        globals()["load"] = load
        return load
    raise AttributeError(f"module 'volumevlm.inference' has no attribute {name!r}")
