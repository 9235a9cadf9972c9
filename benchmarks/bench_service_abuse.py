"""The reference service under a mixed load: valid clients beside abusive ones (loopback only).

    python -m benchmarks.bench_service_abuse [--seconds 20] [--clients 8] [--slowloris 100] [--quick]

A real ``refmodel serve`` process (tiny Llama, 256 positions, auth on, default connection limits)
first serves ``--clients`` valid clients alone (closed loop, single-sequence binary requests, T=32)
for the unloaded p99; then the same clients again while another process runs, for ``--seconds``:
over-length clients (300-token sequences, past the model's 256 positions), oversized-header clients
(1 MiB header lines), unauthenticated clients sending 16 MiB bodies, and ``--slowloris`` connections
that trickle a request head a byte at a time (each reopened when the server closes it); and issue 25's:
pipeliners writing ``GET /healthz`` back to back without reading an answer, clients sending a 15 MiB
body to the open paths (``/healthz``, ``/openapi.json``), drippers (a ``GET`` whose 10^12-byte body comes
a byte every 0.5 s; a request followed by ``\r\n`` every 0.5 s) and authenticated clients sending a
16 MiB JSON body of 4.2 million one-token rows. All bounded in count; every abusive client sleeps a
little between attempts.

Printed: valid-client errors (target 0); p99 under abuse vs unloaded (target <= 3x); the server's RSS
at the start, its peak (sampled every 0.2 s) and the end (target: growth <= 64 MiB); what the abusive
clients got back.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import multiprocessing
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from refmodel.remote import wire
from refmodel.testing import ServeProcess, make_tiny_model
from refmodel.tools.bench import process_rss_mib, provenance

TOKEN = "bench-token"


def start_server(model_dir: Path, root: Path) -> ServeProcess:
    token_file = root / "token"
    token_file.write_text(TOKEN)
    return ServeProcess(["--model", f"tiny={model_dir}", "--token-file", token_file, "--torch-threads", 1],
                        token=TOKEN, startup_s=180)


async def _read_answer(reader) -> tuple[int, bytes]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed")
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return int(status_line.split()[1]), await reader.readexactly(length)


async def valid_clients(port: int, clients: int, seconds: float) -> dict:
    """``clients`` keep-alive connections sending single-sequence binary requests for ``seconds``."""
    rng = np.random.default_rng(0)
    bodies = [wire.encode_request("tiny", rng.integers(0, 95, (1, 32), dtype=np.int32)) for _ in range(64)]
    head = (f"POST /v1/logprobs:binary HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: {wire.CONTENT_TYPE}\r\n").encode()
    payloads = [head + f"Content-Length: {len(b)}\r\n\r\n".encode() + b for b in bodies]
    latencies: list[float] = []
    errors = collections.Counter()
    stop = time.monotonic() + seconds

    async def one(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < stop:
                start = time.perf_counter()
                writer.write(payloads[k % len(payloads)])
                k += clients
                try:
                    status, body = await _read_answer(reader)
                except (ConnectionError, asyncio.IncompleteReadError) as exc:
                    errors[type(exc).__name__] += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                if status != 200 or len(body) < 4 * 32:
                    errors[status] += 1
                latencies.append(time.perf_counter() - start)
        finally:
            writer.close()

    await asyncio.gather(*(one(i) for i in range(clients)))
    latencies.sort()
    return {"requests": len(latencies), "errors": sum(errors.values()), "error_kinds": dict(errors),
            "p50_ms": 1e3 * latencies[len(latencies) // 2],
            "p99_ms": 1e3 * latencies[max(0, int(len(latencies) * 0.99) - 1)]}


# ------------------------------------------------------------------------------------ the abusers
async def _attempt(port: int, data_parts, outcomes: collections.Counter, kind: str) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        outcomes[f"{kind}: connect failed"] += 1
        return
    try:
        try:
            for part in data_parts:
                writer.write(part)
                await writer.drain()
        except ConnectionError:
            pass  # the server answered early and closed while we were still sending: read its answer, as httpcore does
        status, _ = await asyncio.wait_for(_read_answer(reader), 30)
        outcomes[f"{kind}: {status}"] += 1
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
        outcomes[f"{kind}: {type(exc).__name__}"] += 1
    finally:
        writer.close()


async def _over_length(port: int, stop: float, outcomes) -> None:
    body = wire.encode_request("tiny", np.full((1, 300), 7, dtype=np.int32))
    head = (f"POST /v1/logprobs:binary HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    while time.monotonic() < stop:
        await _attempt(port, [head + body], outcomes, "over-length")
        await asyncio.sleep(0.05)


async def _big_header(port: int, stop: float, outcomes) -> None:
    chunk = b"a" * 65536
    while time.monotonic() < stop:
        parts = [b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: "] + [chunk] * 16 + [b"\r\n\r\n"]  # 1 MiB header
        await _attempt(port, parts, outcomes, "1 MiB header")
        await asyncio.sleep(0.1)


async def _unauthenticated_16mib(port: int, stop: float, outcomes) -> None:
    size = 16 * 2**20
    chunk = b" " * 2**20
    head = (f"POST /v1/logprobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n").encode()
    while time.monotonic() < stop:
        await _attempt(port, [head] + [chunk] * 16, outcomes, "unauthenticated 16 MiB")
        await asyncio.sleep(0.1)


async def _slowloris(port: int, stop: float, outcomes) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            outcomes["slowloris: connect failed"] += 1
            await asyncio.sleep(0.5)
            continue
        opened = time.monotonic()
        try:
            for byte in head:
                if time.monotonic() >= stop:
                    outcomes["slowloris: still open at the end"] += 1
                    break
                writer.write(bytes([byte]))
                try:
                    if await asyncio.wait_for(reader.read(1), 0.5) == b"":
                        outcomes["slowloris: closed by the server"] += 1
                        outcomes["slowloris: seconds held (sum)"] += round(time.monotonic() - opened)
                        break
                except asyncio.TimeoutError:
                    pass
        except ConnectionError:
            outcomes["slowloris: closed by the server"] += 1
        finally:
            writer.close()


async def _pipeliner(port: int, stop: float, outcomes) -> None:
    burst = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 4096  # 140 KiB of requests, answers never read
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            outcomes["pipeliner: connect failed"] += 1
            await asyncio.sleep(0.5)
            continue
        sent = 0
        try:
            while time.monotonic() < stop and sent < 64 * 2**20:
                writer.write(burst)
                await asyncio.wait_for(writer.drain(), 2.0)
                sent += len(burst)
            outcomes["pipeliner: still writing at the end"] += 1
        except asyncio.TimeoutError:
            outcomes["pipeliner: server stopped reading"] += 1
        except ConnectionError:
            outcomes["pipeliner: closed by the server"] += 1
        finally:
            outcomes["pipeliner: MiB written (sum)"] += sent >> 20
            writer.transport.abort()
        await asyncio.sleep(0.2)


async def _open_path_body(port: int, stop: float, outcomes) -> None:
    paths = ["/healthz", "/openapi.json"]
    k = 0
    while time.monotonic() < stop:
        head = (f"POST {paths[k % 2]} HTTP/1.1\r\nHost: x\r\nContent-Length: {15 * 2**20}\r\n\r\n").encode()
        await _attempt(port, [head, b"x" * 2**20], outcomes, "15 MiB body on an open path")  # the rest withheld
        k += 1
        await asyncio.sleep(0.1)


async def _drip(port: int, stop: float, outcomes, head: bytes, drop: bytes, kind: str) -> None:
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            outcomes[f"{kind}: connect failed"] += 1
            await asyncio.sleep(0.5)
            continue
        opened = time.monotonic()
        try:
            writer.write(head)
            while time.monotonic() < stop:
                writer.write(drop)
                await writer.drain()
                try:
                    await asyncio.wait_for(reader.read(), 0.5)  # to EOF: the server closed
                    outcomes[f"{kind}: closed by the server"] += 1
                    outcomes[f"{kind}: seconds held (sum)"] += round(time.monotonic() - opened)
                    break
                except asyncio.TimeoutError:
                    pass
            else:
                outcomes[f"{kind}: still open at the end"] += 1
        except ConnectionError:
            outcomes[f"{kind}: closed by the server"] += 1
        finally:
            writer.close()
        await asyncio.sleep(0.1)


async def _huge_json(port: int, stop: float, outcomes) -> None:
    rows = (16 * 2**20 - 64) // 4
    body = b'{"model": "tiny", "input_ids": [' + b"[1]," * (rows - 1) + b"[1]]}"
    head = (f"POST /v1/logprobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    while time.monotonic() < stop:
        await _attempt(port, [head, body], outcomes, "16 MiB JSON of 4.2M rows")
        await asyncio.sleep(0.5)


def _abuse(port: int, seconds: float, slowloris: int, queue) -> None:
    async def main():
        outcomes: collections.Counter = collections.Counter()
        stop = time.monotonic() + seconds
        tasks = [_over_length(port, stop, outcomes) for _ in range(4)]
        tasks += [_big_header(port, stop, outcomes) for _ in range(2)]
        tasks += [_unauthenticated_16mib(port, stop, outcomes) for _ in range(4)]
        tasks += [_slowloris(port, stop, outcomes) for _ in range(slowloris)]
        tasks += [_pipeliner(port, stop, outcomes) for _ in range(4)]
        tasks += [_open_path_body(port, stop, outcomes) for _ in range(8)]
        get_body = (f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                    "Content-Length: 1000000000000\r\n\r\n").encode()
        tasks += [_drip(port, stop, outcomes, get_body, b"1", "GET dripping a body") for _ in range(8)]
        tasks += [_drip(port, stop, outcomes, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"\r\n",
                        "CRLF between requests") for _ in range(8)]
        tasks += [_huge_json(port, stop, outcomes) for _ in range(2)]
        await asyncio.gather(*tasks)
        return outcomes

    queue.put(dict(asyncio.run(main())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=None, help="duration of the abusive phase (default 20)")
    parser.add_argument("--unloaded-seconds", type=float, default=None,
                        help="duration of the unloaded phase (default 8)")
    parser.add_argument("--clients", type=int, default=8, help="valid clients")
    parser.add_argument("--slowloris", type=int, default=None, help="slowloris connections (default 100)")
    parser.add_argument("--quick", action="store_true",
                        help="10 s of abuse, 4 s unloaded, 50 slowloris (unless given)")
    args = parser.parse_args()
    args.seconds = args.seconds or (10.0 if args.quick else 20.0)
    args.unloaded_seconds = args.unloaded_seconds or (4.0 if args.quick else 8.0)
    args.slowloris = args.slowloris or (50 if args.quick else 100)
    print(f"# reference service under abuse; {provenance()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model("llama", Path(tmp) / "llama")
        server = start_server(model_dir, Path(tmp))
        proc, port = server.proc, server.port
        try:
            asyncio.run(valid_clients(port, args.clients, 2.0))  # warm-up
            rss_start = process_rss_mib(proc.pid)
            unloaded = asyncio.run(valid_clients(port, args.clients, args.unloaded_seconds))
            queue = multiprocessing.get_context("spawn").Queue()
            abuser = multiprocessing.get_context("spawn").Process(
                target=_abuse, args=(port, args.seconds, args.slowloris, queue))
            abuser.start()
            time.sleep(1.0)  # the abusers are connected before the valid clients measure
            peak = [rss_start]
            sampling = threading.Event()

            def sample():
                while not sampling.wait(0.2):
                    peak[0] = max(peak[0], process_rss_mib(proc.pid))
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            loaded = asyncio.run(valid_clients(port, args.clients, args.seconds - 1.0))
            outcomes = queue.get(timeout=120)
            abuser.join(60)
            sampling.set()
            sampler.join()
            rss_peak = peak[0]
            time.sleep(1.0)
            rss_end = process_rss_mib(proc.pid)
            healthy = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code
        finally:
            server.stop(60)
    print(f"unloaded:    {args.clients} valid clients, {unloaded['requests']} requests, errors "
          f"{unloaded['errors']}, p50 {unloaded['p50_ms']:.1f} ms, p99 {unloaded['p99_ms']:.1f} ms", flush=True)
    print(f"under abuse: {args.clients} valid clients, {loaded['requests']} requests, errors {loaded['errors']} "
          f"{loaded['error_kinds'] or ''}, p50 {loaded['p50_ms']:.1f} ms, p99 {loaded['p99_ms']:.1f} ms", flush=True)
    for kind, count in sorted(outcomes.items()):
        print(f"  abusive {kind}: {count}")
    ratio = loaded["p99_ms"] / unloaded["p99_ms"]
    growth = max(rss_peak, rss_end) - rss_start
    print(f"valid-client errors under abuse: {loaded['errors']} (target 0); p99 {ratio:.2f}x unloaded "
          f"(target <= 3x); server RSS {rss_start:.0f} -> {rss_peak:.0f} (peak) -> {rss_end:.0f} MiB at the end, "
          f"growth {growth:+.0f} MiB (target <= 64); /healthz after: {healthy}", flush=True)
    ok = loaded["errors"] == 0 and ratio <= 3 and growth <= 64 and healthy == 200
    print(f"targets {'met' if ok else 'NOT met'}", flush=True)


if __name__ == "__main__":
    main()
