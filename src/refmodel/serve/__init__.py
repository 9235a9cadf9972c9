"""The reference-model service: ``refmodel serve`` (FastAPI + uvicorn) with dynamic batching.

Submodules: :mod:`.settings` (pydantic-settings, env prefix ``REFMODEL_``), :mod:`.validate` (request
checks that name the offending field), :mod:`.batcher` (the ``Batcher`` protocol and asyncio request
merging), :mod:`.runners` (model loading and batch execution), :mod:`.metrics` (Prometheus),
:mod:`.app` (the FastAPI factory and lifespan), :mod:`.routes`, :mod:`.errors` (one error shape),
:mod:`.guard` (auth and limits before the body is read), :mod:`.connection` (the request-head
deadline under uvicorn), :mod:`.main` (bind, load, run uvicorn) and :mod:`.ray_serve`. The binary
wire format is :mod:`refmodel.remote.wire` (shared with the client).

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
