"""Precompute split over the ranks of a launcher: ``torchrun --nproc_per_node 2`` (gloo, CPU) against one process.

Equality is exact (every file's bytes): each rank scores the plan's shards with the same calls as one
process, on one torch thread like the single-process reference here (CPU GEMMs split their sums by
thread count). Which rank scored which shard is counted from the per-shard INFO log line (``-v``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from refmodel.errors import ConfigError
from refmodel.precompute.config import PrecomputeConfig
from refmodel.precompute.job import precompute
from refmodel.precompute.ranks import EXIT_AFTER_ENV, Ranks, launcher_ranks
from refmodel.testing import builtin_dataset_path, free_port, run_cli, subprocess_env

SETTINGS = {"shard_examples": 100, "dtype": "float32"}  # the built-in data: 25 shards
FLAGS = ["--shard-examples", "100", "--dtype", "float32"]
WROTE = re.compile(r"precompute \(rank (\d) of 2\): wrote shard (\d+) ")


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _torchrun(*args, **env) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node 2 ARGS`` with this tree's refmodel, on one thread per rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=subprocess_env(OMP_NUM_THREADS=1, **env))


def _written(log: str) -> dict[int, list[int]]:
    """``{rank: [shard, ...]}`` from the ranks' per-shard log lines."""
    out: dict[int, list[int]] = {0: [], 1: []}
    for rank, shard in WROTE.findall(log):
        out[int(rank)].append(int(shard))
    return out


@pytest.fixture(scope="module")
def one_process(tiny_model_dirs, tmp_path_factory) -> tuple[Path, Path]:
    """``(model folder, store)``: the single-process store of the built-in data, on one thread like each rank."""
    out = tmp_path_factory.mktemp("one") / "store"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        precompute(tiny_model_dirs["llama"], builtin_dataset_path(), out, progress=False, **SETTINGS).close()
    finally:
        torch.set_num_threads(threads)
    return tiny_model_dirs["llama"], out


@pytest.mark.integration
@pytest.mark.slow
def test_torchrun_rank_dies_then_resume_gives_the_one_process_store(one_process, tmp_path):
    """`torchrun -m refmodel precompute` on 2 ranks: rank 1 dies after 2 shards (torchrun then ends rank 0), the
    store is unfinished and says so; the same command with --resume scores only the missing shards, split
    over the ranks, and the store is byte-identical to one process's."""
    model, expected = one_process
    out = tmp_path / "store"
    args = ["-m", "refmodel", "-v", "precompute", "--model", model, "--data", builtin_dataset_path(), "--out", out,
            *FLAGS]
    died = _torchrun(*args, **{EXIT_AFTER_ENV: "1:2"})
    assert died.returncode != 0
    first = _written(died.stderr)
    assert first[1] == [1, 3] and first[0] == list(range(0, 2 * len(first[0]), 2))  # shard i on rank i % 2
    info = run_cli("store", "info", out)
    summary = json.loads(info.stdout)
    shards = summary["job"]["shards"]
    assert summary["finished"] is False and summary["missing_shards"] == shards - summary["shards"] > 0
    assert "unfinished" in info.stderr and "--resume" in info.stderr
    kept = {int(spec["file"][6:11]) for spec in json.loads((out / "manifest.json").read_text())["shards"]}
    logged = set(first[0] + first[1])  # a shard is logged once committed; SIGTERM may land in between
    assert logged <= kept <= logged | {2 * len(first[0])}

    resumed = _torchrun(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _files(out) == _files(expected)
    todo = sorted(set(range(shards)) - kept)
    assert _written(resumed.stderr) == {0: todo[0::2], 1: todo[1::2]}  # only the missing shards, each once
    assert json.loads(resumed.stdout)["shards"] == shards  # rank 0 alone reports
    assert json.loads(run_cli("store", "info", out).stdout)["finished"] is True


SCRIPT = """
import json, logging, os, sys
import torch.distributed as dist
from refmodel import precompute

logging.basicConfig(level=logging.INFO, format=f"[r{os.environ['RANK']}] %(message)s")
model, data, out = sys.argv[1:4]
split = precompute(model, data, out + "/split", shard_examples=100, dtype="float32", progress=False)
dist.init_process_group("gloo")  # a training script's own group: precompute works beside it and leaves it
main = precompute(model, data, out + "/main", shard_examples=100, dtype="float32", progress=False, split=False)
print(json.dumps({"rank": dist.get_rank(), "split": len(split), "main": len(main),
                  "initialized": dist.is_initialized()}))
dist.destroy_process_group()
"""


@pytest.mark.integration
@pytest.mark.slow
def test_precompute_from_a_launched_script_split_or_on_rank_0(one_process, tmp_path):
    model, expected = one_process
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    res = _torchrun(script, model, builtin_dataset_path(), tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _files(tmp_path / "split") == _files(expected) == _files(tmp_path / "main")
    entries = json.loads((expected / "manifest.json").read_text())["job"]["sequences"]
    # the two ranks share the launcher's stdout: their lines may arrive glued together ("{...}{...}")
    rows = sorted((json.loads(obj) for obj in re.findall(r"\{[^{}]*\}", res.stdout)), key=lambda r: r["rank"])
    assert rows == [{"rank": r, "split": entries, "main": entries, "initialized": True} for r in (0, 1)]
    # split: shard i on rank i % 2, once; split=False: rank 0 alone (its lines have no rank tag)
    shards = json.loads((expected / "manifest.json").read_text())["job"]["shards"]
    assert _written(res.stderr) == {r: list(range(r, shards, 2)) for r in (0, 1)}
    assert all(line.startswith(f"[r{rank}]") for line in res.stderr.splitlines()
               for rank, _ in WROTE.findall(line))
    alone = [line[:4] for line in res.stderr.splitlines() if "precompute: wrote shard" in line]
    assert alone == ["[r0]"] * shards


def test_launcher_ranks_from_the_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert launcher_ranks() is None
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ranks = launcher_ranks()
    assert ranks == Ranks(3, 4, 1) and not ranks.is_main
    assert ranks.own(list(range(10))) == [3, 7] and Ranks(0, 4, 0).own([5, 6, 7, 8, 9]) == [5, 9]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launcher_ranks() is None  # a world of one is a single process
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match=r"WORLD_SIZE='two' is not an integer.*torchrun"):
        launcher_ranks()


def test_each_rank_gets_its_own_gpu(monkeypatch):
    assert PrecomputeConfig(device="cpu").resolved_device(1) == "cpu"
    assert PrecomputeConfig(device="cuda:0").resolved_device(1) == "cuda:0"  # explicit: as given
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert PrecomputeConfig(device="auto").resolved_device(1) == "cuda:1"
    assert PrecomputeConfig(device="cuda").resolved_device(0) == "cuda:0"
    assert PrecomputeConfig(device="auto").resolved_device() == "cuda"
    with pytest.raises(ConfigError, match=r"LOCAL_RANK 2 has no GPU of its own: torch sees 2 CUDA"):
        PrecomputeConfig(device="cuda").resolved_device(2)


def test_ray_is_refused_under_a_launcher(monkeypatch, tiny_model_dirs, tmp_path):
    pytest.importorskip("ray")
    from refmodel.precompute.ray import precompute_on_ray

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"rank 0 of 2 of a launch.*drop --ray"):
        precompute_on_ray(tiny_model_dirs["llama"], builtin_dataset_path(), tmp_path / "s")
    assert not (tmp_path / "s").exists()


TWICE = """
import json, sys
import torch.distributed as dist
from refmodel.precompute.job import precompute

model, out = sys.argv[1:3]
rows = [{"prompt": f"question {i} ", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(6)]
first = precompute(model, rows, out + "/first", shard_examples=2, dtype="float32", progress=False)
second = precompute(model, rows, out + "/second", shard_examples=2, dtype="float32", progress=False, split=False)
dist.init_process_group("gloo")  # the script's own group, from the same environment, after both
box = [dist.get_rank()]
dist.broadcast_object_list(box, src=1)
print(json.dumps({"rank": dist.get_rank(), "first": len(first), "second": len(second), "from_rank_1": box[0]}))
dist.destroy_process_group()
"""


@pytest.mark.integration
@pytest.mark.slow
def test_precompute_twice_then_the_scripts_own_group_under_a_plain_launcher(tiny_model_dirs, tmp_path):
    """A launcher without torchrun's agent store (SLURM, mpirun, a shell loop: RANK, WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT only): rank 0 hosts the rendezvous store. precompute() twice, then the script's own
    init_process_group, all from the environment; before the launch's store was kept (launch_store), the
    second group raced the first one's store going down on rank 0 and hung."""
    script = tmp_path / "twice.py"
    script.write_text(TWICE)
    env = subprocess_env(OMP_NUM_THREADS=1, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    procs = [subprocess.Popen([sys.executable, str(script), tiny_model_dirs["llama"], str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    rows = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert rows == [{"rank": r, "first": 6, "second": 6, "from_rank_1": 1} for r in (0, 1)]
    assert _files(tmp_path / "first") == _files(tmp_path / "second")
