"""What every benchmark result records about where it ran: package versions and the CPU.

Benchmarks are run as scripts (``python benchmarks/x.py``), so this folder is on their
import path and they import this module as ``from provenance import ...``.
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path


def package_versions(*distributions: str) -> dict[str, str | None]:
    """{"python": ..., distribution: installed version or None} for the given names."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in distributions:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
