"""The one exception family users see.

Every error raised on bad input is a :class:`VolumeVLMError` whose message is ONE
line naming the offending file (or object) and the problem. The CLI prints that
line and exits non-zero; it never shows a traceback for these.
"""

from __future__ import annotations


class VolumeVLMError(Exception):
    """Base class: a user-facing, one-line error."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class InputError(VolumeVLMError):
    """An input file or object is unreadable, malformed or out of range."""

    def __init__(self, source: object, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class GeometryError(InputError):
    """Two images (e.g. image and label map) do not share one geometry."""


class ManifestError(VolumeVLMError):
    """A manifest is malformed or points at missing files (with --strict)."""


def one_line(err: BaseException, limit: int = 200) -> str:
    """A foreign exception (a library's, several lines long) as one bounded line for a
    :class:`VolumeVLMError` message; its type name when it has no message."""
    text = " ".join(str(err).split())
    return text[:limit] if text else type(err).__name__
