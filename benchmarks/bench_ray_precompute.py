"""Precompute throughput: the single-process job vs the same job on a local Ray cluster with 1 and 2 workers.

    python -m benchmarks.bench_ray_precompute [--pairs 1500] [--shard-examples 50] [--hidden 256 --layers 4]

Same model folder, same data, same settings, float32 storage; each row is the wall time of the whole
call (load + fingerprint + tokenize + plan + score + write), median of ``--reps``. The Ray rows include
starting the actors (each imports torch and loads the model) but not starting the cluster, which is
printed separately. A CPU Ray actor gets ``num_cpus=1`` and runs torch on one thread; the single-process
job runs once on all of torch's threads and once on one thread, and every Ray store is checked to be
byte-identical to the one-thread store (CPU GEMMs split their sums by thread count).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from refmodel.tools.bench import provenance


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != "writer.lock"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--shard-examples", type=int, default=50)
    parser.add_argument("--max-tokens-per-batch", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=384, help="hidden size of the random llama")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--reps", type=int, default=1)
    args, _ = parser.parse_known_args()  # run_all passes its own flags to every benchmark
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.disable(logging.WARNING)
    import ray

    from refmodel import precompute
    from refmodel.data import load_examples
    from refmodel.precompute.ray import precompute_on_ray
    from refmodel.testing import load_tiny, make_tiny_model, preference_pairs, write_jsonl

    tmp = Path(tempfile.mkdtemp())
    model_dir = make_tiny_model("llama", tmp / "model", hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                num_hidden_layers=args.layers)
    data = write_jsonl(preference_pairs(args.pairs, seed=11), tmp / "pairs.jsonl")
    _, tok = load_tiny(model_dir)
    tokens = sum(len(s) for ex in load_examples(data, tok) for s, _ in ex.sequences())
    settings = {"dtype": "float32", "max_tokens_per_batch": args.max_tokens_per_batch,
                "shard_examples": args.shard_examples, "progress": False}
    print(f"# ray precompute: {args.pairs} pairs, {tokens} tokens, random llama hidden={args.hidden} "
          f"layers={args.layers}, shards of {args.shard_examples} pairs, {os.cpu_count()} cores")
    print(f"# {provenance()}")

    def timed(fn, name):
        times = []
        for rep in range(args.reps):
            t0 = time.perf_counter()
            fn(tmp / f"{name}-{rep}")
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    threads = torch.get_num_threads()
    rows = {f"single, {threads} threads": timed(lambda out: precompute(model_dir, data, out, **settings), "single")}
    torch.set_num_threads(1)
    rows["single, 1 thread"] = timed(lambda out: precompute(model_dir, data, out, **settings), "one")
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.ERROR,
             object_store_memory=300 * 1024**2, runtime_env={"py_modules": [__import__("refmodel")]})
    print(f"# local Ray cluster started in {time.perf_counter() - t0:.1f}s (not in the rows)")
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        for workers in (1, 2):
            rows[f"ray, {workers} worker(s)"] = timed(
                lambda out, w=workers: precompute_on_ray(model_dir, data, out, num_workers=w, **settings),
                f"ray{workers}")
    finally:
        ray.shutdown()
    want = _files(tmp / "one-0")
    same = all(_files(p) == want for p in tmp.iterdir() if p.name.startswith("ray"))
    base = rows[f"single, {threads} threads"]
    print(f"{'case':<22}{'seconds':>10}{'tokens/s':>12}{'speed vs single':>17}")
    for name, secs in rows.items():
        print(f"{name:<22}{secs:>10.2f}{tokens / secs:>12.0f}{base / secs:>16.2f}x")
    print(f"Ray stores byte-identical to the 1-thread single-process store: {same}")


if __name__ == "__main__":
    main()
