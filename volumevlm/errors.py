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
    """An input file or object is unreadable, malformed or out of range.

    ``problem`` is our own words; ``detail`` (optional) is what a library said about it,
    which may quote bytes of the file. The message shows both to a local user; the HTTP
    service shows ``problem`` alone, so a client never sees a file's bytes echoed back.
    """

    def __init__(self, source: object, problem: str, detail: str | None = None):
        self.source = str(source)
        self.problem = problem
        self.detail = detail or None
        super().__init__(f"{self.source}: {problem}" + (f" ({detail})" if detail else ""))


class TooLargeError(InputError):
    """An input, or the work it would cause, is over a limit (voxels, unpacked bytes)."""


class GeometryError(InputError):
    """Two images (e.g. image and label map) do not share one geometry."""


class ManifestError(VolumeVLMError):
    """A manifest is malformed or points at missing files (with --strict)."""


def one_line(err: BaseException, limit: int = 200) -> str:
    """A foreign exception (a library's, several lines long) as one bounded line for a
    :class:`VolumeVLMError` message; its type name when it has no message."""
    text = " ".join(str(err).split())
    return text[:limit] if text else type(err).__name__
