"""``refmodel serve --ray``: the Ray Serve deployment passes the service's client checks.

A module-scoped local Ray cluster (2 CPUs) runs Serve on a free loopback port with 2 replicas of the
tiny llama (0.5 CPU each) plus the tiny reward model; every check of ``service_checks.py`` runs
against it. The CLI test joins the same cluster with ``--ray-address`` (as against a real cluster).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from serve_helpers import MAIN_LIMITS, TOKEN, Endpoint, make_tiny_reward_model, write_token_file
from service_checks import ServiceClientChecks, random_rows

from refmodel import ReferenceClient
from refmodel.errors import RequestTooLarge, ServiceOverloaded
from refmodel.logprobs.model import model_logprobs
from refmodel.testing import free_port, load_tiny, run_cli, subprocess_env

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from refmodel.serve.batcher import Batcher, check_admission  # noqa: E402
from refmodel.serve.ray_serve import RayBatcher, deploy, padded_tokens  # noqa: E402
from refmodel.serve.settings import ServeSettings  # noqa: E402
from refmodel.serve.validate import Limits, check_sequences  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.integration]
REPLICA_TITLE = "ServeReplica:refmodel:ReferenceService"


@pytest.fixture(scope="module")
def tiny_reward_dir(tmp_path_factory):
    return make_tiny_reward_model(tmp_path_factory.mktemp("tiny_reward"))


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    model, _ = load_tiny(tiny_model_dirs["llama"])
    return model


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray cluster with Serve on a free loopback port; yields the proxy's URL."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = subprocess_env()["PYTHONPATH"]  # workers import this worktree's refmodel
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_model_dirs, tiny_reward_dir, tmp_path_factory):
    settings = ServeSettings(models={"tiny": str(tiny_model_dirs["llama"])}, reward_models={"rm": str(tiny_reward_dir)},
                             token_file=write_token_file(tmp_path_factory.mktemp("ray_server")), **MAIN_LIMITS)
    deploy(settings, replicas=2, num_cpus=0.5)
    return Endpoint(ray_cluster, TOKEN)


@pytest.mark.slow
class TestRayServe(ServiceClientChecks):
    """Every client-level check of ``refmodel serve`` against the Ray Serve deployment (2 replicas)."""


def _replica_cpu_s() -> dict[int, float]:
    """CPU seconds of every live replica process of the deployment (Linux /proc)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            if REPLICA_TITLE not in title:
                continue
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(pid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


@pytest.mark.slow
def test_both_replicas_serve_and_agree(server, llama):
    status = serve.status().applications["refmodel"].deployments["ReferenceService"]
    assert status.replica_states.get("RUNNING") == 2, status
    before = _replica_cpu_s()
    assert len(before) == 2, f"expected 2 replica processes, found {before}"
    rows = random_rows(32, seed=11, lo=8, hi=40)

    async def one_client(i):  # sustained load: 16 clients, 8 requests each, one at a time
        async with ReferenceClient(server.url, token=TOKEN) as client:
            return [(await client.acompute_log_probs("tiny", [rows[(i + k) % 32]]))[0] for k in range(8)]

    async def load():
        return await asyncio.gather(*(one_client(i) for i in range(16)))

    results = asyncio.run(load())
    for i, outs in enumerate(results):
        for k, got in enumerate(outs):
            with torch.no_grad():
                want = model_logprobs(llama, torch.tensor([rows[(i + k) % 32]]))[0]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    busy = {pid: cpu - before[pid] for pid, cpu in _replica_cpu_s().items() if pid in before}
    print("replica CPU seconds under load:", busy)
    share = min(busy.values()) / sum(busy.values())
    assert share > 0.15, f"Ray's router left a replica (nearly) idle: CPU seconds {busy}"


def test_padded_tokens_is_rows_times_longest():
    seqs = check_sequences([[1, 2, 3], [4], [5, 6, 7, 8, 9]], Limits(10, 64, 8))
    assert padded_tokens(seqs) == 3 * 5 and padded_tokens(seqs[1:2]) == 1


def test_ray_batcher_admission_without_a_replica():
    """Queue limits and shutdown answers are refmodel's own (no replica needed: nothing is batched)."""
    from concurrent.futures import ThreadPoolExecutor

    seqs = check_sequences([[1, 2, 3]] * 3, Limits(10, 64, 8))
    with ThreadPoolExecutor(1) as pool:
        batcher = RayBatcher("tiny", lambda batch: [len(s.ids) for s in batch], pool, max_batch_tokens=64,
                             max_wait_s=0.01, max_queue=2)
        assert isinstance(batcher, Batcher)  # the protocol the app takes

        async def scenario():
            with pytest.raises(ServiceOverloaded, match="shutting down") as stopped:
                await batcher.submit(seqs[:1], [3])
            assert stopped.value.status == 503
            batcher.start()
            # 3 sequences can never fit a queue of 2: refused at once (413 naming --max-queue), not "retry later"
            with pytest.raises(RequestTooLarge, match="has 3 sequences .* at most 2 .*--max-queue") as never:
                await batcher.submit(seqs, [3, 3, 3])
            assert never.value.status == 413 and batcher.depth == 0
            with pytest.raises(ServiceOverloaded, match="1 of 2 sequences admitted on this replica, this "
                                                        "request adds 2") as full:
                check_admission("tiny", True, 1, 2, 2, where=" on this replica")  # what a busy replica answers
            assert full.value.status == 429 and batcher.retry_after_s() == 1
            batcher.batching = False  # the no-batching baseline runs the request itself
            assert await batcher.submit(seqs[:2], [3, 3]) == [3, 3]
            await batcher.stop()

        asyncio.run(scenario())


def test_replicas_without_ray_is_a_usage_error():
    result = run_cli("serve", "--model", "tiny=/nowhere", "--replicas", "2", check=False)
    assert result.returncode == 2 and "--replicas needs --ray" in result.stderr
    result = run_cli("serve", "--model", "tiny=/nowhere", "--ray-address", "auto", check=False)
    assert result.returncode == 2 and "--ray-address needs --ray" in result.stderr


def test_a_missing_model_folder_is_refused_before_a_local_cluster_starts(monkeypatch):
    from refmodel.errors import ConfigError
    from refmodel.serve.ray_serve import run_ray_server

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    was_connected = ray.is_initialized()
    with pytest.raises(ConfigError, match=r"model folder\(s\) not found: \['/nowhere'\]"):
        run_ray_server(ServeSettings(models={"tiny": "/nowhere"}))
    assert ray.is_initialized() == was_connected  # no cluster was started for it


def test_import_refmodel_does_not_import_ray():
    code = "import sys, refmodel, refmodel.serve, refmodel.cli; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env=subprocess_env(), timeout=120)


@pytest.mark.slow
def test_cli_joins_an_existing_cluster_and_stops_on_sigterm(server, ray_cluster, tiny_model_dirs, tmp_path):
    """``refmodel serve --ray --ray-address ADDR`` redeploys onto the test cluster; SIGTERM deletes it.

    Runs last in this module: it replaces the ``refmodel`` application of the fixtures.
    """
    address = ray.get_runtime_context().gcs_address
    port = int(ray_cluster.rsplit(":", 1)[1])
    log_path = tmp_path / "cli.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "refmodel", "serve", "--ray", "--ray-address", address, "--replicas", "1",
             "--port", str(port), "--model", f"cli={tiny_model_dirs['llama']}"],
            stdout=log_file, stderr=subprocess.STDOUT, env=subprocess_env())
        try:
            deadline, served = time.monotonic() + 120, []
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    served = httpx.get(ray_cluster + "/healthz", timeout=2).json().get("models", [])
                except (httpx.HTTPError, ValueError):
                    pass
                if served == ["cli"]:
                    break
                time.sleep(0.5)
            assert served == ["cli"], log_path.read_text()
            with ReferenceClient(ray_cluster) as client:  # no token: auth is off for this deployment
                got = client.compute_log_probs("cli", [[2, 5, 6, 7]])[0]
            assert got.shape == (4,) and got[0] == 0 and (got[1:] < 0).all()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "refmodel" not in serve.status().applications, log_path.read_text()
