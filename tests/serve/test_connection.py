"""Issue 25's probes, over raw sockets against one real ``refmodel serve`` on loopback: what a client
can make the connection layer (:mod:`refmodel.serve.connection`), the guard and the routes hold.

One server for the module: auth on, 1 s head and keep-alive timeouts, a queue of 4 sequences whose
batches wait 0.8 s for company (a request stays queued long enough to disconnect from it).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from serve_helpers import TOKEN, ServerProcess, write_token_file

from refmodel.remote import wire

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TIMEOUT_S = 1.0  # head and keep-alive timeouts
WAIT_S = 0.8  # a batch waits this long for company
MAX_HEADER_BYTES = 4096
AUTH = f"Authorization: Bearer {TOKEN}\r\n"


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("connection")
    proc = ServerProcess(["--model", f"tiny={tiny_model_dirs['llama']}", "--token-file", write_token_file(root),
                          "--max-queue", 4, "--max-wait-ms", int(WAIT_S * 1000), "--max-seq-len", 64,
                          "--header-timeout-s", TIMEOUT_S, "--keep-alive-timeout-s", TIMEOUT_S,
                          "--body-timeout-s", 3, "--max-header-bytes", MAX_HEADER_BYTES], root / "server.log",
                         token=TOKEN)
    yield proc
    proc.stop()


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


class Raw:
    """A raw loopback connection that reads whole HTTP/1.1 answers (interim 1xx answers skipped)."""

    def __init__(self, server, timeout_s: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout_s)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_body(self, data: bytes) -> None:
        """Send ``data``, which the server may cut short by answering early and closing: then its answer
        is read after the failed write, as httpcore and urllib3 do."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def answer(self) -> tuple[int, dict, bytes]:
        while True:
            while b"\r\n\r\n" not in self.buf:
                if not self._fill():
                    raise ConnectionError(f"closed before a whole answer: {self.buf[:200]!r}")
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
            if 100 <= status < 200:
                continue
            size = int(headers.get("content-length", 0))
            while len(self.buf) < size:
                if not self._fill():
                    raise ConnectionError("closed inside an answer's body")
            body, self.buf = self.buf[:size], self.buf[size:]
            return status, headers, body

    def closed_within(self, seconds: float) -> bool:
        """Whether the server closes the connection within ``seconds`` (what it still sends is read)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
            except TimeoutError:
                return False
            except ConnectionError:
                return True
        return False

    def close(self) -> None:
        self.sock.close()


def logprobs_request(rows: list[list[int]], temperature: float | None = None) -> bytes:
    payload = {"model": "tiny", "input_ids": rows, **({"temperature": temperature} if temperature else {})}
    body = json.dumps(payload).encode()
    return (f"POST /v1/logprobs HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


def healthz_seconds(server) -> float:
    start = time.perf_counter()
    assert httpx.get(server.url + "/healthz", timeout=30).status_code == 200
    return time.perf_counter() - start


# --------------------------------------------------------------------------- 1: pipelining
def test_pipelined_requests_are_answered_in_order(server):
    conn = Raw(server)
    conn.send(HEALTHZ * 3 + b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [conn.answer()[0] for _ in range(4)] == [200, 200, 200, 401]  # no token: refused in turn
    conn.close()


def test_a_client_that_pipelines_and_never_reads_does_not_grow_the_server(server):
    before = rss_mib(server.proc.pid)
    conn = Raw(server)
    conn.sock.setblocking(False)
    data, sent, stop = HEALTHZ * 4096, 0, time.monotonic() + 3.0
    while time.monotonic() < stop and sent < 64 * 2**20:
        try:
            sent += conn.sock.send(data)
        except BlockingIOError:
            time.sleep(0.01)
        except ConnectionError:  # past MAX_PIPELINED queued requests the server answers those and closes
            break
    grown = rss_mib(server.proc.pid) - before
    assert healthz_seconds(server) < 1.0  # the others are served meanwhile
    conn.close()
    # the server holds one read of input and its write buffer; the rest waits in the kernel's buffers
    assert sent < 16 * 2**20, f"the server read {sent >> 20} MiB of pipelined requests without answering them"
    assert grown < 32, f"the server grew {grown:.0f} MiB"


# ----------------------------------------------------------------- 2: the open paths read no body
@pytest.mark.parametrize("method", ["POST", "GET"])
@pytest.mark.parametrize("path", ["/healthz", "/openapi.json"])
def test_a_body_on_an_open_path_is_refused_unread(server, path, method):
    conn = Raw(server)
    conn.send(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {15 * 2**20}\r\n\r\n".encode()
              + b"x" * 65536)
    start = time.monotonic()
    status, headers, body = conn.answer()
    assert status == 413 and headers["connection"] == "close" and json.loads(body)["field"] == "body"
    assert time.monotonic() - start < 1.5  # at once, not after a body timeout
    assert conn.closed_within(5.0)
    conn.close()


# ------------------------------------------------------------ 3: no connection outlives the timeouts
@pytest.mark.parametrize("framing", ["Content-Length: 1000000000000", "Transfer-Encoding: chunked"])
def test_a_get_dripping_a_body_is_closed(server, framing):
    conn = Raw(server)
    conn.send(f"GET /v1/models HTTP/1.1\r\nHost: x\r\n{AUTH}{framing}\r\n\r\n".encode())
    start, closed = time.monotonic(), False
    while time.monotonic() - start < 8.0 and not closed:
        try:
            conn.send(b"1")
        except ConnectionError:
            closed = True
            break
        closed = conn.closed_within(0.3)
    assert closed, "a GET dripping its body was still open after 8 s"
    assert b" 413 " in conn.buf.split(b"\r\n", 1)[0]
    conn.close()


def test_bytes_between_requests_do_not_keep_a_connection_open(server):
    conn = Raw(server)
    conn.send(HEALTHZ)
    assert conn.answer()[0] == 200
    start, closed = time.monotonic(), False
    while time.monotonic() - start < 8.0 and not closed:
        try:
            conn.send(b"\r\n")  # never a head: the head deadline runs from the first of them
        except ConnectionError:
            break
        closed = conn.closed_within(0.3)
    assert time.monotonic() - start < TIMEOUT_S + 2.0, "stray CRLFs kept the connection open"
    conn.close()


# ---------------------------------------------------- 4: a huge body does not stall the event loop
def test_a_16_mib_body_of_4_million_rows_is_refused_without_stalling_others(server):
    rows = (16 * 2**20 - 64) // 4
    body = b'{"model": "tiny", "input_ids": [' + b"[1]," * (rows - 1) + b"[1]]}"
    head = (f"POST /v1/logprobs HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    before = rss_mib(server.proc.pid)
    out: dict = {}

    def send():
        conn = Raw(server, timeout_s=60)
        start = time.monotonic()
        conn.send_body(head + body)
        out["answer"], out["seconds"] = conn.answer(), time.monotonic() - start
        conn.close()

    thread = threading.Thread(target=send)
    thread.start()
    slowest, peak = 0.0, before
    while thread.is_alive():
        slowest = max(slowest, healthz_seconds(server))
        peak = max(peak, rss_mib(server.proc.pid))
    thread.join()
    status, _, answer = out["answer"]
    assert status == 422 and json.loads(answer)["field"] == "input_ids", answer[:300]
    assert "1024 sequences" in json.loads(answer)["detail"]
    assert slowest < 0.5, f"/healthz waited {slowest:.2f} s while the body was refused"
    assert out["seconds"] < 5.0 and peak - before < 64, (out["seconds"], peak - before)


def bytes_read(pid: int) -> int:
    """What a process has read through read/recv calls so far (``rchar`` in Linux ``/proc/PID/io``)."""
    with open(f"/proc/{pid}/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/io")
@pytest.mark.parametrize("refusal", [401, 413])
def test_a_refused_body_is_read_no_further_than_the_body_limit(server, refusal):
    """A refused request whose body keeps coming (``Content-Length: 2**40``, 48 MiB sent at loopback speed):
    the lingering close reads and drops at most the body limit (16 MiB here) and then stops reading; the
    answer is still readable after the write the server cut short (before: all 48 MiB were read, and a
    client streaming for the whole linger made the server read gigabytes)."""
    auth = "Authorization: Bearer wrong\r\n" if refusal == 401 else AUTH
    head = f"POST /v1/logprobs:binary HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {2**40}\r\n\r\n".encode()
    before = bytes_read(server.proc.pid)
    conn = Raw(server)
    conn.send_body(head + b"\0" * (48 * 2**20))
    status, headers, _ = conn.answer()
    read = bytes_read(server.proc.pid) - before
    assert status == refusal and headers["connection"] == "close"
    assert conn.closed_within(5.0)
    conn.close()
    assert read < 18 * 2**20, f"the server read {read / 2**20:.1f} MiB of a refused body (limit 16 MiB)"


def test_an_asyncio_client_gets_its_refusal_for_a_body_up_to_the_limit(server):
    """A client on anyio (httpx's async client) reports a failed write rather than the answer waiting in its
    socket, so a refused body within the body limit is read to its end: the client gets its 401."""
    async def post() -> int:
        async with httpx.AsyncClient(timeout=30) as client:
            answer = await client.post(server.url + "/v1/logprobs", content=b" " * (16 * 2**20))
            return answer.status_code

    assert asyncio.run(post()) == 401


def test_a_json_body_of_too_many_rows_is_refused_before_it_is_read(server):
    """The row bound applies while the body arrives: 422 after its first kilobytes, the connection closed,
    the other 15.9 MiB never read into memory (before: the whole body was awaited, here a 408 after 3 s)."""
    rows = (16 * 2**20 - 64) // 4
    body = b'{"model": "tiny", "input_ids": [' + b"[1]," * (rows - 1) + b"[1]]}"
    head = (f"POST /v1/logprobs HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    conn = Raw(server)
    start = time.monotonic()
    conn.send(head + body[:65536])  # the rest is withheld
    status, headers, answer = conn.answer()
    assert status == 422 and json.loads(answer)["field"] == "input_ids", answer[:300]
    assert "1024 sequences" in json.loads(answer)["detail"]
    assert headers.get("connection") == "close" and time.monotonic() - start < 2.0
    assert conn.closed_within(5.0)
    conn.close()


def _data_segments_in(sock: socket.socket) -> int:
    """Segments with data this socket has received (Linux ``TCP_INFO`` ``tcpi_data_segs_in``, at byte 152)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 160)
    return struct.unpack_from("I", info, 152)[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux TCP_INFO")
@pytest.mark.parametrize("request_bytes", [HEALTHZ, logprobs_request([[1, 2, 3]])], ids=["healthz", "logprobs"])
def test_an_answer_arrives_in_one_segment(server, request_bytes):
    """The head and the body of an answer go out in one write (uvicorn writes them apart: two segments, two
    wake-ups of the client per answer)."""
    conn = Raw(server)
    for _ in range(3):
        before = _data_segments_in(conn.sock)
        conn.send(request_bytes)
        assert conn.answer()[0] == 200
        time.sleep(0.05)
        assert _data_segments_in(conn.sock) - before == 1
    conn.close()


# ------------------------------------------------------------------- 5: tiny temperatures
def _no_nan(text: str):
    def refuse(name):
        raise AssertionError(f"{name} in a JSON answer")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("temperature", [1e-300, 5e-324])
def test_a_temperature_whose_reciprocal_overflows_is_422_naming_it(server, temperature):
    r = httpx.post(server.url + "/v1/logprobs", headers=server.headers, timeout=30,
                   json={"model": "tiny", "input_ids": [[2, 5, 6]], "temperature": temperature})
    assert r.status_code == 422 and _no_nan(r.text)["field"] == "temperature", r.text
    assert r.headers.get("connection") != "close"
    body = bytearray(wire.encode_request("tiny", np.array([[2, 5, 6]], dtype=np.int32), temperature=0.5))
    at = body.index(np.float64(0.5).tobytes())  # the client refuses it: a hand-made body
    body[at:at + 8] = np.float64(temperature).tobytes()
    r = httpx.post(server.url + "/v1/logprobs:binary", headers=server.headers, content=bytes(body), timeout=30)
    assert r.status_code == 422 and r.json()["field"] == "temperature", r.text
    r = httpx.post(server.url + "/v1/logprobs", headers=server.headers, timeout=30,
                   json={"model": "tiny", "input_ids": [[2, 5, 6]], "temperature": 1e-37})  # allowed: finite
    assert r.status_code in (200, 422), r.text
    if r.status_code == 200:
        assert np.isfinite(np.asarray(_no_nan(r.text)["logprobs"][0])).all()


# ----------------------------------------------------------------------------- 6: the smaller ones
def test_a_half_closed_client_gets_its_answer(server):
    conn = Raw(server)
    conn.send(logprobs_request([[2, 5, 6]]))
    conn.sock.shutdown(socket.SHUT_WR)
    status, _, body = conn.answer()
    assert status == 200 and len(json.loads(body)["logprobs"][0]) == 3
    assert conn.closed_within(3.0)
    conn.close()


@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_disconnected_clients_queued_request_is_dropped(server, how):
    gone = Raw(server)
    gone.send(logprobs_request([[2, 5, 6]] * 4))  # fills the queue of 4 for WAIT_S
    time.sleep(0.1)
    if how == "reset":
        gone.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    gone.close()
    time.sleep(0.2)
    r = httpx.post(server.url + "/v1/logprobs", headers=server.headers, timeout=30,
                   json={"model": "tiny", "input_ids": [[2, 5, 6]] * 4})
    assert r.status_code == 200, r.text


def test_a_slow_request_keeps_its_answer_when_an_over_limit_head_follows(server):
    conn = Raw(server)
    conn.send(logprobs_request([[2, 5, 6]]))  # answered after WAIT_S
    time.sleep(0.1)
    conn.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (2 * MAX_HEADER_BYTES))  # never finished
    status, _, body = conn.answer()
    assert status == 200 and len(json.loads(body)["logprobs"][0]) == 3
    assert conn.answer()[0] == 431
    conn.close()


def test_the_request_line_counts_toward_max_header_bytes(server):
    conn = Raw(server)
    conn.send(f"GET /healthz?q={'a' * (MAX_HEADER_BYTES + 100)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    status, _, body = conn.answer()
    assert status == 431 and json.loads(body)["field"] == "headers"
    conn.close()
