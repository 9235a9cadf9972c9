"""``ReferenceClient`` transport failures: a silent server times out, an unreachable one is retried."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from refmodel import ReferenceClient, ServiceError


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
