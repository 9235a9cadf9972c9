"""The sync client's keep-alive transport against a real stdlib HTTP server on loopback."""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from refmodel import ConfigError
from refmodel.remote._http import SyncTransport, read_reply


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless told otherwise

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        server = self.server
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with server.lock:
            server.requests += 1
            n = server.requests
        if n in server.drop_requests:  # read the request, then hang up without an answer
            self.close_connection = True
            return
        if self.path.endswith("/chunked"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"ab", b"cde"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        answer = json.dumps({"path": self.path, "body": body.decode(), "port": self.client_address[1],
                             "host": self.headers.get("Host"),
                             "auth": self.headers.get("Authorization"),
                             "type": self.headers.get("Content-Type")}).encode()
        self.send_response(201)
        self.send_header("Content-Length", str(len(answer)))
        self.send_header("X-Seen", str(n))
        self.end_headers()
        self.wfile.write(answer)
        if n in server.close_after:  # answer, then close the connection without announcing it
            self.close_connection = True


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.lock, srv.requests, srv.drop_requests, srv.close_after = threading.Lock(), 0, set(), set()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def _transport(url: str, **kw) -> SyncTransport:
    return SyncTransport(url, timeout_s=kw.pop("timeout_s", 5.0), connect_timeout_s=2.0,
                         headers=kw.pop("headers", {}))


def test_reply_carries_status_headers_and_body(server):
    port = server.server_address[1]
    t = _transport(f"http://user:pw@127.0.0.1:{port}/base", headers={"Authorization": "Bearer s3cret"})
    reply = t.request("POST", "/v1/x", b"hello", "text/plain")
    assert reply.status_code == 201 and reply.headers["x-seen"] == "1"
    assert reply.json() == {"path": "/base/v1/x", "body": "hello", "port": reply.json()["port"],
                            "host": f"127.0.0.1:{port}", "auth": "Bearer s3cret", "type": "text/plain"}
    assert t.request("POST", "/chunked", b"").content == b"abcde"  # chunked answers are decoded


def test_connections_are_kept_alive_and_reused(server):
    t = _transport(server.url)
    ports = {t.request("POST", "/", b"x").json()["port"] for _ in range(5)}
    assert len(ports) == 1


def test_a_connection_the_server_closed_while_idle_is_replaced(server):
    server.close_after = {1}
    t = _transport(server.url)
    first = t.request("POST", "/", b"a").json()["port"]
    second = t.request("POST", "/", b"b").json()  # the pooled socket is dead: a fresh one is used
    assert second["body"] == "b" and second["port"] != first


def test_a_request_the_server_hangs_up_on_is_resent_once_on_a_fresh_connection(server):
    t = _transport(server.url)
    t.request("POST", "/", b"a")
    server.drop_requests = {2}  # the reused connection is read, then dropped without an answer
    reply = t.request("POST", "/", b"b")
    assert reply.json()["body"] == "b" and server.requests == 3


def test_a_fresh_connection_that_fails_raises(server):
    server.drop_requests = {1}
    with pytest.raises(ConnectionError):
        _transport(server.url).request("POST", "/", b"a")


def test_one_transport_serves_many_threads(server):
    t = _transport(server.url)

    def call(i):
        return [t.request("POST", f"/{i}", f"{i}-{k}".encode()).json() for k in range(20)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(8)))
    for i, answers in enumerate(results):
        assert [a["body"] for a in answers] == [f"{i}-{k}" for k in range(20)]
        assert all(a["path"] == f"/{i}" for a in answers)
    assert server.requests == 160
    t.close()


def test_a_silent_server_times_out():
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (backlog) but never answers
    try:
        t = _transport(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout_s=0.3)
        with pytest.raises(TimeoutError):
            t.request("POST", "/", b"x")
    finally:
        listener.close()


@pytest.mark.parametrize("url", ["ftp://host", "127.0.0.1:8000", "http://", "http://host:port", "http://h:99999"])
def test_bad_urls_are_refused(url):
    with pytest.raises(ConfigError, match="http"):
        _transport(url)


def test_a_header_that_would_split_the_request_is_refused():
    with pytest.raises(ConfigError, match="line break"):
        _transport("http://127.0.0.1:1", headers={"Authorization": "Bearer abc\r\nX-Evil: 1"})


def _parse(raw: bytes, method: str = "POST", close: bool = True):
    """``read_reply`` on a socket pair whose far end wrote ``raw`` (and hung up if ``close``)."""
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(raw)
        if close:
            theirs.close()
        return read_reply(ours, method)
    finally:
        ours.close()
        theirs.close()


def test_read_reply_framings():
    reply, keep = _parse(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A:  b \r\n\r\nabc", close=False)
    assert (reply.status_code, reply.headers["x-a"], reply.content, keep) == (200, "b", b"abc", True)
    reply, keep = _parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: x\r\n\r\n", close=False)
    assert (reply.content, keep) == (b"abcde", True)
    reply, keep = _parse(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nto the end")
    assert (reply.content, keep) == (b"to the end", False)
    reply, keep = _parse(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n"
                         b"Connection: close\r\n\r\n{}")
    assert (reply.status_code, reply.json(), keep) == (404, {}, False)
    reply, keep = _parse(b"HTTP/1.1 204 No Content\r\n\r\n", close=False)
    assert (reply.content, keep) == (b"", True)
    # Bytes past the answer: the connection is out of step and must not be reused.
    assert _parse(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nab", close=False)[1] is False


@pytest.mark.parametrize("raw, error", [
    (b"SSH-2.0-OpenSSH\r\n\r\n", "SSH-2.0"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n", "malformed answer"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "closed the connection"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed answer"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000, "within 65536 bytes"),
])
def test_read_reply_refuses_broken_answers(raw, error):
    with pytest.raises(http.client.HTTPException, match=error):
        _parse(raw)
