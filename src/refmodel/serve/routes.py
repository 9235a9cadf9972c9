"""The routes of ``refmodel serve``: JSON log-probs and rewards, the binary log-probs form, models,
health and metrics. Auth and body limits are already enforced by :mod:`refmodel.serve.guard`; every
error raised here is answered by :mod:`refmodel.serve.errors` (the same for every route).
"""

from __future__ import annotations

import json

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

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
from .validate import check_block, check_sequences

router = APIRouter()


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


@router.get("/healthz", summary="Liveness and queue depth (no token needed)", responses=_errors(431))
async def healthz(request: Request) -> dict:
    state = request.app.state.refmodel
    return {"status": "ok", "models": sorted(state.served or {}),
            "queue_depth": sum(b.depth for b in state.batchers.values())}


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


@router.post("/v1/logprobs", response_model=LogprobsResponse, responses=_errors(*_SCORING))
async def logprobs(req: LogprobsRequest, request: Request) -> Response:
    """Per-token log-probs (nats, float32) of JSON rows; the binary form is faster for large batches."""
    state = request.app.state.refmodel
    model = _lookup(request, req.model, "logprobs")
    seqs = check_sequences(req.input_ids, state.limits[req.model], req.attention_mask, req.score_mask,
                           req.score_start, temperature=req.temperature)
    rows = await state.batchers[req.model].submit(seqs, [s.ids.numel() for s in seqs])
    body = {"model": req.model, "fingerprint": model.fingerprint_at(req.temperature),
            "logprobs": [r.tolist() for r in rows]}
    # json.dumps of the float lists directly: pydantic validation of [B][T] floats would cost more than the model
    return Response(json.dumps(body), media_type="application/json")


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
    decoded = wire.decode_request(await request.body())
    model = _lookup(request, decoded.model, "logprobs")
    seqs = check_block(decoded.input_ids, state.limits[decoded.model], decoded.attention_mask, decoded.score_mask,
                       temperature=decoded.temperature)
    rows = await state.batchers[decoded.model].submit(seqs, [s.ids.numel() for s in seqs])
    out = np.stack(rows) if rows else np.zeros(decoded.input_ids.shape, np.float32)
    fp = model.fingerprint_at(decoded.temperature)
    return Response(wire.encode_response(fp, out), media_type=wire.CONTENT_TYPE)  # the fingerprint is in the body


@router.post("/v1/rewards", responses=_errors(*_SCORING))
async def rewards(req: RewardsRequest, request: Request) -> RewardsResponse:
    """Reward-model scores, read at each row's last real token."""
    state = request.app.state.refmodel
    model = _lookup(request, req.model, "rewards")
    seqs = check_sequences(req.input_ids, state.limits[req.model], req.attention_mask)
    scores = await state.batchers[req.model].submit(seqs, [s.ids.numel() for s in seqs])
    return RewardsResponse(model=req.model, fingerprint=model.fingerprint, scores=scores)


__all__ = ["router"]
