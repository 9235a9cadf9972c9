"""The FastAPI app of ``refmodel serve``: the factory and its lifespan.

The parts live beside it: :mod:`.routes` (the endpoints), :mod:`.errors` (one error shape and status
mapping), :mod:`.guard` (auth, header and body limits before any body is read; request metrics) and
:mod:`.connection` (the request-head deadline, under uvicorn). Bad input never produces a 500.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .batcher import Batcher, BatcherFactory, LocalBatcher
from .errors import install_error_handlers
from .guard import OPEN_PATHS, Guard
from .metrics import Metrics
from .routes import DIRECT_ENDPOINTS, body_checks, router
from .runners import ServedModel, load_logprob_models, load_reward_model, warm_up
from .settings import ServeSettings
from .validate import Limits, model_limits

log = logging.getLogger(__name__)


class AppState:
    """What the routes share, at ``app.state.refmodel``: settings, models, their limits and batchers."""

    def __init__(self, settings: ServeSettings, served: dict[str, ServedModel] | None):
        self.settings = settings
        self.served = served
        self.token = settings.bearer_token()
        self.metrics = Metrics()
        self.batchers: dict[str, Batcher] = {}
        self.limits: dict[str, Limits] = {}
        self.cache = None

    def set_models(self, served: dict[str, ServedModel]) -> None:
        s = self.settings
        self.served = served
        self.limits = {name: model_limits(m.vocab_size, s.max_seq_len, s.max_sequences, name, m.position_limit)
                       for name, m in served.items()}


def _lifespan(state: AppState, batcher_cls: BatcherFactory):
    settings = state.settings

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.served is None:
            state.cache, served = load_logprob_models(settings.models, settings.device)
            for name, path in settings.reward_models.items():
                served[name] = load_reward_model(name, path, settings.device)
            for model in served.values():
                warm_up(model)
            state.set_models(served)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refmodel-model")
        for name, model in (state.served or {}).items():
            batcher = batcher_cls(name, model.run, executor, max_batch_tokens=settings.max_batch_tokens,
                                  max_wait_s=settings.max_wait_ms / 1000, max_queue=settings.max_queue,
                                  batching=settings.batching, observe=state.metrics.observer(name),
                                  on_depth=state.metrics.depth_setter(name))
            batcher.start()
            state.batchers[name] = batcher
        log.info("serving %s (batching=%s, max_batch_tokens=%d, max_wait_ms=%g)", sorted(state.served or {}),
                 settings.batching, settings.max_batch_tokens, settings.max_wait_ms)
        yield
        # uvicorn has stopped accepting and drained in-flight requests before lifespan shutdown runs.
        for batcher in state.batchers.values():
            await batcher.stop()
        executor.shutdown(wait=True)
        log.info("reference service stopped")

    return lifespan


def _openapi(app: FastAPI, auth: bool):
    """FastAPI's schema plus what it cannot see: the bearer scheme that the guard enforces."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            if auth:
                schema.setdefault("components", {})["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer",
                               "description": "the token of --token-file / REFMODEL_TOKEN"}}
                for path, operations in schema["paths"].items():
                    if path not in OPEN_PATHS:
                        for operation in operations.values():
                            operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema
    return openapi


def create_app(settings: ServeSettings, served: dict[str, ServedModel] | None = None, *,
               batcher_cls: BatcherFactory = LocalBatcher) -> FastAPI:
    """The app; ``served`` are already-loaded models (else the allow-lists are loaded at start-up).

    ``batcher_cls`` builds each model's request merger (a :class:`~refmodel.serve.batcher.Batcher`; it
    takes :class:`LocalBatcher`'s constructor arguments; the Ray Serve deployment passes one built on
    ``@serve.batch``, see :mod:`refmodel.serve.ray_serve`).
    """
    state = AppState(settings, None)
    if served is not None:
        state.set_models(served)
    app = FastAPI(title="refmodel reference service", version="1", lifespan=_lifespan(state, batcher_cls),
                  docs_url=None, redoc_url=None,
                  description="Reference-model log-probs and reward scores. Every error answers "
                              "`{detail, field}`.")
    app.state.refmodel = state
    install_error_handlers(app)
    app.include_router(router)
    app.openapi = _openapi(app, state.token is not None)  # type: ignore[method-assign]  # FastAPI's documented hook
    app.add_middleware(Guard, metrics=state.metrics, token=state.token, max_body_bytes=settings.max_body_bytes,
                       max_headers=settings.max_headers, max_header_bytes=settings.max_header_bytes,
                       body_timeout_s=settings.body_timeout_s, endpoints=DIRECT_ENDPOINTS,
                       body_checks=body_checks(settings.max_sequences))
    return app


__all__ = ["AppState", "create_app"]
