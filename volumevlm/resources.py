"""Where the files that ship with the package are: the Hydra config folder and the
bundled prompt sets (bottom layer, beside ``errors``: training, prompts and the CLI all
read them, so the lookup lives below all of them).

The repository keeps ``conf/`` at its top level; the wheel installs it as
``volumevlm/conf`` (pyproject.toml's package-dir). The folder is found, in order, at
``$VOLUMEVLM_CONF``, inside the installed package (``volumevlm/conf``), or next to the
package (the repository's ``conf/`` of a checkout or an editable install). The search
starts from the package's own location, never from the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from volumevlm.errors import VolumeVLMError

CONF_ENV = "VOLUMEVLM_CONF"
TRAIN_CONFIG_NAME = "train"
PROMPTS_SUBDIR = "prompts"


def conf_dir() -> Path:
    """The Hydra config folder, the one holding ``train.yaml`` (search order above)."""
    marker = f"{TRAIN_CONFIG_NAME}.yaml"
    env = os.environ.get(CONF_ENV)
    if env:
        folder = Path(env).expanduser().resolve()
        if not (folder / marker).is_file():
            raise VolumeVLMError(f"{folder}: ${CONF_ENV} names no folder holding {marker}")
        return folder
    package = Path(__file__).resolve().parent
    for folder in (package / "conf", package.parent / "conf"):
        if (folder / marker).is_file():
            return folder
    raise VolumeVLMError(f"{package}: no Hydra config folder found; set ${CONF_ENV} to the repository's conf/ folder")


def prompts_dir() -> Path:
    """The folder of the bundled prompt sets: ``conf_dir()/prompts``."""
    return conf_dir() / PROMPTS_SUBDIR
