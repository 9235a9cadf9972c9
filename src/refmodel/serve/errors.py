"""Error answers of the service: one JSON shape ``{"detail": ..., "field": ...}`` for every status.

Which exception gets which status is the table shared with the client, :mod:`refmodel.remote.errors`.

Status codes: missing or wrong bearer token 401; unknown model 404; body timeout 408; body over
``max_body_bytes`` 413; malformed batch 422 (``field`` names the part); queue full 429 with
``Retry-After``; too many or too large header fields 431; shutting down 503. Bad input never produces a 500; a 500
means a bug and its traceback goes to the server log, never to the client.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import RefModelError
from ..remote.errors import ERROR_TABLE, status_for
from .schemas import ErrorResponse

log = logging.getLogger(__name__)

# For the OpenAPI schema: what each error status means on this service (the shared table's own words).
ERROR_STATUSES = {row.status: row.meaning for row in ERROR_TABLE}


def error_response(status: int, detail: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    """The JSON answer of every error."""
    return JSONResponse({"detail": detail, "field": field}, status_code=status, headers=headers)


def unauthorized() -> JSONResponse:
    return error_response(401, "missing or wrong bearer token; send 'Authorization: Bearer <token>'", None,
                          {"WWW-Authenticate": "Bearer"})


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    """pydantic's list of problems as one message naming the first field (FastAPI's own shape differs)."""
    errors = exc.errors()
    first: dict = dict(errors[0]) if errors else {"loc": ("body",), "msg": "invalid body"}
    if first.get("type") == "json_invalid":
        return error_response(422, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                              "body")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if not loc:
        return error_response(422, f"the body must be a JSON object (send Content-Type: application/json): "
                                   f"{first.get('msg')}", "body")
    where = loc[0] + "".join(f"[{p}]" for p in loc[1:])
    return error_response(422, f"{where}: {first.get('msg')} ({len(errors)} problem(s) in the body)", loc[0])


def error_answer(request: Request, exc: Exception) -> JSONResponse:
    """The answer to an exception raised while handling ``request``: pydantic's validation errors as 422,
    refmodel errors by the shared table (429 with ``Retry-After``), anything unexpected as a logged 500.

    The one mapping: FastAPI's exception handlers (:func:`install_error_handlers`) and the guard's direct
    dispatch of the scoring routes (:class:`refmodel.serve.guard.Guard`) both answer through it.
    """
    if isinstance(exc, RequestValidationError):
        return _validation_response(exc)
    if isinstance(exc, HTTPException):
        # FastAPI's own: 400 for a body it cannot decode (not UTF-8), 404/405 for unknown routes/methods.
        if exc.status_code == 400:
            return error_response(422, f"the body is not valid JSON: {exc.detail} (send UTF-8 JSON)", "body")
        return error_response(exc.status_code, str(exc.detail), None, getattr(exc, "headers", None))
    if isinstance(exc, RefModelError):
        status = status_for(exc)
        headers = None
        if status == 429:
            batcher = request.app.state.refmodel.batchers.get(getattr(exc, "model", None))
            if batcher is None:
                batcher = next(iter(request.app.state.refmodel.batchers.values()), None)
            headers = {"Retry-After": str(batcher.retry_after_s() if batcher else 1)}
        elif status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        if status == 500:
            log.error("unexpected %s on %s: %s", type(exc).__name__, request.url.path, exc)
        return error_response(status, str(exc), getattr(exc, "field", None), headers)
    log.error("internal error on %s", request.url.path, exc_info=exc)
    return error_response(500, f"internal error ({type(exc).__name__}); see the server log")


def install_error_handlers(app: FastAPI) -> None:
    """Map pydantic's validation errors, refmodel errors and anything unexpected to ``ErrorResponse``
    (:func:`error_answer`)."""

    async def handler(request: Request, exc: Exception) -> JSONResponse:
        return error_answer(request, exc)

    for kind in (RequestValidationError, HTTPException, RefModelError, Exception):
        app.add_exception_handler(kind, handler)


__all__ = ["ERROR_STATUSES", "ErrorResponse", "error_answer", "error_response", "install_error_handlers",
           "unauthorized"]
