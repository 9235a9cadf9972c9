"""Ray Serve deployment vs ``refmodel serve``: throughput of concurrent clients on loopback.

    python -m benchmarks.bench_ray_serve [--requests 1000] [--clients 32] [--seq-len 32] [--quick]

The same load (``--clients`` async clients sending single-sequence binary requests until
``--requests`` are done; a warm-up run first) against: the plain ``refmodel serve`` process (uvicorn,
dynamic batching), then a local Ray cluster with Serve and 1, then 2 replicas of the same model
(``@serve.batch`` token budget), and the largest count again with refmodel's own ``LocalBatcher`` in
the replicas (same token budget, batches closed when the model is free). Every replica and the plain server use ``--threads`` torch threads.
One line per case with throughput, p50/p99 latency, errors and the ratio to the plain server, all from
the same run; the provenance line names the machine. On a box with few cores the clients, Ray's
HTTP proxy and the replicas share them, so this measures overhead more than scale-out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

import httpx
import torch

from benchmarks.bench_service import _cpu_s, _load, _rows, _serve
from refmodel.testing import free_port, make_tiny_model
from refmodel.tools.bench import provenance

SRC = Path(__file__).resolve().parents[1] / "src"


def _line(name: str, res: dict, base: float | None) -> str:
    ratio = f"{res['rps'] / base:5.2f}x" if base else "    - "
    return (f"{name:<27} {res['rps']:8.1f} req/s  ratio {ratio}  p50 {res['p50_ms']:6.1f} ms  "
            f"p99 {res['p99_ms']:6.1f} ms  errors {res['errors']}  mean batch {res['mean_batch']:5.1f}  "
            f"server CPU/request {res['cpu_ms']:.2f} ms (HTTP proxy {res['proxy_ms']:.2f} ms)")


def _pids_titled(marker: bytes) -> list[int]:
    """Processes whose command line holds ``marker`` (Ray names its actor processes ``ray::Class``)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if marker in title:
            pids.append(int(pid))
    return pids


def _mean_batch(url: str) -> float:
    """Mean sequences per model call from one server's (or one replica's) /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    size = {k: float(line.split()[-1]) for line in text.splitlines()
            for k in ("sum", "count") if line.startswith(f'refmodel_batch_size_{k}{{')}
    return size["sum"] / size["count"] if size.get("count") else float("nan")


def _cpu_total(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += _cpu_s(pid)
        except OSError:
            pass
    return total


def bench(model_dir: Path, clients: int, requests: int, seq_len: int, max_wait_ms: float, threads: int,
          replica_counts: tuple[int, ...]) -> dict:
    rows = _rows(256, seq_len)
    results: dict[str, dict] = {}

    def run_load(url: str, pids: list[int], proxy_pids: list[int]) -> dict:
        asyncio.run(_load(url, clients, min(200, requests), rows))  # warm-up
        before, proxy_before = _cpu_total(pids), _cpu_total(proxy_pids)
        res = asyncio.run(_load(url, clients, requests, rows))
        res["cpu_ms"] = 1e3 * (_cpu_total(pids) - before) / requests
        res["proxy_ms"] = 1e3 * (_cpu_total(proxy_pids) - proxy_before) / requests
        res["mean_batch"] = _mean_batch(url)
        return res

    server = _serve(model_dir, "--max-wait-ms", str(max_wait_ms))
    try:
        results["refmodel serve"] = run_load(server.url, [server.proc.pid], [])
    finally:
        server.stop()
    base = results["refmodel serve"]["rps"]
    print(_line("refmodel serve", results["refmodel serve"], None), flush=True)

    import ray
    from ray import serve

    from refmodel.serve.ray_serve import deploy
    from refmodel.serve.settings import ServeSettings

    # Ray workers import refmodel from this checkout's src/, whatever the driver's sys.path says.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=200 * 1024**2,
             logging_level="WARNING", log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    settings = ServeSettings(models={"tiny": str(model_dir)}, max_wait_ms=max_wait_ms, max_queue=100000,
                             torch_threads=threads)
    try:
        cases = [(n, True) for n in replica_counts] + [(max(replica_counts), False)]
        for replicas, serve_batch in cases:
            deploy(settings, replicas=replicas, num_cpus=min(1.0, os.cpu_count() / replicas), serve_batch=serve_batch)
            name = f"ray, {replicas} replica{'s' if replicas > 1 else ''}" + ("" if serve_batch else ", LocalBatcher")
            proxy = _pids_titled(b"ProxyActor")
            results[name] = run_load(f"http://127.0.0.1:{port}", proxy + _pids_titled(b"ServeReplica:refmodel"),
                                     proxy)
            print(_line(name, results[name], base), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=None, help="load requests (default 1000; --quick 300)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server / replica")
    parser.add_argument("--replicas", default="1,2", help="comma-separated replica counts to measure")
    parser.add_argument("--quick", action="store_true", help="300 requests (unless --requests)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.requests = args.requests or (300 if args.quick else 1000)
    counts = tuple(int(n) for n in args.replicas.split(","))
    print(f"# Ray Serve benchmark: {args.clients} clients, {args.requests} single-sequence requests, "
          f"T={args.seq_len}, max_wait_ms={args.max_wait_ms}, {args.threads} torch thread(s) per server; "
          f"{provenance()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        bench(make_tiny_model("llama", Path(tmp) / "llama"), args.clients, args.requests, args.seq_len,
              args.max_wait_ms, args.threads, counts)


if __name__ == "__main__":
    main()
