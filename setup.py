# The package list lives here, not in pyproject.toml, because two folders outside the
# volumevlm/ tree ship inside the wheel (see pyproject.toml's package-dir):
#   kernels/volumevlm_kernels/ -> the import package volumevlm_kernels
#   conf/                      -> volumevlm/conf (Hydra configs and prompt sets)
# Every folder is listed as a (namespace) package, data-only ones included, so that its
# files ship as package data; setuptools warns about data folders that are not listed.
from setuptools import find_namespace_packages, setup


def packages_under(name: str, folder: str) -> list[str]:
    found = find_namespace_packages(where=folder, exclude=["*__pycache__*"])
    return [name] + [f"{name}.{package}" for package in found if "__pycache__" not in package]


setup(
    packages=packages_under("volumevlm", "volumevlm")
    + packages_under("volumevlm.conf", "conf")
    + packages_under("volumevlm_kernels", "kernels/volumevlm_kernels")
)
