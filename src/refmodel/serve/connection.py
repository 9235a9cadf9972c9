"""uvicorn's httptools protocol with two bounds on the request head: its size and its arrival time.

The ASGI app (and :mod:`refmodel.serve.guard`) sees a request only once its head is complete, so what
happens before that is bounded here, per connection:

- **Size.** httptools hands a header to uvicorn only once its value is complete and buffers a partial
  value of any length meanwhile (one 64 MiB header stalled every client). Here the bytes a connection
  sends while its head is incomplete are counted; past ``max_head_bytes`` it gets a 431 and is closed,
  so the buffer never exceeds the limit by more than one read (<= 256 KiB). The close lingers: what the
  client still sends is read and dropped for up to ``LINGER_S`` so that it reads the 431 instead of a reset.
  Every answer sent before a request's body was read (the guard's 401, 413, 408, 431) closes the same way.
- **Time.** uvicorn bounds an idle keep-alive connection (``timeout_keep_alive``) but not a connection
  that has just opened, nor one that trickles its head a byte at a time (slowloris). Here a head must be
  complete within ``header_timeout_s`` of the connection opening, or of the first byte of its next
  request; otherwise the connection is closed.

httptools (a C parser, llhttp) rather than h11 (pure Python) because the parser was most of a small
request's server time: with one 32-token sequence per request, h11 cost ~1 ms more server CPU per
request (``benchmarks/bench_service.py``; figures in docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

LINGER_S = 2.0  # how long a refused connection's remaining input is read and dropped before closing


def _head_too_large(limit: int) -> bytes:
    """The whole 431 answer (the service's error shape) for a head that grew past ``limit`` unfinished."""
    body = json.dumps({"detail": f"the request head exceeds this server's limit of {limit} bytes; send fewer "
                                 "or shorter headers", "field": "headers"}).encode()
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


class _ClosesLingering:
    """A request's view of the connection's transport: ``close()`` lingers while the request's body is
    still arriving (the guard answered 401/413/408 before reading it), and closes at once otherwise."""

    def __init__(self, transport: asyncio.Transport, protocol, cycle) -> None:
        self._transport, self._protocol, self._cycle = transport, protocol, cycle

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def close(self) -> None:
        if self._cycle.more_body:
            self._protocol.close_lingering()
        else:
            self._transport.close()


def guarded_protocol(header_timeout_s: float, max_head_bytes: int) -> type[asyncio.Protocol]:
    """An ``HttpToolsProtocol`` subclass for ``uvicorn.Config(http=...)`` with the head bounds built in."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _in_head = True  # no complete head since the connection opened or the last request ended
        _head_started = False  # the parser has seen the first byte of that head
        _head_bytes = 0
        _draining = False  # answered and closing: input is read and dropped until the client stops

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._draining:
                return  # the rest of a refused request: dropped unparsed (nothing is buffered)
            if self._in_head:
                self._head_bytes += len(data)  # may include a body that follows: only checked if still in head
            super().data_received(data)
            if not (self._in_head and self._head_started) or self.transport.is_closing():
                return  # between requests an idle connection is uvicorn's keep-alive timeout's
            if self._head_bytes > max_head_bytes:
                log.debug("refusing a request head that passed %d bytes unfinished", max_head_bytes)
                self._refuse()
            else:
                self._arm()  # a partial head: the deadline runs from its first byte

        def on_message_begin(self) -> None:
            self._head_started = True
            super().on_message_begin()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head, self._head_started, self._head_bytes = True, False, 0  # the next request's head

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _refuse(self) -> None:
            """Answer 431 (the head is still arriving) and close lingering."""
            self._disarm()
            self.transport.write(_head_too_large(max_head_bytes))
            self.close_lingering()

        def close_lingering(self) -> None:
            """Close without resetting a client that is still sending: our FIN after the answer, then what
            the client still sends is read and dropped for up to ``LINGER_S``. Closing at once would leave
            unread input in the socket, and the kernel answers that with a reset, which discards the answer
            on the client's side before it reads it (a client sends its whole body before reading)."""
            if self._draining or self.transport.is_closing():
                return
            self._draining = True
            self.transport.resume_reading()  # uvicorn pauses reading while a body waits for the app
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)

        def on_headers_complete(self) -> None:
            self._in_head, self._head_bytes = False, 0
            self._disarm()
            super().on_headers_complete()
            if self.cycle is not None:  # the request's response cycle closes through close_lingering
                self.cycle.transport = _ClosesLingering(self.transport, self, self.cycle)  # type: ignore[assignment]

        def eof_received(self) -> None:
            if self._draining:
                self.transport.close()  # the client has finished sending: nothing left to reset
            else:
                super().eof_received()

        def _arm(self) -> None:
            if self._head_timer is None and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expire(self) -> None:
            self._head_timer = None
            if self._in_head and not self.transport.is_closing():
                log.debug("closing a connection that sent no complete request head within %g s", header_timeout_s)
                self.transport.close()

    return GuardedHttpToolsProtocol


__all__ = ["guarded_protocol"]
