"""Where a result was made: package versions and the CPU, recorded by evaluation
reports, exported bundles, the HTTP service and the benchmarks (one definition)."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path


def package_versions(*distributions: str) -> dict[str, str | None]:
    """{"python": ..., distribution: installed version, or None when it is not installed}."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in distributions:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
