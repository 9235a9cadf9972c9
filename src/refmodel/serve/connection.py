"""uvicorn's httptools protocol with the connection-level bounds the service needs, on a pinned uvicorn.

The ASGI app (and :mod:`refmodel.serve.guard`) sees a request only once its head is complete, and the
app never sees the bytes between requests, so what happens there is bounded here, per connection. Why a
shim over uvicorn rather than another server: ``docs/design/service-client-and-hardening.md`` (uvicorn
0.55, hypercorn and granian measured against the same probes; none held them all). The shim hooks ``HttpToolsProtocol`` and its
``RequestResponseCycle`` (uvicorn's private classes): ``pyproject.toml`` pins uvicorn to the minor
version it is written and tested for (``tests/serve/test_service_abuse.py`` holds every probe).

- **Head size.** httptools buffers a partial header value of any length; here the bytes a connection
  sends while its head is incomplete are counted and past ``max_head_bytes`` it gets a 431 and is closed
  (lingering, see below). A head that arrives whole in one read is measured by the guard, request line
  included.
- **Head time.** A head must be complete within ``header_timeout_s`` of the connection opening or of the
  first byte after the previous request (a stray ``\\r\\n`` counts: bytes that do not complete a head do
  not keep a connection open). uvicorn's keep-alive timer bounds the idle time between requests.
- **One request at a time.** While a complete request waits for its answer, the next request's bytes are
  held unparsed (at most ``HOLD_BYTES`` plus one read; reading pauses beyond it) and parsed when the answer
  is out. Requests that arrive together in one read are queued up to ``MAX_PIPELINED``; past that the
  parser stops (uvicorn logs one "Invalid HTTP request received." warning), the rest of the read is
  dropped and the connection closes after the queued answers (a client that
  pipelines must retry what was not answered, RFC 9112 section 9.3.2). A client that never reads its
  answers therefore holds at most one read of input and the transport's write buffer, and is closed
  when its answer has waited ``send_timeout_s`` for it to read.
- **Half-close.** A client that shuts down its sending side after its request (``shutdown(SHUT_WR)``)
  still gets its answer; the connection closes after it. A client that closed entirely is told apart by
  a probe: an interim ``100 Continue`` (which every HTTP/1.1 client must accept, RFC 9110 section 15.2)
  that a closed socket answers with a reset; the request is then marked disconnected, and the route drops
  it from the batcher's queue.
- **Lingering close.** Every answer sent before a request's body was read (the guard's 401, 413, 408,
  431) closes without resetting a client that is still sending: our FIN after the answer, then what the
  client still sends is read and dropped, for up to ``LINGER_S`` and up to ``max_drain_bytes`` (the
  service's body limit: a refused request costs no more reading than an accepted one could), so that it
  reads the answer. Past that, reading stops: a ``Content-Length: 10**12`` streamed at loopback speed was
  gigabytes of reading per connection. The client's writes then stall until the close at ``LINGER_S``,
  whose reset (the input left unread) fails its next write but not the answer and FIN sent before it: a
  client that reads its socket after a failed write finds the answer there (httpx/httpcore and urllib3
  do; a client on asyncio streams or anyio reports the write error instead).

httptools (a C parser, llhttp) rather than h11 (pure Python) because the parser was most of a small
request's server time: with one 32-token sequence per request, h11 cost ~1 ms more server CPU per
request (``benchmarks/bench_service.py``; figures in docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

LINGER_S = 2.0  # how long a refused connection's remaining input is read and dropped before closing
HOLD_BYTES = 65536  # unparsed input held while a request waits for its answer; reading pauses beyond it
MAX_PIPELINED = 16  # requests queued behind the one being answered, from the same read
PROBE_S = (0.05, 0.5, 2.0)  # after a half-close: when to look for the reset of a client that closed entirely
_TCP_CLOSE = 7  # tcpi_state of a socket the peer has reset (linux/tcp_states.h)


def _head_too_large(limit: int) -> bytes:
    """The whole 431 answer (the service's error shape) for a head that grew past ``limit`` unfinished."""
    body = json.dumps({"detail": f"the request head exceeds this server's limit of {limit} bytes; send fewer "
                                 "or shorter headers", "field": "headers"}).encode()
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


class _Overflow(Exception):
    """Raised in a parser callback to stop parsing a read past ``MAX_PIPELINED`` requests."""


def _peer_reset(transport: asyncio.Transport) -> bool:
    """Whether the peer has reset the connection (Linux ``TCP_INFO``; False where it cannot be told)."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return False
    try:
        return struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0] == _TCP_CLOSE
    except OSError:
        return True


class _DrainInput(asyncio.BufferedProtocol):
    """The protocol of a connection closing lingering: its input is read into one scratch buffer and
    dropped (one copy out of the kernel and no allocation per read, where a plain protocol gets a new bytes
    object per read: refused bodies were most of the server's work under abuse), up to ``budget`` bytes;
    the end of the connection goes to the HTTP protocol, whose state it is."""

    def __init__(self, owner, transport: asyncio.Transport, scratch: memoryview, budget: int) -> None:
        self._owner, self._transport, self._scratch, self._left = owner, transport, scratch, budget

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        self._left -= nbytes
        if self._left < 0:  # past the budget: reading stops, and the linger timer closes
            self._transport.pause_reading()

    def eof_received(self):
        return self._owner.eof_received()

    def connection_lost(self, exc) -> None:
        self._owner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._owner.pause_writing()

    def resume_writing(self) -> None:
        self._owner.resume_writing()


class _ClosesLingering:
    """A request's view of the connection's transport: ``close()`` lingers while the request's body is
    still arriving (the guard answered 401/413/408 before reading it), and closes at once otherwise; an
    answer's head goes out with its body's first write (uvicorn writes them apart: two ``send`` calls and
    two wake-ups of the client per answer, where one does)."""

    def __init__(self, transport: asyncio.Transport, protocol, cycle) -> None:
        self._transport, self._protocol, self._cycle = transport, protocol, cycle
        self._head: bytes | None = None  # the answer's head, held for its body
        self._head_seen = False

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.writelines((head, data))
        elif self._cycle.response_started and not self._head_seen:  # not an interim 100 Continue
            self._head_seen = True
            self._head = data
        else:
            self._transport.write(data)

    def _flush(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.write(head)

    def close(self) -> None:
        self._flush()
        if self._cycle.more_body:
            self._protocol.close_lingering()
        else:
            self._transport.close()


def guarded_protocol(header_timeout_s: float, max_head_bytes: int, send_timeout_s: float = 30.0,
                     max_drain_bytes: int = 16 * 2**20) -> type[asyncio.Protocol]:
    """An ``HttpToolsProtocol`` subclass for ``uvicorn.Config(http=...)`` with the connection bounds built in.

    ``header_timeout_s``/``max_head_bytes``: the request head's deadline and size; ``send_timeout_s``: how
    long an answer waits for a client that reads nothing; ``max_drain_bytes``: how much of a refused
    request's remaining input a lingering close reads and drops (the body limit).
    """
    scratch = memoryview(bytearray(2**18))  # where lingering connections' input is read and dropped (one loop)

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _send_timer: asyncio.TimerHandle | None = None
        _in_head = True  # no complete head since the connection opened or the last request ended
        _head_bytes = 0
        _draining = False  # answered and closing: input is read and dropped by _DrainInput
        _held: bytes | None = None  # input after a request that waits for its answer, not parsed yet
        _overflow = False  # more than MAX_PIPELINED requests in one read: the rest is dropped
        _eof = False  # the client has shut down its sending side

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def _answer_pending(self) -> bool:
            """A complete request (body included) is waiting for its answer, or queued behind one."""
            cycle = self.cycle
            return bool(self.pipeline) or (cycle is not None and not cycle.response_complete
                                           and not cycle.more_body)

        def data_received(self, data: bytes) -> None:
            if self._draining or self._overflow:
                return  # the rest of a read that refused its request, or of an over-long pipeline: dropped
            if self._held is not None or self._answer_pending():
                # the next request: parsed once this answer is out, so one client has one request in work
                self._held = data if self._held is None else self._held + data
                if len(self._held) > HOLD_BYTES:
                    self.flow.pause_reading()
                return
            if self._in_head:
                self._head_bytes += len(data)  # may include a body that follows: only checked if still in head
            super().data_received(data)
            if not self._in_head or self.transport.is_closing() or self._draining:
                return
            if self._head_bytes > max_head_bytes:
                log.debug("refusing a request head that passed %d bytes unfinished", max_head_bytes)
                self._refuse()
            elif not self._answer_pending():
                self._arm()  # bytes of a next head (or stray CRLFs): the deadline runs from the first

        def send_400_response(self, msg: str) -> None:
            if not self._overflow:  # an overflow stopped the parser: the queued answers go out, then close
                super().send_400_response(msg)

        def on_message_begin(self) -> None:
            if self._overflow:
                return
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            if not self._overflow:
                super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            if not self._overflow:
                super().on_header(name, value)

        def on_headers_complete(self) -> None:
            if self._overflow:
                return
            if len(self.pipeline) >= MAX_PIPELINED:
                log.debug("dropping pipelined requests past %d; closing after the queued answers", MAX_PIPELINED)
                self._overflow = True
                last = self.pipeline[0][0] if self.pipeline else self.cycle
                last.keep_alive = False  # its answer says Connection: close and closes
                # stop the parser here rather than run callbacks for the rest of the read (thousands of
                # requests); uvicorn answers a parser error with a 400, which send_400_response skips
                raise _Overflow()
            self._in_head, self._head_bytes = False, 0
            self._disarm()
            super().on_headers_complete()
            if self.cycle is not None:  # the request's response cycle closes through close_lingering
                self.cycle.transport = _ClosesLingering(self.transport, self, self.cycle)  # type: ignore[assignment]

        def on_body(self, body: bytes) -> None:
            if not self._overflow:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if self._overflow:
                return
            super().on_message_complete()
            self._in_head, self._head_bytes = True, 0  # the next request's head

        def on_response_complete(self) -> None:
            self._disarm_send()
            super().on_response_complete()
            if self.transport.is_closing():
                return
            if self.pipeline:
                self.flow.pause_reading()  # uvicorn resumes on every answer: not while requests are queued
            elif self._held is not None:
                self.loop.call_soon(self._release_held)
            elif self._eof:
                self.transport.close()  # a half-closed client has had its answers

        def _release_held(self) -> None:
            held, self._held = self._held, None
            if held is not None and not self.transport.is_closing():
                self.flow.resume_reading()
                self.data_received(held)
            if self._eof and not self._answer_pending() and not self.transport.is_closing():
                self.transport.close()

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._send_timer is None:  # the client stopped reading its answer
                self._send_timer = self.loop.call_later(send_timeout_s, self._send_expired)

        def resume_writing(self) -> None:
            self._disarm_send()
            super().resume_writing()

        def _disarm_send(self) -> None:
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None

        def _send_expired(self) -> None:
            self._send_timer = None
            log.debug("closing a connection whose client read nothing for %g s", send_timeout_s)
            self.transport.abort()

        def connection_lost(self, exc) -> None:
            self._disarm()
            self._disarm_send()
            self._held = None
            super().connection_lost(exc)
            for cycle, _ in self.pipeline:  # queued requests of a lost client are not run
                cycle.disconnected = True
            self.pipeline.clear()

        def eof_received(self):
            if self._draining:
                self.transport.close()  # the client has finished sending: nothing left to reset
                return None
            if not self._answer_pending() and self._held is None:
                return None  # nothing to answer: close
            self._eof = True  # a half-close: answer, then close (see on_response_complete)
            cycle = self.cycle
            if cycle is not None and not cycle.response_started and self.parser.get_http_version() == "1.1":
                # a client that closed entirely answers this interim response with a reset
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                cycle.waiting_for_100_continue = False
                for delay in PROBE_S:
                    self.loop.call_later(delay, self._probe, cycle)
            return True

        def _probe(self, cycle) -> None:
            if cycle.response_complete or cycle.disconnected or not _peer_reset(self.transport):
                return
            log.debug("the client closed before its answer: dropping its request")
            cycle.disconnected = True
            cycle.message_event.set()  # the route's disconnect watch wakes and drops the request
            self.transport.abort()

        def _refuse(self) -> None:
            """Answer 431 (the head is still arriving) and close lingering."""
            self._disarm()
            self.transport.write(_head_too_large(max_head_bytes))
            self.close_lingering()

        def close_lingering(self) -> None:
            """Close without resetting a client that is still sending: our FIN after the answer, then what
            the client still sends is read and dropped (up to ``max_drain_bytes``, for up to ``LINGER_S``).
            Closing at once would leave unread input in the socket, and the kernel answers that with a reset
            at once, dropping whatever of the answer it had not sent yet."""
            if self._draining or self.transport.is_closing():
                return
            self._draining = True
            self._held = None
            self.flow.resume_reading()  # uvicorn pauses reading while a body waits for the app
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.transport.set_protocol(_DrainInput(self, self.transport, scratch, max_drain_bytes))
            self.loop.call_later(LINGER_S, self.transport.close)

        def _arm(self) -> None:
            if self._head_timer is None and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expire(self) -> None:
            self._head_timer = None
            if not self._in_head or self.transport.is_closing():
                return
            if self._answer_pending():
                self._arm()  # the head in progress is the next request's: it is read after this answer
                return
            log.debug("closing a connection that sent no complete request head within %g s", header_timeout_s)
            self.transport.close()

    return GuardedHttpToolsProtocol


__all__ = ["HOLD_BYTES", "LINGER_S", "MAX_PIPELINED", "guarded_protocol"]
