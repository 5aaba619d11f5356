"""volumevlm: a 3D CT vision-language foundation model package.

Heavy submodules load lazily so that ``import volumevlm`` (and the CLI) stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

NOT_FOR_CLINICAL_USE = "Research software: not for clinical use."

# The public API: name -> (module, attribute; None for the module itself).
_LAZY = {
    "load": ("volumevlm.inference.checkpoint", "load"),
    "VolumeVLM": ("volumevlm.inference.checkpoint", "VolumeVLM"),
    "available_sizes": ("volumevlm.models.registry", "available_sizes"),
    "preprocess": ("volumevlm.data.transforms", "preprocess"),
    "read_volume": ("volumevlm.io", "read_volume"),
    "VolumeVLMError": ("volumevlm.errors", "VolumeVLMError"),
    "ops": ("volumevlm.ops", None),
}

__all__ = ["__version__", "NOT_FOR_CLINICAL_USE", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'volumevlm' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
