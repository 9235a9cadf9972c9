"""Queue limits, retries and graceful shutdown against a real server with a tiny queue and a long wait."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest
import torch
from serve_helpers import ServerProcess

from refmodel import ReferenceClient
from refmodel.errors import RequestTooLarge
from refmodel.logprobs.model import model_logprobs
from refmodel.testing import load_tiny

pytestmark = pytest.mark.integration
WAIT_MS = 1500  # a batch waits this long for company: requests sit in the queue deterministically


@pytest.fixture(scope="module")
def slow_server(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("slow_server")
    proc = ServerProcess(["--model", f"tiny={tiny_model_dirs['llama']}", "--max-queue", 4,
                          "--max-wait-ms", WAIT_MS, "--max-seq-len", 64], root / "server.log")
    yield proc
    proc.stop()


def wait_for_depth(server, depth: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(server.url + "/healthz").json()["queue_depth"] >= depth:
            return
        time.sleep(0.01)
    raise AssertionError(f"queue never reached depth {depth}")


def in_background(fn, *args):
    out = {}

    def run():
        try:
            out["value"] = fn(*args)
        except Exception as exc:
            out["error"] = exc
    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_queue_full_gives_429_and_the_client_retries(slow_server):
    filler = [[2, 5, 6, 7]] * 4
    with ReferenceClient(slow_server.url, max_retries=0) as first:
        thread, out = in_background(first.compute_log_probs, "tiny", filler)
        wait_for_depth(slow_server, 4)
        r = httpx.post(slow_server.url + "/v1/logprobs", json={"model": "tiny", "input_ids": [[2, 5]]})
        assert r.status_code == 429, r.text
        assert "queue" in r.json()["detail"] and int(r.headers["retry-after"]) >= 1
        started = time.monotonic()
        with ReferenceClient(slow_server.url, max_retries=5, backoff_s=0.05) as retrying:
            got = retrying.compute_log_probs("tiny", [[2, 5, 6]])  # 429 first, then admitted
        assert time.monotonic() - started >= 0.9  # honoured Retry-After (>= 1 s)
        thread.join(30)
    assert "error" not in out and len(out["value"]) == 4 and len(got) == 1
    metrics = httpx.get(slow_server.url + "/metrics").text
    assert 'refmodel_requests_total{endpoint="/v1/logprobs:binary",status="429"}' in metrics


def test_a_request_larger_than_the_queue_is_refused_at_once_naming_max_queue(slow_server):
    # The queue (4) is empty, yet 5 sequences can never be admitted: 413 at once, not "429 retry later".
    assert httpx.get(slow_server.url + "/healthz").json()["queue_depth"] == 0
    r = httpx.post(slow_server.url + "/v1/logprobs", json={"model": "tiny", "input_ids": [[2, 5]] * 5})
    assert r.status_code == 413, r.text
    assert "--max-queue" in r.json()["detail"] and "retry-after" not in r.headers
    started = time.monotonic()
    with ReferenceClient(slow_server.url, max_retries=5, backoff_s=0.05) as client:
        with pytest.raises(RequestTooLarge, match="--max-queue"):
            client.compute_log_probs("tiny", [[2, 5, 6]] * 5)
    assert time.monotonic() - started < 1.0  # refused, not retried


def test_sigterm_while_busy_loses_no_accepted_request(slow_server, tiny_model_dirs):
    model, _ = load_tiny(tiny_model_dirs["llama"])
    rows = [[2, 5, 6, 7 + i] for i in range(4)]
    clients = [ReferenceClient(slow_server.url, max_retries=0) for _ in rows]
    jobs = [in_background(c.compute_log_probs, "tiny", [row]) for c, row in zip(clients, rows, strict=True)]
    wait_for_depth(slow_server, 4)  # all four admitted, waiting for the batch deadline
    slow_server.terminate()
    for thread, _ in jobs:
        thread.join(30)
    # uvicorn re-raises SIGTERM after its graceful shutdown, so -15 is a clean exit too
    assert slow_server.proc.wait(30) in (0, -signal.SIGTERM)
    for row, (_, out) in zip(rows, jobs, strict=True):
        assert "error" not in out, out.get("error")
        with torch.no_grad():
            want = model_logprobs(model, torch.tensor([row]))[0]
        torch.testing.assert_close(out["value"][0], want, atol=1e-5, rtol=0)
    assert "Waiting for application shutdown" in slow_server.log() or "Shutting down" in slow_server.log()
    for c in clients:
        c.close()
