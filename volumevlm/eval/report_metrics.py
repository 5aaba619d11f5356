"""Moved to :mod:`volumevlm.metrics.report` (the report metrics of the one metrics module).
These names stay importable from here for code written against the old place; new code
imports :mod:`volumevlm.metrics.report`."""

from volumevlm.metrics.report import *  # noqa: F403
from volumevlm.metrics.report import __all__  # noqa: F401
