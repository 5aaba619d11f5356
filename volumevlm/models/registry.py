"""Named encoder sizes: one small JSON file each in ``volumevlm/models/sizes/``.

``encoder_config("small", patch_size=(8, 8, 8))`` gives the size's
:class:`~volumevlm.models.encoder.EncoderConfig` with overrides applied.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from volumevlm.errors import VolumeVLMError
from volumevlm.models.encoder import EncoderConfig


def available_sizes() -> list[str]:
    folder = resources.files("volumevlm.models") / "sizes"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def size_spec(name: str) -> dict[str, Any]:
    """The JSON of a named size (keys starting with '_' are notes and are dropped)."""
    names = available_sizes()
    if name not in names:
        raise VolumeVLMError(f"encoder size {name!r} is unknown; known sizes: {', '.join(names)}")
    text = (resources.files("volumevlm.models") / "sizes" / f"{name}.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def encoder_config(name: str = "tiny", **overrides: Any) -> EncoderConfig:
    """EncoderConfig of a named size, with field overrides (unknown fields: one-line error)."""
    spec = size_spec(name)
    spec.update(overrides)
    spec["name"] = name
    try:
        return EncoderConfig.from_dict(spec)
    except TypeError as err:
        raise VolumeVLMError(f"encoder size {name!r}: {err}") from None
