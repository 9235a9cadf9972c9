"""``python -m benchmarks.gpu``: its argument and shape errors, its message on a machine without CUDA, and a dry run
of every code path at tiny shapes on CPU (``--device cpu --quick``). The GPU figures themselves come from running it
on a GPU (docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refmodel.testing.processes import subprocess_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def gpu_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks.gpu as module
    return module


@pytest.mark.parametrize("argv,message", [
    (["--tokens", "0"], "--tokens must be a positive integer"),
    (["--hidden", "-3"], "--hidden must be a positive integer"),
    (["--vocab", "0"], "--vocab must be a positive integer"),
    (["--tokens", "1000", "--seq-len", "300"], "must be a multiple of --seq-len"),
    (["--parts", "head,bogus"], "unknown ['bogus']"),
    (["--dtype", "int8"], "invalid choice"),
    (["--device", "tpu"], "invalid choice"),
])
def test_bad_arguments_exit_with_a_message(gpu_bench, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        gpu_bench.parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults_are_the_llama3_8b_head_and_quick_is_tiny(gpu_bench):
    args = gpu_bench.parse_args([])
    assert (args.device, args.dtype, args.hidden, args.vocab, args.tokens) == ("cuda", "bfloat16", 4096, 128256, 8192)
    quick = gpu_bench.parse_args(["--device", "cpu", "--quick", "--parts", "head"])
    assert (quick.hidden, quick.vocab, quick.tokens, quick.parts) == (64, 1000, 64, ("head",))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the message is for machines without")
def test_without_cuda_it_exits_with_a_clear_message(gpu_bench):
    with pytest.raises(SystemExit) as exit_:
        gpu_bench.main([])
    message = str(exit_.value.code)  # sys.exit(message): printed to stderr, exit status 1
    assert "needs a CUDA GPU" in message and "--device cpu --quick" in message


@pytest.mark.slow
@pytest.mark.integration
def test_cpu_dry_run_exercises_every_part(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--quick", "--reps", "1",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=subprocess_env())
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    seen = {(r["part"], r["mode"], r["impl"]) for r in rows}
    for mode in ("fwd", "frozen", "trainable"):
        assert {("head", mode, "refmodel"), ("head", mode, "naive")} <= seen
    assert {("policy", "frozen", "fused"), ("policy", "trainable", "fused"), ("policy", "trainable", "unfused")} <= seen
    assert ("precompute", "fwd", "refmodel") in seen
    assert all(r["ms"] > 0 and r["units"] > 0 for r in rows)
    assert "matmul unit" in done.stdout and "pairs/s" in done.stdout
