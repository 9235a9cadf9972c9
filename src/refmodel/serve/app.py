"""The FastAPI app of ``refmodel serve``: routes, auth, body limit, error mapping, lifespan.

Status codes: unknown model 404; malformed batch 422 (the message names the field); body over
``max_body_bytes`` 413; queue full 429 with ``Retry-After``; missing or wrong bearer token 401
(``hmac.compare_digest``); shutting down 503. Bad input never produces a 500.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from ..errors import ModelNotAllowed, RefModelError, RequestTooLarge, ServiceOverloaded, Unauthorized
from ..remote import wire
from .batcher import Batcher
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .runners import ServedModel, load_logprob_models, load_reward_model, warm_up
from .schemas import LogprobsRequest, ModelInfo, ModelsResponse, RewardsRequest
from .settings import ServeSettings
from .validate import Limits, check_block, check_sequences

log = logging.getLogger(__name__)
_ENDPOINTS = {"/v1/logprobs", "/v1/logprobs:binary", "/v1/rewards", "/v1/models", "/healthz", "/metrics"}


def _error(status: int, detail: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "field": field}, status_code=status, headers=headers)


def _status_of(exc: RefModelError) -> int:
    if isinstance(exc, Unauthorized):
        return 401
    if isinstance(exc, ModelNotAllowed):
        return 404
    if isinstance(exc, RequestTooLarge):
        return 413
    if isinstance(exc, ServiceOverloaded):
        return getattr(exc, "status", None) or 429
    if isinstance(exc, ValueError):  # InvalidInput / InvalidBatch
        return 422
    return 500


def _too_large(limit: int) -> JSONResponse:
    return _error(413, f"the request body exceeds this server's limit of {limit} bytes; split the batch",
                  "body")


class _Guard:
    """ASGI middleware: enforce the body limit before anything reads the body; time every request.

    ``fast_routes`` maps ``(method, path)`` to a raw ASGI handler called here directly, past FastAPI's
    middleware and routing layers (~0.1 ms per request, which matters on the binary throughput path).
    """

    def __init__(self, app, max_body_bytes: int, metrics: Metrics, fast_routes: dict | None = None):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics
        self.fast_routes = fast_routes or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]
        path = scope["path"] if scope["path"] in _ENDPOINTS else "other"

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = dict(scope["headers"])
            declared = headers.get(b"content-length")
            limit = self.max_body_bytes
            if declared is not None:
                if not declared.isdigit() or int(declared) > limit:
                    return await _too_large(limit)(scope, receive, send_status)
            elif scope["method"] in ("POST", "PUT", "PATCH"):  # chunked: count while reading, then replay
                chunks, size, more = [], 0, True
                while more:
                    message = await receive()
                    if message["type"] != "http.request":
                        return
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    more = message.get("more_body", False)
                    if size > limit:
                        return await _too_large(limit)(scope, receive, send_status)
                body, sent = b"".join(chunks), [False]

                async def receive():  # noqa: F811 - replays the body that was read above
                    if not sent[0]:
                        sent[0] = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return {"type": "http.disconnect"}
            handler = self.fast_routes.get((scope["method"], scope["path"]), self.app)
            await handler(scope, receive, send_status)
        finally:
            self.metrics.request_done(path, status[0], time.perf_counter() - start)


class _State:
    def __init__(self, settings: ServeSettings, served: dict[str, ServedModel] | None):
        self.settings = settings
        self.served = served
        self.token = settings.bearer_token()
        self.metrics = Metrics()
        self.batchers: dict[str, Batcher] = {}
        self.cache = None


def create_app(settings: ServeSettings, served: dict[str, ServedModel] | None = None, *,
               batcher_cls: type = Batcher) -> FastAPI:
    """The app; ``served`` are already-loaded models (else the allow-lists are loaded at start-up).

    ``batcher_cls`` builds each model's request merger; it takes :class:`Batcher`'s constructor
    arguments and offers its ``start/stop/submit/depth/retry_after_s`` (the Ray Serve deployment
    passes one built on ``@serve.batch``, see :mod:`refmodel.serve.ray_serve`).
    """
    state = _State(settings, served)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.served is None:
            state.cache, state.served = load_logprob_models(settings.models, settings.device)
            for name, path in settings.reward_models.items():
                state.served[name] = load_reward_model(name, path, settings.device)
            for model in state.served.values():
                warm_up(model)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refmodel-model")
        for name, model in state.served.items():
            batcher = batcher_cls(name, model.run, executor, max_batch_tokens=settings.max_batch_tokens,
                                  max_wait_s=settings.max_wait_ms / 1000, max_queue=settings.max_queue,
                                  batching=settings.batching, observe=state.metrics.observer(name),
                                  on_depth=state.metrics.depth_setter(name))
            batcher.start()
            state.batchers[name] = batcher
        log.info("serving %s (batching=%s, max_batch_tokens=%d, max_wait_ms=%g)", sorted(state.served),
                 settings.batching, settings.max_batch_tokens, settings.max_wait_ms)
        yield
        # uvicorn has stopped accepting and drained in-flight requests before lifespan shutdown runs.
        for batcher in state.batchers.values():
            await batcher.stop()
        executor.shutdown(wait=True)
        log.info("reference service stopped")

    app = FastAPI(title="refmodel reference service", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.refmodel = state

    async def authorize(request: Request) -> None:
        # async on purpose: FastAPI runs a sync dependency in a worker thread, a hop on every request.
        if state.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), state.token.encode()):
            raise Unauthorized("missing or wrong bearer token; send 'Authorization: Bearer <token>'", status=401)

    def lookup(name: str, kind: str) -> ServedModel:
        model = state.served.get(name) if state.served else None
        if model is None or model.kind != kind:
            names = sorted(n for n, m in (state.served or {}).items() if m.kind == kind)
            hint = f" ({name!r} is a {model.kind} model)" if model is not None else ""
            raise ModelNotAllowed(f"model {name!r} is not served for {kind}{hint}; this server allows {names}")
        return model

    def limits(model: ServedModel) -> Limits:
        return Limits(model.vocab_size, settings.max_seq_len, settings.max_sequences)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid body"}
        if first.get("type") == "json_invalid":
            return _error(422, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                          "body")
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if not loc:
            return _error(422, f"the body must be a JSON object (send Content-Type: application/json): "
                               f"{first.get('msg')}", "body")
        where = loc[0] + "".join(f"[{p}]" for p in loc[1:])
        return _error(422, f"{where}: {first.get('msg')} ({len(errors)} problem(s) in the body)", loc[0])

    def error_response(exc: RefModelError) -> JSONResponse:
        status = _status_of(exc)
        headers = None
        if status == 429:
            batcher = next(iter(state.batchers.values()), None)
            headers = {"Retry-After": str(batcher.retry_after_s() if batcher else 1)}
        elif status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        if status == 500:
            log.error("unexpected %s: %s", type(exc).__name__, exc)
        return _error(status, str(exc), getattr(exc, "field", None), headers)

    def unexpected_response(path: str, exc: Exception) -> JSONResponse:
        log.error("internal error on %s", path, exc_info=exc)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

    @app.exception_handler(RefModelError)
    async def _refmodel_error(request: Request, exc: RefModelError):
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return unexpected_response(request.url.path, exc)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "models": sorted(state.served or {}),
                "queue_depth": sum(b.depth for b in state.batchers.values())}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> ModelsResponse:
        infos = [ModelInfo(name=m.name, kind=m.kind, fingerprint=m.fingerprint, vocab_size=m.vocab_size,
                           dtype=m.dtype, parameters=m.parameters) for m in (state.served or {}).values()]
        return ModelsResponse(models=infos, max_seq_len=settings.max_seq_len, max_sequences=settings.max_sequences)

    @app.get("/metrics", dependencies=[Depends(authorize)])
    async def metrics():
        return Response(state.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.post("/v1/logprobs", dependencies=[Depends(authorize)])
    async def logprobs(req: LogprobsRequest):
        model = lookup(req.model, "logprobs")
        seqs = check_sequences(req.input_ids, limits(model), req.attention_mask, req.score_mask, req.score_start,
                               temperature=req.temperature)
        rows = await state.batchers[req.model].submit(seqs, [s.ids.numel() for s in seqs])
        body = {"model": req.model, "fingerprint": model.fingerprint_at(req.temperature),
                "logprobs": [r.tolist() for r in rows]}
        return Response(json.dumps(body), media_type="application/json")

    async def logprobs_binary(request: Request):
        await authorize(request)
        decoded = wire.decode_request(await request.body())
        model = lookup(decoded.model, "logprobs")
        seqs = check_block(decoded.input_ids, limits(model), decoded.attention_mask, decoded.score_mask,
                           temperature=decoded.temperature)
        rows = await state.batchers[decoded.model].submit(seqs, [s.ids.numel() for s in seqs])
        out = np.stack(rows) if rows else np.zeros(decoded.input_ids.shape, np.float32)
        fp = model.fingerprint_at(decoded.temperature)
        return Response(wire.encode_response(fp, out), media_type=wire.CONTENT_TYPE,
                        headers={"X-Refmodel-Fingerprint": fp})

    async def logprobs_binary_asgi(scope, receive, send):
        try:
            response = await logprobs_binary(Request(scope, receive))
        except RefModelError as exc:
            response = error_response(exc)
        except Exception as exc:
            response = unexpected_response(scope["path"], exc)
        await response(scope, receive, send)

    # Registered as a route (405 for other methods) but served by _Guard directly, see there.
    app.add_route("/v1/logprobs:binary", logprobs_binary, methods=["POST"], include_in_schema=False)

    @app.post("/v1/rewards", dependencies=[Depends(authorize)])
    async def rewards(req: RewardsRequest):
        model = lookup(req.model, "rewards")
        seqs = check_sequences(req.input_ids, limits(model), req.attention_mask)
        scores = await state.batchers[req.model].submit(seqs, [s.ids.numel() for s in seqs])
        return {"model": req.model, "fingerprint": model.fingerprint, "scores": scores}

    app.add_middleware(_Guard, max_body_bytes=settings.max_body_bytes, metrics=state.metrics,
                       fast_routes={("POST", "/v1/logprobs:binary"): logprobs_binary_asgi})
    return app


__all__ = ["create_app"]
