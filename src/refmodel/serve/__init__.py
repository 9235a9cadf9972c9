"""The reference-model service: ``refmodel serve`` (FastAPI + uvicorn) with dynamic batching.

Submodules: :mod:`.settings` (pydantic-settings, env prefix ``REFMODEL_``), :mod:`.wire` (the binary
format, importable without FastAPI), :mod:`.validate` (request checks that name the offending field),
:mod:`.batcher` (asyncio request merging), :mod:`.runners` (model loading and batch execution),
:mod:`.metrics` (Prometheus), :mod:`.app` (the FastAPI app) and :mod:`.main` (uvicorn start-up).

Nothing here is imported by ``import refmodel``; FastAPI is imported only by :mod:`.app`.
"""

__all__ = ["create_app", "ServeSettings"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ServeSettings":
        from .settings import ServeSettings

        return ServeSettings
    raise AttributeError(name)
