"""The ASGI guard in front of the app: what is checked before any route reads the body.

Per request, in this order, so an unauthenticated or malformed request costs the server almost
nothing: too many header fields, or more than ``max_header_bytes`` of them (request line included) -> 431;
bearer token (for every path but the open ones) -> 401; a body sent to anything but the three scoring
routes (``BODY_ROUTES``; the open paths included) -> 413 unread, so every other request is bounded by the
head's limits and deadline alone; declared ``Content-Length`` over ``max_body_bytes`` -> 413; then the
body is read here, counted
(chunked bodies too) and bounded in time (``body_timeout_s`` -> 408), and replayed to the app. A
rejection before the body is read closes the connection (``Connection: close``), so the unread body
is never received into memory. Every request is timed for ``/metrics``.

The scoring routes (``BODY_ROUTES``) and ``/healthz`` are then called here directly (``endpoints``), their
errors answered by :func:`refmodel.serve.errors.error_answer`: FastAPI's router, dependency resolution and
exception middleware cost more event-loop time per request than the route itself (a third of the loop's
time at one 32-token sequence per request, ``benchmarks/bench_service.py``), and these routes use none of
them. The routes stay registered with FastAPI for the OpenAPI schema, which documents them as they behave.

The request head itself (its size, and how long it may take to arrive) is bounded one layer lower, in
:mod:`refmodel.serve.connection`, because the ASGI app sees a request only once its head is complete.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable, Mapping

from starlette.requests import Request
from starlette.responses import Response

from ..errors import RefModelError
from .errors import error_answer, error_response, unauthorized
from .metrics import Metrics

ENDPOINTS = frozenset({"/v1/logprobs", "/v1/logprobs:binary", "/v1/rewards", "/v1/models", "/healthz",
                       "/metrics", "/openapi.json"})
OPEN_PATHS = frozenset({"/healthz", "/openapi.json"})  # answered without a token
BODY_ROUTES = frozenset({("POST", "/v1/logprobs"), ("POST", "/v1/logprobs:binary"), ("POST", "/v1/rewards")})
_CLOSE = {"Connection": "close"}
Endpoint = Callable[[Request], Awaitable[Response]]
BodyCheck = Callable[[bytes], None]  # fed each chunk of a body as it arrives; raises a RefModelError to refuse it


class Guard:
    """ASGI middleware: header count, auth and body limits before the app; request metrics; the scoring
    routes called directly (``endpoints``: ``{(method, path): async route(request) -> Response}``)."""

    def __init__(self, app, *, metrics: Metrics, token: str | None, max_body_bytes: int, max_headers: int,
                 max_header_bytes: int, body_timeout_s: float, endpoints: Mapping[tuple[str, str], Endpoint] | None = None,
                 body_checks: Mapping[tuple[str, str], Callable[[], BodyCheck]] | None = None):
        self.app, self.metrics, self.endpoints = app, metrics, dict(endpoints or {})
        self.body_checks = dict(body_checks or {})
        self.token = None if token is None else token.encode()
        self.max_body_bytes, self.max_headers, self.body_timeout_s = max_body_bytes, max_headers, body_timeout_s
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]
        path = scope["path"] if scope["path"] in ENDPOINTS else "other"

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            rejection, receive = await self._check(scope, receive)
            if rejection is not None:
                return await rejection(scope, receive, send_status)
            endpoint = self.endpoints.get((scope["method"], scope["path"]))
            if endpoint is None:
                return await self.app(scope, receive, send_status)
            request = Request(scope, receive)
            try:
                response = await endpoint(request)
            except Exception as exc:
                response = error_answer(request, exc)
            await response(scope, receive, send_status)
        finally:
            self.metrics.request_done(path, status[0], time.perf_counter() - start)

    def _authorized(self, headers: list) -> bool:
        for name, value in headers:
            if name == b"authorization":
                scheme, _, given = value.partition(b" ")
                # constant-time: the comparison time says nothing about how much of the token matched
                return scheme.lower() == b"bearer" and hmac.compare_digest(given, self.token)
        return False

    async def _check(self, scope, receive):
        """``(rejection or None, receive)``: the receive that replays a body read (and bounded) here."""
        headers = scope["headers"]
        if len(headers) > self.max_headers:
            return error_response(431, f"the request has {len(headers)} header fields; this server accepts at "
                                       f"most {self.max_headers}", "headers", _CLOSE), receive
        # the connection layer bounds an *incomplete* head; a head that arrived whole is measured here,
        # its request line ("METHOD target HTTP/1.1\r\n") included
        target = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + 1
        size = len(scope["method"]) + target + 11 + sum(len(name) + len(value) + 4 for name, value in headers)
        if size > self.max_header_bytes:
            return error_response(431, f"the request headers are {size} bytes; this server accepts at most "
                                       f"{self.max_header_bytes}", "headers", _CLOSE), receive
        if self.token is not None and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            response = unauthorized()
            response.headers.update(_CLOSE)
            return response, receive
        limit = self.max_body_bytes
        has_body = False
        declared = None
        for name, value in headers:
            if name == b"content-length":
                if value != b"0":
                    has_body = True
                if not value.isdigit() or int(value) > limit:
                    limit = -1
                else:
                    declared = int(value)
            elif name == b"transfer-encoding":
                has_body = True
        if (scope["method"], scope["path"]) not in BODY_ROUTES:
            if has_body:  # refused unread: nothing but a scoring route reads a body, or waits for one
                return error_response(413, f"{scope['method']} {scope['path']} takes no request body; send it "
                                           "without one", "body", _CLOSE), receive
            return None, receive
        if limit < 0:
            return _too_large(self.max_body_bytes), receive
        check = self.body_checks.get((scope["method"], scope["path"]))
        body = await self._read_body(receive, limit, declared, check() if check is not None else None)
        if isinstance(body, Exception):  # refused by the route's body check, the rest of the body unread
            response = error_answer(Request(scope, receive), body)
            response.headers.update(_CLOSE)
            return response, receive
        if isinstance(body, (bytes, bytearray)):
            return None, _replay(body, receive)
        return body, receive

    async def _read_body(self, receive, limit: int, declared: int | None = None, check: BodyCheck | None = None):
        """The whole body, or the error answer (413 over ``limit``, 408 past ``body_timeout_s``).

        One timer for the whole body rather than one per chunk: a client trickling a byte a second
        must not hold the request (and its buffer) open indefinitely. A body in several chunks goes into
        one buffer of its ``declared`` Content-Length (a growing buffer is copied on each realloc: ~30
        copies of up to 16 MiB on the event loop per large body, measured as the loop's largest cost
        under bench_service_abuse); a chunked body's buffer grows. ``check`` sees each chunk first: the
        error it raises is returned, and the rest of the body is never read.
        """
        task = asyncio.current_task()
        assert task is not None  # an ASGI app always runs in a task
        fired = []

        def expire():
            fired.append(True)
            task.cancel()

        timer = asyncio.get_running_loop().call_later(self.body_timeout_s, expire)
        body: bytes | bytearray = b""
        size = 0
        try:
            while True:
                message = await receive()
                if message["type"] != "http.request":  # the client went away
                    return error_response(400, "the client disconnected before sending the whole body", "body")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    return _too_large(limit)
                if check is not None:
                    try:
                        check(chunk)
                    except RefModelError as exc:
                        return exc
                if not body:
                    body = chunk
                elif declared is not None:  # size <= declared: the parser holds the body to its Content-Length
                    if not isinstance(body, bytearray):
                        first, body = body, bytearray(declared)
                        body[:len(first)] = first
                    body[size - len(chunk):size] = chunk
                else:  # chunked: one growing buffer, not a list joined at the end
                    if not isinstance(body, bytearray):
                        body = bytearray(body)
                    body += chunk
                if not message.get("more_body", False):
                    return body if declared is None or size == declared else body[:size]
        except asyncio.CancelledError:
            if not fired:
                raise
            if hasattr(task, "uncancel"):  # Python >= 3.11: this cancellation is handled here
                task.uncancel()
            return error_response(408, f"the request body did not arrive within {self.body_timeout_s:g} s "
                                       f"({size} bytes received)", "body", _CLOSE)
        finally:
            timer.cancel()


def _too_large(limit: int):
    return error_response(413, f"the request body exceeds this server's limit of {limit} bytes; split the batch",
                          "body", _CLOSE)


def _replay(body: bytes | bytearray, receive):
    """The app's ``receive``: the body read by the guard, then the server's own (for disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


__all__ = ["BODY_ROUTES", "ENDPOINTS", "OPEN_PATHS", "Guard"]
