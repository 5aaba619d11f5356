"""The HTTP service: ``volumevlm serve`` (:mod:`volumevlm.serve.cli`) runs
:func:`volumevlm.serve.app.create_app` on uvicorn. Not for clinical use."""

from __future__ import annotations

__all__ = ["create_app"]


def __getattr__(name: str):
    # FastAPI is imported only when the service is wanted.
    if name == "create_app":
        from volumevlm.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'volumevlm.serve' has no attribute {name!r}")
