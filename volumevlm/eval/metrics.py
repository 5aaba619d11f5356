"""Moved to :mod:`volumevlm.metrics`, the one metrics module of training and evaluation
(below both in the import layers). These names stay importable from here for code written
against the old place; new code imports :mod:`volumevlm.metrics`."""

from volumevlm.metrics import *  # noqa: F403
from volumevlm.metrics import __all__  # noqa: F401
