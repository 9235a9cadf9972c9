"""Run every ``benchmarks/bench_*.py`` in turn (each in its own process); extra args go to each."""

import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":
    failed = []
    for path in sorted(Path(__file__).parent.glob("bench_*.py")):
        print(f"\n=== {path.stem} ===", flush=True)
        if subprocess.run([sys.executable, "-m", f"benchmarks.{path.stem}", *sys.argv[1:]]).returncode:
            failed.append(path.stem)
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")
