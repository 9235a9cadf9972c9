"""refmodel.testing.processes: a live ``refmodel serve`` child for tests and benchmarks."""

from __future__ import annotations

import socket

import httpx
import pytest

from refmodel.testing import ServeProcess, free_port


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@pytest.mark.integration
def test_serve_process_is_ready_when_constructed_and_stops(tiny_model_dirs, tmp_path):
    with ServeProcess(["--model", f"tiny={tiny_model_dirs['llama']}"], tmp_path / "server.log") as server:
        models = httpx.get(server.url + "/v1/models", timeout=10).json()["models"]
        assert [m["name"] for m in models] == ["tiny"]
        assert server.headers == {}
    assert server.proc.poll() is not None  # stopped on leaving the block
    assert "Application shutdown complete" in server.log_path.read_text()  # SIGTERM: a graceful stop


@pytest.mark.integration
def test_a_server_that_cannot_start_raises_with_its_log(tmp_path):
    with pytest.raises(RuntimeError, match=r"exited with [1-9][\s\S]*nothing to serve"):
        ServeProcess([], tmp_path / "server.log", startup_s=60)


@pytest.mark.integration
def test_a_server_that_never_answers_is_stopped_and_its_log_shown(tiny_model_dirs, tmp_path):
    # startup_s shorter than loading the model: the deadline path stops the child and still reads its log
    with pytest.raises(RuntimeError, match="did not answer /healthz within 0.01 s") as info:
        ServeProcess(["--model", f"tiny={tiny_model_dirs['llama']}"], tmp_path / "server.log", startup_s=0.01)
    assert "Traceback" not in str(info.value)
