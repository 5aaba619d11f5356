# The package list lives here only because `kernels/` is installed under the
# import name `volumevlm_kernels` (see pyproject.toml); everything else is in
# pyproject.toml.
from setuptools import find_packages, setup

setup(packages=find_packages(include=["volumevlm", "volumevlm.*"]) + ["volumevlm_kernels"])
