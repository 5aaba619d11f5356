"""The service's error: an HTTP status, a short code and ONE line saying what is wrong."""

from __future__ import annotations

from volumevlm.errors import VolumeVLMError


class ServiceError(VolumeVLMError):
    """A request the service answers with ``status`` and a JSON error body.

    status: the HTTP status (4xx for the client's mistakes, 503 / 504 for load and time).
    code: a stable machine-readable name ("upload_too_large", "too_many_voxels", ...).
    headers: extra response headers (e.g. Retry-After, WWW-Authenticate).
    """

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = int(status)
        self.code = code
        self.headers = dict(headers or {})
