"""Issue 19's service hardening against a real ``refmodel serve`` process on loopback (the
``hardened_server`` of ``conftest.py``: a model with 32 positions, auth on, 1 s connection timeouts)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch
from serve_helpers import HARDENED_TIMEOUT_S as TIMEOUT_S
from serve_helpers import POSITIONS, TOKEN
from service_checks import ATOL, expected, random_rows

from refmodel import ReferenceClient
from refmodel.errors import RequestTooLarge, Unauthorized
from refmodel.remote import wire
from refmodel.testing import free_port, load_tiny, subprocess_env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dirs(hardened_dirs):
    return hardened_dirs


@pytest.fixture(scope="module")
def server(hardened_server):
    return hardened_server


@pytest.fixture(scope="module")
def gpt2(dirs):
    return load_tiny(dirs["gpt2"])[0]


def post(server, path, **kwargs):
    headers = {**server.headers, **kwargs.pop("headers", {})}
    return httpx.post(server.url + path, headers=headers, timeout=30, **kwargs)


# ----------------------------------------------------------------- item 1: the model's position limit
def test_over_length_is_422_naming_the_model_limit_on_every_route(server):
    long = [[3] * (POSITIONS + 1)]
    for path, kwargs in [
        ("/v1/logprobs", {"json": {"model": "short", "input_ids": long}}),
        ("/v1/logprobs:binary", {"content": wire.encode_request("short", np.asarray(long))}),
        ("/v1/rewards", {"json": {"model": "rm", "input_ids": long}}),
    ]:
        r = post(server, path, **kwargs)
        assert r.status_code == 422, (path, r.text)
        assert r.json()["field"] == "input_ids"
        assert f"has {POSITIONS + 1} tokens" in r.json()["detail"]
        assert f"position limit ({'n_positions' if path != '/v1/rewards' else 'max_position_embeddings'})=32" \
            in r.json()["detail"], r.text
    ok = post(server, "/v1/logprobs", json={"model": "short", "input_ids": [[3] * POSITIONS]})
    assert ok.status_code == 200, ok.text
    models = {m["name"]: m["max_seq_len"] for m in httpx.get(server.url + "/v1/models", headers=server.headers)
              .json()["models"]}
    assert models == {"short": POSITIONS, "rm": POSITIONS}


@pytest.mark.slow
def test_bad_requests_in_the_same_batch_window_never_fail_good_ones(server, gpt2):
    good = random_rows(24, seed=21, lo=4, hi=POSITIONS)
    bad = [[5] * (POSITIONS + 1 + i) for i in range(8)]

    async def main():
        async with httpx.AsyncClient(headers=server.headers, timeout=30) as client:
            def send(row):
                return client.post(server.url + "/v1/logprobs:binary",
                                   content=wire.encode_request("short", np.asarray([row])))
            # interleaved and sent at once: the 50 ms batch window merges them
            return await asyncio.gather(*(send(r) for pair in zip(good, bad + bad + bad, strict=True) for r in pair))

    answers = asyncio.run(main())
    good_answers, bad_answers = answers[0::2], answers[1::2]
    assert [a.status_code for a in bad_answers] == [422] * len(bad_answers)
    assert [a.status_code for a in good_answers] == [200] * len(good)
    for row, answer in zip(good, good_answers, strict=True):
        _, out = wire.decode_response(answer.content)
        torch.testing.assert_close(torch.from_numpy(out[0]), expected(gpt2, row), atol=ATOL, rtol=0)


# ------------------------------------------------------- item 4: auth before the body, header limits, timeouts
def _raw(server, data: bytes, read_timeout: float = 5.0) -> tuple[bytes, float]:
    """Send ``data`` on a fresh connection; ``(everything the server sent until it closed, seconds)``. Like
    httpcore and urllib3, a write the server cut short (it answered early) is followed by reading the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=read_timeout) as sock:
        start = time.monotonic()
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out, time.monotonic() - start


def test_unauthenticated_requests_are_refused_before_the_body_is_sent(server):
    # A head announcing a 1 MiB body, and no body at all: the 401 must not wait for it.
    head = (f"POST /v1/logprobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {2**20}\r\n\r\n").encode()
    out, seconds = _raw(server, head)
    assert out.startswith(b"HTTP/1.1 401") and b"bearer token" in out, out[:300]
    assert b"connection: close" in out.lower() and seconds < TIMEOUT_S
    # the same with a wrong token, on the binary route
    out, _ = _raw(server, head.replace(b"/v1/logprobs ", b"/v1/logprobs:binary ").replace(
        b"Host: x\r\n", b"Host: x\r\nAuthorization: Bearer wrong\r\n"))
    assert out.startswith(b"HTTP/1.1 401")


@pytest.mark.parametrize("rows", [4000, 32768])  # 512 KiB of ids; 4 MiB, past --max-body-bytes (1 MiB)
def test_a_client_with_a_wrong_token_and_a_large_body_gets_unauthorized(server, rows):
    # The server answers before reading the body and closes lingering, so a client that sends its whole body
    # before it reads still gets the answer, not a reset: 401 for a wrong token, 413 past the body limit.
    ids = torch.ones(rows, 32, dtype=torch.long)
    for _ in range(3):
        with ReferenceClient(server.url, token="wrong", max_retries=0) as client:
            with pytest.raises(Unauthorized, match="401"):
                client.compute_log_probs("short", ids)
        if ids.numel() * 4 > 2**20:
            with ReferenceClient(server.url, token=TOKEN, max_retries=0) as client:
                with pytest.raises(RequestTooLarge, match="limit of 1048576 bytes"):
                    client.compute_log_probs("short", ids)

    async def call():
        async with ReferenceClient(server.url, token="wrong", max_retries=0) as client:
            await client.acompute_log_probs("short", ids)

    with pytest.raises(Unauthorized, match="401"):
        asyncio.run(call())
    assert httpx.get(server.url + "/v1/models", headers=server.headers).status_code == 200


def test_header_size_and_count_limits(server):
    r = httpx.get(server.url + "/v1/models", headers={**server.headers, "X-Big": "a" * 8192})
    assert r.status_code == 431 and "at most 4096" in r.json()["detail"]
    # A head far over the limit is refused while it is still arriving (the connection's byte count), not buffered;
    # the close lingers, so a client still sending reads the 431 rather than a reset (every time, not by luck).
    for _ in range(5):
        out, _ = _raw(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2**22 + b"\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 431") and b"head exceeds this server's limit of 4096 bytes" in out, out[:300]
    many = {f"X-H{i}": "1" for i in range(30)}
    r = httpx.get(server.url + "/v1/models", headers={**server.headers, **many})
    assert r.status_code == 431 and "at most 20" in r.json()["detail"] and r.json()["field"] == "headers"
    assert httpx.get(server.url + "/v1/models", headers=server.headers).status_code == 200


def test_heads_in_pieces_and_pipelined_requests_are_served(server):
    # The head bounds count bytes per request, not per connection: three requests on one connection, the second
    # sent in 3-byte pieces, the third pipelined behind it in the same write, each 2 KiB of headers (half the limit).
    pad = "X-Pad: " + "p" * 2000 + "\r\n"
    request = f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n{pad}\r\n".encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first[:200]
        for i in range(0, len(request), 3):
            sock.sendall(request[i:i + 3])
        sock.sendall(request)
        out = b""
        while out.count(b"HTTP/1.1 200") < 2:
            chunk = sock.recv(65536)
            assert chunk, out[:300]
            out += chunk
    assert b"HTTP/1.1 4" not in out


def test_slow_heads_idle_connections_and_slow_bodies_are_closed(server):
    out, seconds = _raw(server, b"", read_timeout=10)  # opens, sends nothing
    assert out == b"" and TIMEOUT_S * 0.8 <= seconds < TIMEOUT_S + 2
    out, seconds = _raw(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ", read_timeout=10)  # never ends
    assert out == b"" and seconds < TIMEOUT_S + 2
    auth = f"Authorization: Bearer {TOKEN}\r\n"
    out, seconds = _raw(server, (f"POST /v1/logprobs HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json"
                                 f"\r\nContent-Length: 100\r\n\r\n{{\"model\"").encode(), read_timeout=10)
    assert out.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in out, out[:300]
    assert seconds < TIMEOUT_S + 2


def test_a_slowloris_trickle_is_closed_at_the_head_deadline(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        start = time.monotonic()
        closed_after = None
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            try:
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
                sock.setblocking(False)
                try:
                    if sock.recv(1) == b"":
                        closed_after = time.monotonic() - start
                        break
                except BlockingIOError:
                    pass
                finally:
                    sock.setblocking(True)
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - start
                break
    assert closed_after is not None and closed_after < TIMEOUT_S + 1.5


def test_idle_keep_alive_connections_close_after_the_keep_alive_timeout(server):
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    out, seconds = _raw(server, request, read_timeout=10)
    assert out.startswith(b"HTTP/1.1 200") and TIMEOUT_S * 0.8 <= seconds < TIMEOUT_S + 2


def test_framework_errors_have_the_service_error_shape(server):
    r = post(server, "/v1/rewards", content=b'{"model": "\xff\xfe"}', headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] == "body" and "not valid JSON" in r.json()["detail"]
    r = httpx.get(server.url + "/v2/nothing", headers=server.headers)
    assert r.status_code == 404 and set(r.json()) == {"detail", "field"}
    r = httpx.get(server.url + "/v1/logprobs", headers=server.headers)
    assert r.status_code == 405 and set(r.json()) == {"detail", "field"}


# --------------------------------------------------------------------------------- item 9: OpenAPI
def test_openapi_documents_what_the_service_answers(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "the token of --token-file / REFMODEL_TOKEN"}
    paths = schema["paths"]
    binary = paths["/v1/logprobs:binary"]["post"]
    assert wire.CONTENT_TYPE in binary["requestBody"]["content"]
    assert wire.CONTENT_TYPE in binary["responses"]["200"]["content"]
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]
    error_ref = "#/components/schemas/ErrorResponse"
    for path in ("/v1/logprobs", "/v1/logprobs:binary", "/v1/rewards"):
        responses = paths[path]["post"]["responses"]
        for status in ("401", "404", "413", "422", "429"):
            assert responses[status]["content"]["application/json"]["schema"]["$ref"] == error_ref, (path, status)
        assert paths[path]["post"]["security"] == [{"bearer": []}]
    assert "security" not in paths["/healthz"]["get"]
    assert set(schema["components"]["schemas"]["ErrorResponse"]["properties"]) == {"detail", "field"}
    assert "HTTPValidationError" not in schema["components"]["schemas"]  # FastAPI's own 422 shape is not ours


# ------------------------------------------------------------------------------- item 10: start-up
def _serve(args: list, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refmodel", "serve", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=subprocess_env())


def test_a_taken_port_is_reported_before_any_model_loads(dirs):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = _serve(["--model", f"short={dirs['gpt2']}", "--port", port])
    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "Address already in use" in done.stderr
    assert "fingerprint" not in done.stderr + done.stdout  # no model was loaded


@pytest.mark.slow
def test_a_public_host_without_a_token_is_refused_unless_allowed(dirs):
    done = _serve(["--model", f"short={dirs['gpt2']}", "--host", "0.0.0.0", "--port", free_port()])
    assert done.returncode != 0 and "no bearer token is set" in done.stderr and "--allow-no-auth" in done.stderr
    with socket.create_server(("0.0.0.0", 0)) as taken:  # allowed: it warns, then stops at the taken port
        done = _serve(["--model", f"short={dirs['gpt2']}", "--host", "0.0.0.0", "--allow-no-auth",
                       "--port", taken.getsockname()[1]])
    assert "WARNING" in done.stderr and "WITHOUT authentication" in done.stderr
    assert "cannot listen" in done.stderr
