"""Run every ``benchmarks/bench_*.py`` in turn, each in its own process (``make bench``).

``python -m benchmarks.run_all`` runs each at its own defaults (minutes each); ``--quick`` runs each at
the small shape in :data:`QUICK` (seconds each, the whole set in a few minutes on 2 CPU cores), which is
what ``tests/tools/test_benchmark_scripts.py`` runs so that no benchmark can rot. Quick figures only
show that a benchmark works: record real figures from a full run (``docs/benchmarks.md``). Any other
arguments go to every script.

``REFMODEL_BENCH_PYTHON`` (a command line) is the ``python`` each script runs with (default: this
interpreter); the suite sets it to a warm parent that forks each script (:mod:`refmodel.testing.warm`),
which spares each the imports of torch and transformers. Never for figures: a full run stays cold.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent

# Each script's quick shape, from its own flags. A new bench_*.py must add its row (run_all refuses otherwise).
QUICK: dict[str, list[str]] = {
    "bench_cache": ["--hidden", "64", "--layers", "2", "--cold-reps", "1"],
    # tiny shapes: the suite runs these (tests/tools/test_benchmark_scripts.py) to check that every code path
    # still runs, so each costs little more than its process start-ups
    "bench_logprobs": ["--quick", "--reps", "1", "--modes", "fwd_bwd_trainable_head",  # a subprocess per case
                       "--tokens", "128", "--hidden", "64", "--vocab", "1024"],
    "bench_policy_loss": ["--quick", "--reps", "1", "--tokens", "64", "--hidden", "64", "--vocab", "1024"],
    "bench_precompute": ["--pairs", "32", "--shots", "1", "--reps", "1", "--batch-size", "8"],
    "bench_ray_precompute": ["--pairs", "60", "--shard-examples", "20", "--hidden", "64", "--layers", "2"],
    "bench_ray_serve": ["--quick", "--replicas", "1", "--requests", "60"],  # each replica count deploys anew
    "bench_rl_reference": ["--hidden", "32", "--layers", "1", "--prompts", "2", "--generations", "2",
                           "--max-new-tokens", "4", "--reps", "1"],
    "bench_sequence_sums": ["--pairs", "20"],
    "bench_service": ["--quick", "--overhead-seq-lens", "128",  # its default 512 is past the tiny model's 256 positions
                      "--requests", "60", "--case-seconds", "0.2"],
    "bench_service_abuse": ["--quick", "--seconds", "3", "--unloaded-seconds", "1.5", "--slowloris", "10"],
    "bench_store": ["--n", "200"],
    "bench_store_integrity": ["--n", "200"],
    "bench_trl": ["--size", "tiny", "--steps", "2", "--warmup", "1", "--pairs", "8"],
}


def scripts() -> list[str]:
    """The benchmark modules, ``bench_*`` in ``benchmarks/``, sorted."""
    return sorted(p.stem for p in HERE.glob("bench_*.py"))


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    extra = [a for a in argv if a != "--quick"]
    names = scripts()
    if quick and (missing := [n for n in names if n not in QUICK]):
        sys.exit(f"benchmarks without a quick shape: {', '.join(missing)}; add their flags to QUICK in {__file__}")
    python = shlex.split(os.environ.get("REFMODEL_BENCH_PYTHON", "")) or [sys.executable]
    failed = []
    for name in names:
        args = [*(QUICK[name] if quick else []), *extra]
        print(f"\n=== {name} {' '.join(args)} ===", flush=True)
        start = time.perf_counter()
        if subprocess.run([*python, "-m", f"benchmarks.{name}", *args]).returncode:
            failed.append(name)
        print(f"=== {name}: {time.perf_counter() - start:.1f} s ===", flush=True)
    if failed:
        print(f"benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
