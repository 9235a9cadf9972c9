"""uvicorn's h11 protocol with a deadline on the request head: slow and idle connections are closed.

uvicorn bounds an idle keep-alive connection (``timeout_keep_alive``) but not a connection that has
just opened, nor one that trickles its head a byte at a time (slowloris: each byte restarts nothing,
but the head never completes). Here a connection must deliver a complete request head within
``header_timeout_s`` of opening, or of the first byte of its next request; otherwise it is closed.
The head's size is bounded by h11 itself (``h11_max_incomplete_event_size``: 400 above it, the
buffer never grows past the limit). h11 rather than httptools because httptools buffers a header of
any size before the app could see it.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


def guarded_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """An ``H11Protocol`` subclass for ``uvicorn.Config(http=...)`` with the head deadline built in."""

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # a partial head: the deadline runs from its first byte
                self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._head_timer is None and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expire(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.debug("closing a connection that sent no complete request head within %g s", header_timeout_s)
                self.transport.close()

    return GuardedH11Protocol


__all__ = ["guarded_protocol"]
