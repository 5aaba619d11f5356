"""Report text: organ-system sections, tokenizer, phecodes, prompts and the findings labeler.

``volumevlm.text.label_findings`` is :func:`volumevlm.text.labeler.label_findings`; it is
loaded on first use, because compiling the labeler's patterns takes a tenth of a second
that importing the other text modules should not pay.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "label_findings": ("volumevlm.text.labeler", "label_findings"),
    "label_reports": ("volumevlm.text.labeler", "label_reports"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        value = getattr(importlib.import_module(module_name), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'volumevlm.text' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
