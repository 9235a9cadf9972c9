"""``ReferenceClient`` transport and error mapping against real servers on loopback (stdlib HTTP
servers that answer, hang up or stay silent on purpose; the service itself is in ``tests/serve``)."""

from __future__ import annotations

import asyncio
import http.server
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from refmodel import ReferenceClient
from refmodel.errors import (
    ConfigError,
    InvalidBatch,
    ModelNotAllowed,
    RequestTooLarge,
    ServiceError,
    ServiceOverloaded,
    Unauthorized,
)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless told otherwise

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _answer(self):
        server = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with server.lock:
            server.requests += 1
            n = server.requests
            server.ports.add(self.client_address[1])
        status, extra = server.statuses.pop(0) if server.statuses else (200, {})
        answer = json.dumps({"detail": f"status {status}", "models": [], "path": self.path, "body": body.decode(
            "latin-1"), "auth": self.headers.get("Authorization"), "type": self.headers.get("Content-Type"),
            "n": n}).encode()
        self.send_response(status)
        for name, value in extra.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
        if n in server.close_after:  # answer, then close the connection without announcing it
            self.close_connection = True

    do_GET = do_POST = _answer


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.lock, srv.requests, srv.ports, srv.statuses, srv.close_after = threading.Lock(), 0, set(), [], set()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def test_requests_carry_the_token_the_path_prefix_and_the_body(server):
    with ReferenceClient(server.url + "/base/", token="s3cret") as client:
        answer = client._request("POST", "/v1/x", b"hello", "text/plain").json()
    assert (answer["path"], answer["body"], answer["auth"], answer["type"]) == (
        "/base/v1/x", "hello", "Bearer s3cret", "text/plain")


def test_the_token_comes_from_REFMODEL_TOKEN_when_none_is_passed(server, monkeypatch):
    # A URL alone (reference="http://...") must reach a service started with --token-file.
    monkeypatch.setenv("REFMODEL_TOKEN", "from-env")
    with ReferenceClient(server.url) as client:
        assert client._request("GET", "/v1/x").json()["auth"] == "Bearer from-env"
    with ReferenceClient(server.url, token="explicit") as client:  # an explicit token wins
        assert client._request("GET", "/v1/x").json()["auth"] == "Bearer explicit"
    with ReferenceClient(server.url, token="") as client:  # "" sends none
        assert client._request("GET", "/v1/x").json()["auth"] is None


def test_a_401_without_a_token_says_how_to_send_one(server, monkeypatch):
    monkeypatch.delenv("REFMODEL_TOKEN", raising=False)
    server.statuses = [(401, {})]
    with ReferenceClient(server.url) as client, pytest.raises(Unauthorized, match="REFMODEL_TOKEN"):
        client.models()
    server.statuses = [(401, {})]
    with ReferenceClient(server.url, token="wrong") as client, pytest.raises(Unauthorized) as caught:
        client.models()
    assert "REFMODEL_TOKEN" not in str(caught.value)  # a wrong token is not a missing one


def test_connections_are_kept_alive_and_a_closed_one_is_replaced(server):
    with ReferenceClient(server.url) as client:
        for _ in range(5):
            client.models()
        assert len(server.ports) == 1
        server.close_after = {6}
        client.models()  # the server closes this connection after answering
        client.models()  # a fresh connection, no error
    assert server.requests == 7 and len(server.ports) == 2


@pytest.mark.parametrize("status,error,match", [
    (401, Unauthorized, "answered 401: status 401"),
    (404, ModelNotAllowed, "answered 404"),
    (413, RequestTooLarge, "answered 413"),
    (422, InvalidBatch, "answered 422"),
    (500, ServiceError, "answered 500"),
])
def test_error_statuses_map_to_refmodel_errors_sync_and_async(server, status, error, match):
    server.statuses = [(status, {}), (status, {})]
    with ReferenceClient(server.url, max_retries=3) as client, pytest.raises(error, match=match):
        client.models()

    async def call():
        async with ReferenceClient(server.url, max_retries=3) as client:
            await client.acompute_rewards("rm", [[1, 2]])

    with pytest.raises(error, match=match):
        asyncio.run(call())
    assert server.requests == 2  # not retried


def test_busy_answers_are_retried_honouring_retry_after_then_reported(server):
    server.statuses = [(429, {"Retry-After": "0.2"}), (503, {})]
    with ReferenceClient(server.url, max_retries=2, backoff_s=0.01) as client:
        assert client.models() == []  # 429, 503, then 200
        assert server.requests == 3
        server.statuses = [(429, {})] * 3
        with pytest.raises(ServiceOverloaded, match="answered 429"):
            client.models()
    assert server.requests == 6


def test_one_sync_client_serves_many_threads(server):
    with ReferenceClient(server.url) as client:
        def call(i):
            return [client._request("POST", f"/{i}", f"{i}-{k}".encode()).json() for k in range(10)]

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(call, range(8)))
    for i, answers in enumerate(results):
        assert [a["body"] for a in answers] == [f"{i}-{k}" for k in range(10)]
        assert all(a["path"] == f"/{i}" for a in answers)
    assert server.requests == 80 and len(server.ports) <= 8


def test_a_silent_server_gives_a_timeout_error_sync_and_async():
    listener = socket.create_server(("127.0.0.1", 0))  # accepts into its backlog, never answers
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        with pytest.raises(ServiceError, match=r"did not answer /v1/models within 0.3 s"):
            ReferenceClient(url, timeout_s=0.3).models()

        async def call():
            async with ReferenceClient(url, timeout_s=0.3) as client:
                await client.acompute_rewards("rm", [[1, 2]])

        with pytest.raises(ServiceError, match=r"did not answer /v1/rewards within 0.3 s"):
            asyncio.run(call())
    finally:
        listener.close()


def test_a_server_that_hangs_up_is_retried_then_reported():
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def hang_up():  # read each request, then close without an answer
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn.recv(65536))
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        client = ReferenceClient(url, max_retries=2, backoff_s=0.01)
        with pytest.raises(ServiceError, match="cannot reach the reference service"):
            client.compute_log_probs("tiny", [[1, 2, 3]])
        assert len(accepted) == 3  # the first attempt and 2 retries
        assert all(r.startswith(b"POST /v1/logprobs:binary HTTP/1.1\r\n") for r in accepted)
    finally:
        listener.close()


def test_a_refused_connection_is_reported():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        url = f"http://127.0.0.1:{port}"
        with pytest.raises(ServiceError, match="cannot reach the reference service .*Connection refused"):
            ReferenceClient(url, max_retries=1, backoff_s=0.01).health()

        async def call():
            async with ReferenceClient(url, max_retries=1, backoff_s=0.01) as client:
                await client.acompute_log_probs("tiny", [[1, 2]])

        with pytest.raises(ServiceError, match="cannot reach the reference service .*ConnectError"):
            asyncio.run(call())


@pytest.mark.parametrize("url", ["ftp://host", "127.0.0.1:8000", "http://", "http://host:port", "http://h:99999"])
def test_bad_urls_are_refused(url):
    with pytest.raises(ConfigError, match="http"):
        ReferenceClient(url)


def test_a_token_that_would_split_the_request_is_refused():
    with pytest.raises(ConfigError, match="line break"):
        ReferenceClient("http://127.0.0.1:1", token="abc\r\nX-Evil: 1")
