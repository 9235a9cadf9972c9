"""Reference-service benchmark on loopback: dynamic batching vs none, and service vs in-process.

    python -m benchmarks.bench_service [--requests 2000] [--clients 32] [--seq-len 32] [--quick]

1. Load: ``--clients`` concurrent async clients each send single-sequence requests (binary form)
   until ``--requests`` are done, against a server with dynamic batching and against one with
   ``--no-batching``, ``--rounds`` passes each, alternating; prints the median pass's throughput, p50/p99
   latency, errors and the server's RSS before/after, and the ratio per round.
2. Overhead: the same ``[B, T]`` batch (B = 8 and 32) through ``ReferenceClient`` vs
   ``model_logprobs`` in this process (in a worker thread, as in the server; medians and minima of
   interleaved repeats); the ratio is the service's overhead.

Both ratios come from the same run and machine (printed provenance line).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

from refmodel import ReferenceClient, model_logprobs
from refmodel.models.cache import load_reference_model
from refmodel.remote import wire
from refmodel.testing import ServeProcess, make_tiny_model
from refmodel.tools.bench import process_rss_mib, provenance


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _serve(model_dir: Path, *flags: str) -> ServeProcess:
    return ServeProcess(["--model", f"tiny={model_dir}", "--max-queue", 100000, "--torch-threads",
                         torch.get_num_threads(), *flags], startup_s=180)


def _rows(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(95) for _ in range(length)] for _ in range(n)]


async def _load(url: str, clients: int, requests: int, rows: list[list[int]]) -> dict:
    """``clients`` keep-alive connections, each sending single-sequence binary requests in turn.

    A minimal HTTP/1.1 client on asyncio streams with pre-encoded requests: the load generator shares
    the machine with the server, so it must cost little CPU per request (httpx costs ~1 ms). Every
    answer is parsed and its status and body length checked; ``ReferenceClient`` itself is exercised
    by the overhead part and by the tests.
    """
    host, port = url.removeprefix("http://").split(":")
    bodies = [wire.encode_request("tiny", np.asarray([r], dtype=np.int32)) for r in rows]
    head = f"POST /v1/logprobs:binary HTTP/1.1\r\nHost: {host}\r\nContent-Type: {wire.CONTENT_TYPE}\r\n"
    payloads = [(head + f"Content-Length: {len(b)}\r\n\r\n").encode() + b for b in bodies]
    latencies: list[float] = []
    errors = 0
    counter = iter(range(requests))

    async def one() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for k in counter:
                start = time.perf_counter()
                writer.write(payloads[k % len(payloads)])
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length)
                if not status_line.startswith(b"HTTP/1.1 200") or len(body) < 4 * len(rows[k % len(rows)]):
                    errors += 1
                latencies.append(time.perf_counter() - start)
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(clients)))
    wall = time.perf_counter() - start
    latencies.sort()
    return {"rps": requests / wall, "p50_ms": 1e3 * latencies[len(latencies) // 2],
            "p99_ms": 1e3 * latencies[int(len(latencies) * 0.99) - 1], "errors": errors}


def _measure(server: ServeProcess, clients: int, requests: int, rows: list[list[int]]) -> dict:
    """One load pass against ``server``: throughput, latency, errors, RSS and CPU per request."""
    rss_before, cpu_before, own_before = process_rss_mib(server.proc.pid), _cpu_s(server.proc.pid), time.process_time()
    res = asyncio.run(_load(server.url, clients, requests, rows))
    res["rss_before_mib"], res["rss_after_mib"] = rss_before, process_rss_mib(server.proc.pid)
    res["server_cpu_ms"] = 1e3 * (_cpu_s(server.proc.pid) - cpu_before) / requests
    res["client_cpu_ms"] = 1e3 * (time.process_time() - own_before) / requests
    return res


def bench_load(model_dir: Path, clients: int, requests: int, seq_len: int, max_wait_ms: float,
               rounds: int = 3) -> dict:
    """Both servers up at once and ``rounds`` passes of each, alternating, so that a drift in the shared
    machine's speed falls on both; each configuration's figures are those of its median-throughput pass."""
    rows = _rows(256, seq_len)
    flags = {"batching": ["--max-wait-ms", str(max_wait_ms)], "no-batching": ["--no-batching"]}
    servers: dict[str, ServeProcess] = {}
    passes: dict[str, list[dict]] = {name: [] for name in flags}
    try:
        for name, extra in flags.items():
            servers[name] = _serve(model_dir, *extra)
            asyncio.run(_load(servers[name].url, clients, min(200, requests), rows))  # warm-up
        for _ in range(rounds):
            for name, server in servers.items():
                passes[name].append(_measure(server, clients, requests, rows))
        mean_batch = {}
        for name, server in servers.items():
            metrics = httpx.get(server.url + "/metrics").text
            size = {k: float(line.split()[-1]) for line in metrics.splitlines()
                    for k in ("sum", "count") if line.startswith(f'refmodel_batch_size_{k}{{')}
            mean_batch[name] = size["sum"] / size["count"]
    finally:
        for server in servers.values():
            server.stop()
    results = {}
    for name, runs in passes.items():
        res = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
        res["mean_batch"], res["rps_passes"] = mean_batch[name], [r["rps"] for r in runs]
        results[name] = res
        print(f"{name:<12} clients={clients} requests={requests} T={seq_len}: {res['rps']:8.1f} req/s  "
              f"p50 {res['p50_ms']:6.1f} ms  p99 {res['p99_ms']:6.1f} ms  errors {sum(r['errors'] for r in runs)}  "
              f"mean batch {res['mean_batch']:5.1f}  CPU/request server {res['server_cpu_ms']:.2f} ms "
              f"client {res['client_cpu_ms']:.2f} ms  server RSS {res['rss_before_mib']:.0f} -> "
              f"{res['rss_after_mib']:.0f} MiB  (median of {rounds} passes: "
              f"{', '.join(f'{r:.0f}' for r in res['rps_passes'])} req/s)", flush=True)
    ratio = results["batching"]["rps"] / results["no-batching"]["rps"]
    per_round = [b / n for b, n in zip(results["batching"]["rps_passes"], results["no-batching"]["rps_passes"], strict=True)]
    cpu_ratio = results["no-batching"]["server_cpu_ms"] / results["batching"]["server_cpu_ms"]
    print(f"throughput ratio batching / no-batching: {ratio:.2f}x (target >= 4x; per round "
          f"{', '.join(f'{r:.2f}x' for r in per_round)}); server CPU per request ratio no-batching / batching: "
          f"{cpu_ratio:.2f}x", flush=True)
    return results


def bench_overhead(model_dir: Path, seq_lens: tuple[int, ...], batches: tuple[int, ...], reps: int,
                   case_s: float = 4.0) -> None:
    """Service vs in-process on the same batch. The in-process call runs, and is timed, inside a worker
    thread like the server's model: on the main thread glibc's main malloc arena gives memory back and
    faults it in again, which measured ~5% slower at [32, 512] and would flatter the service."""
    model = load_reference_model(model_dir)
    server = _serve(model_dir, "--max-wait-ms", "0")
    worker = ThreadPoolExecutor(1)
    try:
        with ReferenceClient(server.url, timeout_s=60) as client:
            for seq_len, batch in ((t, b) for t in seq_lens for b in batches):
                ids = torch.tensor(_rows(batch, seq_len, seed=batch))

                def compute(ids=ids) -> float:
                    start = time.perf_counter()
                    with torch.inference_mode():
                        model_logprobs(model, ids)
                    return time.perf_counter() - start

                def local() -> float:
                    return worker.submit(compute).result()  # the thread hop is not timed

                def remote(ids=ids) -> float:
                    start = time.perf_counter()
                    client.compute_log_probs("tiny", ids)
                    return time.perf_counter() - start

                warm = {fn: min(fn() for _ in range(3)) for fn in (local, remote)}
                # At least `reps` pairs, more for cheap batches (~case_s per case): tighter medians.
                pairs = max(reps, int(case_s / (warm[local] + warm[remote])))
                times = {local: [], remote: []}
                for _ in range(pairs):  # interleaved, so both see the same machine load
                    for fn in (local, remote):
                        times[fn].append(fn())
                t_local, t_remote = statistics.median(times[local]), statistics.median(times[remote])
                # The minimum is the noise-free cost (load only ever adds time); both are printed.
                m_local, m_remote = min(times[local]), min(times[remote])
                print(f"overhead B={batch:<3} T={seq_len} ({pairs} pairs): in-process {1e3 * t_local:7.2f} ms  service "
                      f"{1e3 * t_remote:7.2f} ms  overhead {100 * (t_remote / t_local - 1):+6.1f}% (medians), "
                      f"{100 * (m_remote / m_local - 1):+6.1f}% (minima: {1e3 * m_local:.2f} vs "
                      f"{1e3 * m_remote:.2f} ms)  (target < 20% at B >= 8)", flush=True)
    finally:
        worker.shutdown()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=None, help="load requests (default 2000; --quick 300)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent load clients (keep-alive connections)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternating load passes per server; the median pass counts (default 5; --quick 1)")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per load request (one sequence)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="the batching server's --max-wait-ms (its default)")
    parser.add_argument("--overhead-seq-lens", default="128,512",
                        help="comma-separated sequence lengths of the overhead comparison")
    parser.add_argument("--reps", type=int, default=None,
                        help="minimum interleaved repeats per overhead case (default 40; --quick 5)")
    parser.add_argument("--case-seconds", type=float, default=4.0,
                        help="cheap overhead cases get more repeats, up to about this many seconds each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and in the server")
    parser.add_argument("--quick", action="store_true", help="300 requests, 5 repeats (unless given)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.requests = args.requests or (300 if args.quick else 2000)
    args.reps = args.reps or (5 if args.quick else 40)
    args.rounds = args.rounds or (1 if args.quick else 5)
    print(f"# reference service benchmark; {provenance()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        # positions for the longest overhead row (the tiny config's default, 256, refused T=512 with a 422)
        positions = max(256, args.seq_len, *(int(t) for t in args.overhead_seq_lens.split(",")))
        model_dir = make_tiny_model("llama", Path(tmp) / "llama", max_position_embeddings=positions)
        bench_load(model_dir, args.clients, args.requests, args.seq_len, args.max_wait_ms, args.rounds)
        bench_overhead(model_dir, tuple(int(t) for t in args.overhead_seq_lens.split(",")), (8, 32), args.reps, args.case_seconds)


if __name__ == "__main__":
    main()
