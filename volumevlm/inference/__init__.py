"""Inference: open checkpoint directories (``volumevlm.load``)."""

from volumevlm.inference.checkpoint import load

__all__ = ["load"]
