"""What the store's integrity checks cost, and what a hostile HALOs pickle costs to refuse.

    python -m benchmarks.bench_store_integrity [--n 5000]

1. ``LogprobStore.problems()`` (what ``store verify`` and every ``precompute --resume`` run): time per
   entry on a bf16 store of ``n`` sequences of 256 tokens (192 scored), beside the time to write it.
2. A pickle of shared nested lists (a few bytes per level, 10**7 floats when expanded): peak RSS
   growth of ``import_halos`` in a fresh subprocess, the error it raises, and whether a store is left.
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from refmodel.store import LogprobStore
from refmodel.tools.bench import provenance

HOSTILE = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    from refmodel.store.interop import import_halos
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        import_halos(sys.argv[1], sys.argv[2], "fp")
        err = "none"
    except Exception as exc:
        err = type(exc).__name__
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps({"grew_mib": grew, "error": err, "store_left": Path(sys.argv[2]).exists()}))
""")


def verify_cost(root: Path, n: int) -> dict:
    rng = np.random.default_rng(0)
    t = 256
    start = time.perf_counter()
    with LogprobStore.create(root / "s", "fp", dtype="bfloat16", shard_entries=1000) as store:
        for _ in range(n):
            store.put(rng.integers(0, 32000, t), -rng.random(t).astype(np.float32), np.arange(t) >= 64)
    write_s = time.perf_counter() - start
    store = LogprobStore.open(root / "s")
    start = time.perf_counter()
    problems = store.problems()
    check_s = time.perf_counter() - start
    assert problems == [], problems
    return {"write_s": write_s, "check_s": check_s, **store.info()}


def hostile(root: Path, depth: int = 7) -> dict:
    x: list = [0.5]
    for _ in range(depth):
        x = [x] * 10
    pkl = root / "hostile.pkl"
    pkl.write_bytes(pickle.dumps({(1, 2, 3): x}))
    proc = subprocess.run([sys.executable, "-c", HOSTILE, str(pkl), str(root / "h")], capture_output=True,
                          text=True, check=True)
    return {"pickle_bytes": pkl.stat().st_size, "floats": 10**depth, **json.loads(proc.stdout.splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5000)
    args = parser.parse_args()
    print(f"# {provenance()}")
    with tempfile.TemporaryDirectory() as tmp:
        v = verify_cost(Path(tmp), args.n)
        h = hostile(Path(tmp))
    print(f"problems()/verify: {v['entries']} entries, {v['tokens']} stored tokens, {v['bytes'] / 2**20:.1f} MiB "
          f"in {v['check_s'] * 1e3:.0f} ms ({v['check_s'] / v['entries'] * 1e6:.1f} us/entry; writing took "
          f"{v['write_s'] * 1e3:.0f} ms, ratio {v['check_s'] / v['write_s']:.2f}x)")
    print(f"hostile HALOs pickle: {h['pickle_bytes']} B -> {h['floats']:.0e} floats if expanded; peak RSS "
          f"+{h['grew_mib']:.1f} MiB, raised {h['error']}, store left behind: {h['store_left']}")


if __name__ == "__main__":
    main()
