"""The top-level names a user imports: ``from volumevlm import *`` gives exactly the
documented API, each name is the object its home module defines, and importing the
package alone loads none of the heavy submodules."""

from __future__ import annotations

import subprocess
import sys

import volumevlm

API = {"__version__", "NOT_FOR_CLINICAL_USE", "load", "VolumeVLM", "available_sizes", "preprocess", "read_volume",
       "VolumeVLMError", "ops"}


def test_all_is_the_documented_api_and_every_name_resolves():
    assert set(volumevlm.__all__) == API
    namespace: dict = {}
    exec("from volumevlm import *", namespace)
    assert API <= set(namespace)
    assert set(dir(volumevlm)) >= API

    from volumevlm.data.transforms import preprocess
    from volumevlm.errors import VolumeVLMError
    from volumevlm.inference.checkpoint import load
    from volumevlm.io import read_volume
    from volumevlm.models.registry import available_sizes

    assert volumevlm.load is load and volumevlm.preprocess is preprocess and volumevlm.read_volume is read_volume
    assert volumevlm.VolumeVLMError is VolumeVLMError and volumevlm.available_sizes is available_sizes
    assert {"tiny", "small", "base"} <= set(volumevlm.available_sizes())
    # The user-facing class: the network (models layer) plus the inference verbs, what load() returns.
    from volumevlm.models.vlm import VolumeVLM as Network

    assert issubclass(volumevlm.VolumeVLM, Network)
    assert load.__annotations__["return"] in ("VolumeVLM", volumevlm.VolumeVLM)
    for verb in ("embed", "zero_shot", "phenotypes", "similarity_map", "segment", "generate_report", "retrieve"):
        assert callable(getattr(volumevlm.VolumeVLM, verb)) and not hasattr(Network, verb)


def test_import_volumevlm_is_light():
    code = "import sys, volumevlm; print(sorted(m for m in ('torch', 'monai', 'transformers', 'lightning') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
