"""The reference-model service: ``refmodel serve`` (FastAPI + uvicorn) with dynamic batching.

Submodules: :mod:`.settings` (pydantic-settings, env prefix ``REFMODEL_``), :mod:`.validate` (request
checks that name the offending field), :mod:`.batcher` (the ``Batcher`` protocol and asyncio request
merging), :mod:`.runners` (model loading and batch execution), :mod:`.metrics` (Prometheus),
:mod:`.app` (the FastAPI factory and lifespan), :mod:`.routes`, :mod:`.errors` (one error shape),
:mod:`.guard` (auth and limits before the body is read), :mod:`.connection` (the request-head
deadline under uvicorn), :mod:`.main` (bind, load, run uvicorn) and :mod:`.ray_serve`. The binary
wire format is :mod:`refmodel.remote.wire` (shared with the client).

Nothing here is imported by ``import refmodel``. The whole room needs the ``serve`` extra: its modules
import these packages at module level, so they are checked here, at the door every ``refmodel.serve.*``
import passes through, and a missing one is a ``MissingDependency`` naming the extra, not a traceback.
"""

from .._optional import require

for _module in ("fastapi", "uvicorn", "httptools", "pydantic", "pydantic_settings", "prometheus_client"):
    require(_module, "serve")
del _module

__all__ = ["create_app", "ServeSettings"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ServeSettings":
        from .settings import ServeSettings

        return ServeSettings
    raise AttributeError(name)
