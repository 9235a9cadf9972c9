"""The error table of the reference service: refmodel error <-> HTTP status, shared by server and client.

One row per error status the service answers with. The server (:mod:`refmodel.serve.errors`) answers an
exception with :func:`status_for` and documents each status in its OpenAPI schema with the row's
``meaning``; the client (:class:`refmodel.remote.client.ReferenceClient`) turns a status back into an
exception with :func:`error_for`, and retries the rows marked ``retry``. An error that crosses the wire
therefore comes back as the class it left as: ``InvalidBatch`` -> 422 -> ``InvalidBatch``.

Every error body is JSON ``{"detail": message, "field": offending part or null}``
(:class:`refmodel.serve.schemas.ErrorResponse`); a status not in the table is a :class:`ServiceError`
on the client (500 means a bug in the server, whose traceback stays in the server's log).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import (
    InvalidBatch,
    InvalidInput,
    ModelNotAllowed,
    RefModelError,
    RequestTooLarge,
    ServiceError,
    ServiceOverloaded,
    Unauthorized,
)


@dataclass(frozen=True)
class ErrorStatus:
    """One row: ``status`` is answered for a ``raised_as`` instance (None: the server's guard answers it
    before any route runs) and raises ``error`` on the client; ``retry``: the client retries it with
    backoff (honouring ``Retry-After``); ``meaning``: the OpenAPI description of the status."""

    status: int
    error: type[RefModelError]
    raised_as: type[Exception] | None
    retry: bool
    meaning: str


ERROR_TABLE: tuple[ErrorStatus, ...] = (
    ErrorStatus(401, Unauthorized, Unauthorized, False,
                "missing or wrong bearer token (send `Authorization: Bearer <token>`)"),
    ErrorStatus(404, ModelNotAllowed, ModelNotAllowed, False, "the model is not served (for this kind of request)"),
    ErrorStatus(408, ServiceError, None, False, "the request body did not arrive within the server's body timeout"),
    ErrorStatus(413, RequestTooLarge, RequestTooLarge, False, "the request body exceeds the server's max_body_bytes"),
    # Any bad input is a 422 (InvalidInput and its subclasses, ConfigError included); the client raises the
    # most specific name for a malformed request, InvalidBatch, which is still an InvalidInput.
    ErrorStatus(422, InvalidBatch, InvalidInput, False, "malformed request; `field` names the offending part"),
    ErrorStatus(429, ServiceOverloaded, ServiceOverloaded, True,
                "the model's queue is full; retry after `Retry-After` seconds"),
    ErrorStatus(431, ServiceError, None, False,
                "too many header fields, or a request head larger than the server's max_header_bytes"),
    ErrorStatus(503, ServiceOverloaded, ServiceOverloaded, True, "the server is shutting down"),
)

BY_STATUS: dict[int, ErrorStatus] = {row.status: row for row in ERROR_TABLE}
RETRY_STATUSES: tuple[int, ...] = tuple(row.status for row in ERROR_TABLE if row.retry)


def status_for(exc: BaseException) -> int:
    """The HTTP status the server answers ``exc`` with: the first row whose ``raised_as`` it is an instance of.

    An error whose class has several rows (``ServiceOverloaded``: 429 queue full, 503 shutting down) picks
    the row of its own ``status`` attribute, else the first. Anything else is 500 (a bug, not bad input).
    """
    rows = [row for row in ERROR_TABLE if row.raised_as is not None and isinstance(exc, row.raised_as)]
    if not rows:
        return 500
    own = getattr(exc, "status", None)
    return next((row.status for row in rows if row.status == own), rows[0].status)


def error_for(status: int, detail: str) -> RefModelError:
    """The exception the client raises for an error answer ``status`` with the server's ``detail``.

    The message names the status; :class:`ServiceError` subclasses also carry it as ``.status``.
    """
    error = BY_STATUS[status].error if status in BY_STATUS else ServiceError
    message = f"reference service answered {status}: {detail}"
    return error(message, status=status) if issubclass(error, ServiceError) else error(message)


__all__ = ["BY_STATUS", "ERROR_TABLE", "RETRY_STATUSES", "ErrorStatus", "error_for", "status_for"]
