# The package list lives here only because `kernels/volumevlm_kernels/` is outside
# the volumevlm tree (see pyproject.toml's package-dir); everything else is in
# pyproject.toml.
from setuptools import find_packages, setup

setup(packages=find_packages(include=["volumevlm", "volumevlm.*"]) + ["volumevlm_kernels"])
