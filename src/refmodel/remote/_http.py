"""A small thread-safe keep-alive HTTP/1.1 transport for the sync client (stdlib only).

Why not httpx here: on loopback a sync httpx request cost ~0.45 ms more than a bare socket exchange
(its header handling, and head and body leave in two ``send`` calls), a tenth of a few-millisecond
batch. ``http.client`` also sends twice, and its ``HTTPResponse`` spends ~35 us per answer in a file
object and an email header parser. Here the request leaves in one write and :func:`read_reply`
parses the answer. The async client keeps httpx.

Connections are pooled (one per concurrent caller). A pooled connection the server has closed in
the meantime (uvicorn drops idle keep-alive connections after 5 s) is replaced and the request
resent once; every endpoint of the service is a pure computation, so resending is safe.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import ssl
import threading
import urllib.parse
from dataclasses import dataclass

from ..errors import ConfigError

# What a dropped connection raises: reset/refused/broken pipe (OSError subclasses) and a server
# that closed without answering (RemoteDisconnected is a ConnectionResetError).
TRANSPORT_ERRORS: tuple[type[Exception], ...] = (OSError, http.client.HTTPException)


@dataclass
class Reply:
    """A fully read answer; the subset of ``httpx.Response`` the client uses."""

    status_code: int
    headers: dict[str, str]  # lower-case names
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.content)


class SyncTransport:
    """Send requests to ``base_url`` over pooled keep-alive connections (safe to share across threads)."""

    def __init__(self, base_url: str, *, timeout_s: float, connect_timeout_s: float, headers: dict[str, str]):
        parts = urllib.parse.urlsplit(base_url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
            raise ConfigError(f"the reference service URL must be http(s)://host[:port], got {base_url!r}")
        for name, value in headers.items():
            if any(c in f"{name}{value}" for c in "\r\n\0"):
                raise ConfigError(f"header {name!r} holds a line break or NUL (a token with a newline?)")
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        self._host = parts.hostname
        self._port = port or (443 if self._tls else 80)
        self._prefix = parts.path.rstrip("/")
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        host = f"[{self._host}]" if ":" in self._host else self._host  # IPv6 literals keep their brackets
        host_header = f"{host}:{port}" if port else host  # never the URL's user:password@
        self._head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": host_header, **headers}.items())
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str | None = None) -> Reply:
        """One request; raises ``TimeoutError`` or another of ``TRANSPORT_ERRORS`` when the transport fails."""
        head = f"{method} {self._prefix}{path} HTTP/1.1\r\n{self._head}"
        if content_type is not None:
            head += f"Content-Type: {content_type}\r\n"
        body = body or b""
        if body or method in ("POST", "PUT", "PATCH"):
            head += f"Content-Length: {len(body)}\r\n"
        # One write for head and body: the server wakes once, and no Nagle/delayed-ACK stall.
        message = head.encode("latin-1") + b"\r\n" + body
        sock, reused = self._checkout()
        try:
            try:
                return self._exchange(sock, method, message)
            except TimeoutError:
                raise
            except TRANSPORT_ERRORS:
                if not reused:
                    raise
                sock.close()  # the server dropped an idle connection: one fresh attempt
                sock = self._connect()
                return self._exchange(sock, method, message)
        except BaseException:
            sock.close()
            raise

    def _exchange(self, sock: socket.socket, method: str, message: bytes) -> Reply:
        sock.sendall(message)
        reply, keep_alive = read_reply(sock, method)
        if not keep_alive:
            sock.close()
        else:
            with self._lock:
                self._idle.append(sock)
        return reply

    def _checkout(self) -> tuple[socket.socket, bool]:
        while True:
            with self._lock:
                sock = self._idle.pop() if self._idle else None
            if sock is None:
                return self._connect(), False
            if not _closed_by_peer(sock):
                return sock, True
            sock.close()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self._host, self._port), timeout=self.connect_timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self._host)
            sock.settimeout(self.timeout_s)
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()


_MAX_HEAD_BYTES = 64 * 1024


class _Incoming:
    """The bytes of one answer, received as they are needed."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, bytearray()

    def _receive(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise http.client.RemoteDisconnected("the server closed the connection before a complete answer")
        self.buf += chunk

    def until(self, mark: bytes) -> bytes:
        while (end := self.buf.find(mark)) < 0:
            if len(self.buf) > _MAX_HEAD_BYTES:
                raise http.client.HTTPException(f"no {mark!r} within {_MAX_HEAD_BYTES} bytes of the answer")
            self._receive()
        out = bytes(self.buf[:end])
        del self.buf[:end + len(mark)]
        return out

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._receive()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def to_end(self) -> bytes:
        while chunk := self.sock.recv(65536):
            self.buf += chunk
        out = bytes(self.buf)
        self.buf.clear()
        return out


def read_reply(sock: socket.socket, method: str) -> tuple[Reply, bool]:
    """Read one HTTP/1.x answer: ``(reply, keep_alive)``.

    Bodies framed by Content-Length, chunked transfer coding, or the end of the connection; 1xx
    interim answers are skipped. This replaces ``http.client.HTTPResponse``, whose file object and
    email-based header parser cost ~35 us per answer, a tenth of this transport's own cost.
    """
    incoming = _Incoming(sock)
    try:
        while True:
            lines = incoming.until(b"\r\n\r\n").decode("latin-1").split("\r\n")
            version, _, rest = lines[0].partition(" ")
            if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
                raise http.client.BadStatusLine(lines[0])
            status = int(rest[:3])
            if status >= 200:
                break
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon:
                raise http.client.HTTPException(f"malformed header line in the answer: {line!r}")
            headers[name.strip().lower()] = value.strip()
        connection = headers.get("connection", "").lower()
        keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
        if method == "HEAD" or status in (204, 304):
            content = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            parts = []
            while size := int(incoming.until(b"\r\n").split(b";")[0], 16):
                parts.append(incoming.exactly(size))
                incoming.exactly(2)  # the CRLF after each chunk
            while incoming.until(b"\r\n"):  # trailers, up to the empty line
                pass
            content = b"".join(parts)
        elif "content-length" in headers:
            content = incoming.exactly(int(headers["content-length"]))
        else:
            content, keep_alive = incoming.to_end(), False
    except ValueError as exc:  # a length that is not a number
        raise http.client.HTTPException(f"malformed answer: {exc}") from exc
    # Bytes past the answer mean the stream is out of step: never reuse it.
    return Reply(status, headers, content), keep_alive and not incoming.buf


def _closed_by_peer(sock) -> bool:
    """An idle keep-alive socket is readable only when the server closed it (or sent garbage)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


__all__ = ["Reply", "SyncTransport", "TRANSPORT_ERRORS", "read_reply"]
