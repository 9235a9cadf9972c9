"""Store vs a HALOs-style pickled dict of the same entries.

    python -m benchmarks.bench_store [--n 5000]

Per format: bytes on disk per stored token, time to open, RSS growth after open (each in a fresh
subprocess), and the median time to read a random padded batch of 64 sequences into a [64, T] tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from refmodel.tools.bench import provenance


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        t = int(rng.integers(64, 513))
        prompt = int(rng.integers(16, t // 2))
        ids = rng.integers(0, 32000, t).astype(np.int64)
        logprobs = np.zeros(t, np.float32)
        logprobs[prompt:] = -rng.exponential(2.0, t - prompt).astype(np.float32)
        yield ids, logprobs, np.arange(t) >= prompt


def build(root: Path, n: int) -> dict:
    from refmodel.store import LogprobStore

    halos, tokens, seq_tokens = {}, 0, 0
    with LogprobStore.create(root / "store", "bench", dtype="bfloat16", shard_entries=4096) as store:
        for ids, logprobs, mask in _data(n):
            store.put(ids, logprobs, mask)
            halos[tuple(ids.tolist())] = torch.from_numpy(logprobs[1:].copy())  # HALOs: tensor per sequence
            tokens += int(mask.sum())
            seq_tokens += len(ids)
    with open(root / "halos.pkl", "wb") as fh:
        pickle.dump(halos, fh)
    store_bytes = sum(p.stat().st_size for p in (root / "store").iterdir())
    return {"scored_tokens": tokens, "seq_tokens": seq_tokens, "store_bytes": store_bytes, "halos_bytes": (root / "halos.pkl").stat().st_size}


def measure(kind: str, root: Path, n: int) -> dict:
    """Run in a fresh process: open time, RSS growth, batch-64 read time."""
    batches = []
    rng = np.random.default_rng(1)
    seqs = [ids for ids, _, _ in _data(n)]
    for _ in range(30):
        rows = [seqs[i] for i in rng.choice(n, 64, replace=False)]
        t = max(len(r) for r in rows)
        ids = torch.zeros(64, t, dtype=torch.long)
        attn = torch.zeros(64, t, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :len(r)], attn[b, :len(r)] = torch.from_numpy(r), 1
        batches.append((ids, attn))
    del seqs
    base = _rss()
    start = time.perf_counter()
    if kind == "store":
        from refmodel.store import LogprobStore

        store = LogprobStore.open(root / "store", "bench")
        open_s = time.perf_counter() - start

        def read(ids, attn):
            return store.get_batch(ids, attn)
    else:
        with open(root / "halos.pkl", "rb") as fh:
            cache = pickle.load(fh)
        open_s = time.perf_counter() - start

        def read(ids, attn):
            out = torch.zeros(ids.shape)
            for b in range(ids.shape[0]):
                real = ids[b][attn[b].bool()]
                out[b, 1:len(real)] = cache[tuple(real.tolist())][: len(real) - 1]
            return out
    rss = _rss() - base
    read(*batches[0])  # warm-up (maps the shards' pages for the store)
    times = []
    for ids, attn in batches[1:]:
        t0 = time.perf_counter()
        read(ids, attn)
        times.append(time.perf_counter() - t0)
    return {"open_s": open_s, "rss_after_open": rss, "batch64_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5000)
    args = parser.parse_args()
    print(f"# store vs HALOs pickle: n={args.n} sequences, 64-512 tokens, bf16 store")
    print(f"# {provenance()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sizes = build(root, args.n)
        res = {}
        for kind in ("store", "halos"):
            proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_store", "--measure", kind, str(root),
                                   str(args.n)], capture_output=True, text=True, check=True)
            res[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    for kind in ("store", "halos"):
        res[kind]["bytes_per_token"] = sizes[f"{kind}_bytes"] / sizes["scored_tokens"]
        res[kind]["bytes_per_seq_token"] = sizes[f"{kind}_bytes"] / sizes["seq_tokens"]
    print(f"{'format':<8}{'B/scored tok':>14}{'B/seq tok':>11}{'open ms':>10}{'RSS after open MiB':>20}"
          f"{'batch-64 read ms':>18}")
    for kind in ("store", "halos"):
        r = res[kind]
        print(f"{kind:<8}{r['bytes_per_token']:>14.2f}{r['bytes_per_seq_token']:>11.2f}{r['open_s'] * 1e3:>10.2f}"
              f"{r['rss_after_open'] / 2**20:>20.1f}{r['batch64_s'] * 1e3:>18.3f}")
    print(f"store index: {(sizes['store_bytes'] - 2 * sizes['scored_tokens']) / args.n:.0f} B per entry "
          "(key 16 + meta 20 + sum 4 + file header), values 2 B per scored token")
    s, h = res["store"], res["halos"]
    print(f"ratios halos/store: bytes {h['bytes_per_token'] / s['bytes_per_token']:.1f}x, open "
          f"{h['open_s'] / s['open_s']:.0f}x, RSS {h['rss_after_open'] / max(s['rss_after_open'], 4096):.0f}x, "
          f"batch read {h['batch64_s'] / s['batch64_s']:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        print(json.dumps(measure(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))))
    else:
        main()
