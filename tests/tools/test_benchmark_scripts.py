"""Every benchmark script under benchmarks/ imports and explains its flags (``--help``).

A benchmark is run by a command, not by the suite, but one that cannot even start (a name another module
no longer has) breaks ``make bench`` for everybody: this catches that in the suite. One child process
runs every script as ``python -m`` would, with ``--help`` (one torch import instead of one per script).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from refmodel.testing.processes import subprocess_env
from refmodel.testing.warm import start

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py"))

CHILD = r"""
import contextlib, io, json, runpy, sys
results = {}
for name in sys.argv[1:]:
    out = io.StringIO()
    try:
        sys.argv = [name, "--help"]
        with contextlib.redirect_stdout(out):  # what `python -m benchmarks.NAME --help` runs
            runpy.run_module(f"benchmarks.{name}", run_name="__main__", alter_sys=True)
        results[name] = "returned without printing --help"
    except SystemExit as exit_:
        results[name] = "ok" if exit_.code in (0, None) and "usage:" in out.getvalue() else f"exit {exit_.code}"
    except Exception as exc:
        results[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps(results))
"""


def test_every_benchmark_starts_and_explains_its_flags():
    assert "bench_logprobs" in SCRIPTS and "bench_ray_serve" in SCRIPTS
    done = subprocess.run([sys.executable, "-c", CHILD, *SCRIPTS], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert {name: why for name, why in results.items() if why != "ok"} == {}
    assert sorted(results) == SCRIPTS


def test_every_benchmark_has_a_quick_shape():
    from benchmarks.run_all import QUICK, scripts

    assert sorted(QUICK) == scripts() == SCRIPTS


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.ray  # bench_ray_precompute and bench_ray_serve start a local Ray cluster
def test_every_benchmark_runs_quick(tmp_path):
    # `make bench-quick`: each script at its small shape, each in its own process (`make bench` crashed on a
    # script that imported names another no longer had): a child forked from one warm parent that has
    # imported torch, transformers and TRL (refmodel.testing.warm), not a fresh interpreter each, since
    # process start-up was most of the time (the scripts' own per-case children stay fresh). A few
    # minutes on 2 idle cores; 15+ min when the cores are shared.
    env = subprocess_env(OMP_NUM_THREADS="1")
    warm = start(tmp_path, env)
    try:
        done = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--quick"], cwd=ROOT, capture_output=True,
                              text=True, timeout=2400, env={**env, "REFMODEL_BENCH_PYTHON": shlex.join(warm.command)})
    finally:
        warm.stop()
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    finished = re.findall(r"^=== (bench_\w+): [\d.]+ s ===$", done.stdout, re.M)
    assert finished == SCRIPTS


def test_a_benchmark_prints_no_import_notices(tmp_path):
    # transformers imports torchao and DeepSpeed (when installed) with its modeling code; their notices about
    # kernels this machine lacks, and save_pretrained's bar for the tiny model's one shard, were the first
    # lines of every benchmark's output
    code = ("import sys, benchmarks; from refmodel.testing import make_tiny_model; "
            "print(make_tiny_model('llama', sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tiny")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == f"{tmp_path / 'tiny'}\n"
    noise = re.compile(r"Failed to load|Setting accelerator|_pytree|Writing model shards|Detected no triton")
    assert noise.search(done.stderr) is None, done.stderr[-2000:]
