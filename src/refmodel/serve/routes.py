"""The routes of ``refmodel serve``: JSON log-probs and rewards, the binary log-probs form, models,
health and metrics. Auth and body limits are already enforced by :mod:`refmodel.serve.guard`; every
error raised here is answered by :mod:`refmodel.serve.errors` (the same for every route).

The event loop answers every client, so it never decodes, validates or encodes a large body: above
``OFF_LOOP_BYTES`` that work runs in a worker thread, and a JSON body's rows are counted before it is
decoded (:func:`refmodel.serve.validate.decode_json_rows`). A request whose client disconnects while it
waits in the batcher's queue is dropped from it (``_submit``).
"""

from __future__ import annotations

import asyncio
import json
import math

import anyio
import numpy as np
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from ..errors import ModelNotAllowed
from ..remote import wire
from .errors import ERROR_STATUSES, ErrorResponse
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .runners import ServedModel
from .schemas import (
    LogprobsRequest,
    LogprobsResponse,
    ModelInfo,
    ModelsResponse,
    RewardsRequest,
    RewardsResponse,
)
from .validate import FieldError, JsonRowBound, check_block, check_sequences, decode_json_rows

router = APIRouter()
OFF_LOOP_BYTES = 65536  # bodies (and answers of as many tokens / 4) above this are handled in a worker thread


async def _off_loop(nbytes: int, fn, *args):
    """``fn(*args)``, in a worker thread when it handles more than ``OFF_LOOP_BYTES`` (a small body costs
    less on the loop than the thread hop)."""
    if nbytes > OFF_LOOP_BYTES:
        return await anyio.to_thread.run_sync(fn, *args)
    return fn(*args)


def _parse(body: bytes | bytearray, schema: type[BaseModel], max_sequences: int, check):
    """Decode, validate against ``schema`` and ``check(req)`` one JSON body (runs off the loop when large)."""
    obj = decode_json_rows(body, max_sequences)
    try:
        req = schema.model_validate(obj)
    except ValidationError as exc:  # answered like FastAPI's own body errors (errors._validation_response)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]) \
            from None
    return req, check(req)


async def _body(request: Request) -> bytes | bytearray:
    """The request body as the guard read it (one buffer; Starlette's ``request.body()`` would copy it)."""
    message = await request.receive()
    body = message.get("body", b"") if message["type"] == "http.request" else b""
    if message.get("more_body", False):  # not read whole by the guard: collect the rest
        parts = [body]
        while message.get("more_body", False):
            message = await request.receive()
            parts.append(message.get("body", b""))
        body = b"".join(parts)
    return body


async def _json_body(request: Request, schema: type[BaseModel], check):
    """``(request model, checked sequences)`` of a JSON route; 422 naming the field otherwise."""
    body = await _body(request)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))):
        raise FieldError("body", "the body must be a JSON object (send Content-Type: application/json)")
    state = request.app.state.refmodel
    return await _off_loop(len(body), _parse, body, schema, state.settings.max_sequences, check)


class _ClientGone(Exception):
    """The client disconnected while its request waited: nobody reads the answer."""


async def _submit(request: Request, batcher, seqs: list) -> list:
    """``batcher.submit`` of a request's sequences, dropped from the queue if the client disconnects first.

    The body has been read, so the next ``receive`` returns only when the client goes away (or the
    answer is out); the batcher skips a cancelled request's sequences and frees its queue slots.
    """
    work = asyncio.ensure_future(batcher.submit(seqs, [s.ids.numel() for s in seqs]))

    async def watch() -> None:
        try:
            while (await request.receive())["type"] != "http.disconnect":
                pass
        except Exception:  # a server whose receive cannot wait for a disconnect: nothing to watch
            return
        work.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if work.cancelled() and watcher.done() and not watcher.cancelled():
            raise _ClientGone() from None
        raise
    finally:
        watcher.cancel()


def _finite(rows, temperature: float) -> None:
    """Answers never hold NaN or inf (not JSON, and wrong): a temperature small enough for ``logits / T`` to
    overflow is the client's to change (422); at temperature 1 it is a bug of the model (500)."""
    if all(np.isfinite(r).all() for r in rows):
        return
    if temperature != 1.0:
        raise FieldError("temperature", f"temperature={temperature!r} makes the log-probs overflow (logits / "
                                        "temperature exceeds float32); use a larger temperature")
    raise FloatingPointError("the model produced non-finite log-probs")


def _encode_json(body: dict) -> bytes:
    return json.dumps(body).encode()


def _errors(*statuses: int) -> dict:
    """OpenAPI ``responses`` for the error statuses a route can answer (all with ``ErrorResponse``)."""
    return {s: {"model": ErrorResponse, "description": ERROR_STATUSES[s]} for s in statuses}


_AUTH = (401, 431)
_SCORING = (*_AUTH, 404, 408, 413, 422, 429, 503)


def _lookup(request: Request, name: str, kind: str) -> ServedModel:
    served = request.app.state.refmodel.served or {}
    model = served.get(name)
    if model is None or model.kind != kind:
        names = sorted(n for n, m in served.items() if m.kind == kind)
        hint = f" ({name!r} is a {model.kind} model)" if model is not None else ""
        raise ModelNotAllowed(f"model {name!r} is not served for {kind}{hint}; this server allows {names}")
    return model


@router.get("/healthz", summary="Liveness and queue depth (no token needed)", responses=_errors(431),
            response_model=dict)
async def healthz(request: Request) -> Response:
    state = request.app.state.refmodel
    body = {"status": "ok", "models": sorted(state.served or {}),
            "queue_depth": sum(b.depth for b in state.batchers.values())}
    return Response(_encode_json(body), media_type="application/json")


@router.get("/v1/models", responses=_errors(*_AUTH))
async def models(request: Request) -> ModelsResponse:
    """The served models, their fingerprints and each one's effective ``max_seq_len``."""
    state = request.app.state.refmodel
    infos = [ModelInfo(name=m.name, kind=m.kind, fingerprint=m.fingerprint, vocab_size=m.vocab_size, dtype=m.dtype,
                       parameters=m.parameters, max_seq_len=state.limits[m.name].max_seq_len)
             for m in (state.served or {}).values()]
    return ModelsResponse(models=infos, max_seq_len=state.settings.max_seq_len,
                          max_sequences=state.settings.max_sequences)


@router.get("/metrics", response_class=Response, summary="Prometheus metrics (text exposition format)",
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text format 0.0.4"}, **_errors(*_AUTH)})
async def metrics(request: Request) -> Response:
    return Response(request.app.state.refmodel.metrics.render(), media_type=METRICS_CONTENT_TYPE)


def _json_doc(schema: type[BaseModel]) -> dict:
    """The OpenAPI request body of a JSON route that decodes its body itself (off the loop)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema.model_json_schema()}}}}


@router.post("/v1/logprobs", response_model=LogprobsResponse, responses=_errors(*_SCORING),
             openapi_extra=_json_doc(LogprobsRequest))
async def logprobs(request: Request) -> Response:
    """Per-token log-probs (nats, float32) of JSON rows; the binary form is faster for large batches."""
    state = request.app.state.refmodel

    def check(req: LogprobsRequest):
        model = _lookup(request, req.model, "logprobs")
        return model, check_sequences(req.input_ids, state.limits[req.model], req.attention_mask, req.score_mask,
                                      req.score_start, temperature=req.temperature)

    req, (model, seqs) = await _json_body(request, LogprobsRequest, check)
    try:
        rows = await _submit(request, state.batchers[req.model], seqs)
    except _ClientGone:
        return Response(status_code=499)  # nginx's "client closed request": counted, never sent
    _finite(rows, req.temperature)
    body = {"model": req.model, "fingerprint": model.fingerprint_at(req.temperature),
            "logprobs": [r.tolist() for r in rows]}
    # json.dumps of the float lists directly: pydantic validation of [B][T] floats would cost more than the model
    content = await _off_loop(4 * sum(len(r) for r in rows), _encode_json, body)
    return Response(content, media_type="application/json")


_BINARY_DOC = {
    "requestBody": {"required": True, "content": {wire.CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}},
                    "description": "RMB1 header, model name, int32 ids [B, T], optional uint8 masks "
                                   "(see refmodel.remote.wire)"},
}


@router.post("/v1/logprobs:binary", openapi_extra=_BINARY_DOC, response_class=Response,
             responses={200: {"content": {wire.CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}},
                              "description": "RMR1 header, fingerprint, float32 log-probs [B, T]"},
                        **_errors(*_SCORING)})
async def logprobs_binary(request: Request) -> Response:
    """The throughput form of ``/v1/logprobs``: raw little-endian arrays in and out (no JSON)."""
    state = request.app.state.refmodel
    body = await _body(request)

    def check(body: bytes | bytearray):
        decoded = wire.decode_request(body)
        model = _lookup(request, decoded.model, "logprobs")
        return decoded, model, check_block(decoded.input_ids, state.limits[decoded.model], decoded.attention_mask,
                                           decoded.score_mask, temperature=decoded.temperature)

    decoded, model, seqs = await _off_loop(len(body), check, body)
    try:
        rows = await _submit(request, state.batchers[decoded.model], seqs)
    except _ClientGone:
        return Response(status_code=499)
    out = np.stack(rows) if rows else np.zeros(decoded.input_ids.shape, np.float32)
    _finite((out,), decoded.temperature)
    fp = model.fingerprint_at(decoded.temperature)
    return Response(wire.encode_response(fp, out), media_type=wire.CONTENT_TYPE)  # the fingerprint is in the body


@router.post("/v1/rewards", response_model=RewardsResponse, responses=_errors(*_SCORING),
             openapi_extra=_json_doc(RewardsRequest))
async def rewards(request: Request) -> Response:
    """Reward-model scores, read at each row's last real token."""
    state = request.app.state.refmodel

    def check(req: RewardsRequest):
        return _lookup(request, req.model, "rewards"), check_sequences(req.input_ids, state.limits[req.model],
                                                                       req.attention_mask)

    req, (model, seqs) = await _json_body(request, RewardsRequest, check)
    try:
        scores = await _submit(request, state.batchers[req.model], seqs)
    except _ClientGone:
        return Response(status_code=499)
    if not all(math.isfinite(x) for x in scores):
        raise FloatingPointError("the reward model produced a non-finite score")
    body = {"model": req.model, "fingerprint": model.fingerprint, "scores": [float(x) for x in scores]}
    return Response(_encode_json(body), media_type="application/json")


# What the guard calls directly once its checks pass (see refmodel.serve.guard): the BODY_ROUTES, and the
# liveness probe (the open path a client can ask most often: 16 pipelined at a time per connection)
DIRECT_ENDPOINTS = {("POST", "/v1/logprobs"): logprobs, ("POST", "/v1/logprobs:binary"): logprobs_binary,
                    ("POST", "/v1/rewards"): rewards, ("GET", "/healthz"): healthz}


def body_checks(max_sequences: int) -> dict:
    """What the guard feeds each chunk of a JSON route's body as it arrives: the row bound of
    :func:`refmodel.serve.validate.decode_json_rows` (:class:`~refmodel.serve.validate.JsonRowBound`)."""

    def row_bound():
        return JsonRowBound(max_sequences).feed
    return {("POST", "/v1/logprobs"): row_bound, ("POST", "/v1/rewards"): row_bound}


__all__ = ["DIRECT_ENDPOINTS", "body_checks", "router"]
