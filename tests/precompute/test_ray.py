"""Precompute on a local Ray cluster (2 CPUs) against the single-process job, with workers and the driver killed.

Equality is exact (bytes): the actors run the same plan_batches / score_units calls on the same model, so
every stored array must equal the single-process run's, and so must the shard files and the manifest.
A CPU actor (num_cpus=1) runs torch on one thread, so the single-process reference runs on one thread too
(CPU GEMMs split their sums by thread count; with more threads the bits may differ in the last place).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from precompute_helpers import assert_store_follows_plan, kill_after_shards
from safetensors.numpy import load_file

import refmodel
from refmodel.errors import ConfigError
from refmodel.precompute.config import PrecomputeConfig
from refmodel.precompute.job import precompute
from refmodel.precompute.plan import load_scoring_model, plan_precompute
from refmodel.precompute.ray import ShardScorer, precompute_on_ray
from refmodel.store import LogprobStore
from refmodel.testing import preference_pairs, run_cli, write_jsonl

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray
SETTINGS = {"max_tokens_per_batch": 256, "shard_examples": 20}


@pytest.fixture(scope="module")
def ray_address():
    """A local 2-CPU Ray cluster for this module; its workers import this worktree's refmodel."""
    src = str(Path(refmodel.__file__).resolve().parents[1])
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": src}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tiny_model_dirs, tmp_path_factory):
    """(model dir, data file, single-process float32 store dir) of 120 pairs in 6 shards."""
    root = tmp_path_factory.mktemp("ray_job")
    data = write_jsonl(preference_pairs(120, seed=4), root / "pairs.jsonl")
    ref = root / "single"
    _single(tiny_model_dirs["llama"], data, ref, dtype="float32", **SETTINGS)
    return tiny_model_dirs["llama"], data, ref


def _single(model_dir, data, out, **settings) -> None:
    """The single-process job on one torch thread, like a 1-CPU actor."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        precompute(model_dir, data, out, progress=False, **settings).close()
    finally:
        torch.set_num_threads(threads)


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != "writer.lock"}


def _raw_entries(path: Path) -> dict[bytes, tuple]:
    """key -> (stored value bytes, start, seq_len, stored sum) read straight from the safetensors shards."""
    out = {}
    for shard in sorted(path.glob("shard-*.safetensors")):
        t = load_file(str(shard))
        for key, (offset, count, start, seq_len, _), total in zip(t["keys"], t["meta"], t["sums"], strict=True):
            assert key.tobytes() not in out, "an entry is stored twice"
            out[key.tobytes()] = (t["values"][offset:offset + count].tobytes(), int(start), int(seq_len), total)
    return out


def _visits(folder: Path) -> dict[int, list[int]]:
    """shard index -> pids of the actors that started scoring it (from the files the test scorers write)."""
    out: dict[int, list[int]] = {}
    for f in folder.iterdir():
        shard, pid = map(int, f.name.split("-")[:2])
        out.setdefault(shard, []).append(pid)
    return out


def test_equals_single_process_bytes(ray_address, job, tmp_path):
    model_dir, data, ref = job
    visits = tmp_path / "visits"
    visits.mkdir()

    class RecordingScorer(ShardScorer):  # defined here so Ray ships it by value
        def score_shard(self, index, units):
            (visits / f"{index}-{os.getpid()}-{time.monotonic_ns()}").touch()
            # Hold the first shard until the other actor has started one too (at most 60 s): on a loaded
            # machine one actor could otherwise finish every shard before the other has loaded its model,
            # and "both actors took part" would test the scheduler's timing instead of the job's spread.
            deadline = time.monotonic() + 60
            while len({f.name.split("-")[1] for f in visits.iterdir()}) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            return super().score_shard(index, units)

    store = precompute_on_ray(model_dir, data, tmp_path / "ray", num_workers=2, dtype="float32", progress=False,
                              scorer_cls=RecordingScorer, **SETTINGS)
    assert store.info()["shards"] == 6 and len(store) == len(LogprobStore.open(ref))
    seen = _visits(visits)
    assert sorted(seen) == list(range(6)) and all(len(p) == 1 for p in seen.values()), seen  # each shard once
    assert len({p for pids in seen.values() for p in pids}) == 2, seen  # by both actors

    want, got = _raw_entries(ref), _raw_entries(tmp_path / "ray")
    assert got.keys() == want.keys()
    for key, (values, start, seq_len, total) in want.items():
        assert got[key][:3] == (values, start, seq_len)
        assert got[key][3].tobytes() == total.tobytes()  # per-sequence sums, bit for bit
    assert _files(tmp_path / "ray") == _files(ref)  # shards and manifest (same job => resume across modes)
    # both are the one plan (plan_precompute): its job, fingerprint, dtype and each shard's keys
    plan = plan_precompute(*load_scoring_model(str(model_dir)), data,
                           PrecomputeConfig(dtype="float32", **SETTINGS))
    assert_store_follows_plan(tmp_path / "ray", plan)
    assert_store_follows_plan(ref, plan)


@pytest.mark.slow
def test_worker_killed_mid_shard_is_retried(ray_address, job, tmp_path):
    model_dir, data, ref = job
    visits = tmp_path / "visits"
    visits.mkdir()
    doomed = 3

    class DyingScorer(ShardScorer):
        def score_shard(self, index, units):
            (visits / f"{index}-{os.getpid()}-{time.monotonic_ns()}").touch()
            entries = super().score_shard(index, units)
            if index == doomed and len(list(visits.glob(f"{doomed}-*"))) == 1:
                os._exit(1)  # the actor process dies with the shard scored but not returned
            return entries

    store = precompute_on_ray(model_dir, data, tmp_path / "ray", num_workers=2, dtype="float32", progress=False,
                              scorer_cls=DyingScorer, **SETTINGS)
    seen = _visits(visits)
    assert len(seen[doomed]) == 2 and seen[doomed][0] != seen[doomed][1], seen  # died, retried in a new process
    assert all(len(seen[i]) == 1 for i in range(6) if i != doomed), seen
    assert len(store) == len(LogprobStore.open(ref)) and _raw_entries(tmp_path / "ray").keys() == _raw_entries(ref).keys()
    assert _files(tmp_path / "ray") == _files(ref)


@pytest.mark.slow
@pytest.mark.integration
def test_driver_killed_then_resume(ray_address, job, tmp_path):
    model_dir, data, _ = job
    args = ["precompute", "--model", model_dir, "--data", data, "--max-tokens-per-batch", "256",
            "--shard-examples", "8", "--ray", "--num-workers", "2", "--cpus-per-worker", "1"]
    want = tmp_path / "single"
    _single(model_dir, data, want, dtype="bfloat16", max_tokens_per_batch=256, shard_examples=8)
    out = tmp_path / "killed"
    done = kill_after_shards([*args, "--ray-address", ray_address], out, at_least=1)
    assert 1 <= done < 15, done  # killed mid-job

    # Resume with Ray again (this time through RAY_ADDRESS) and the same settings: the same bytes.
    res = run_cli(*args, "--out", out, "--resume", RAY_ADDRESS=ray_address)
    assert json.loads(res.stdout)["shards"] == 15
    assert _files(out) == _files(want)


def test_resume_across_modes(ray_address, job, tmp_path):
    """A store begun by the single-process job is finished on Ray (same job description in the manifest)."""
    model_dir, data, ref = job
    out = tmp_path / "mixed"
    out.mkdir()
    for name in ("manifest.json", "shard-00000.safetensors", "shard-00001.safetensors"):
        (out / name).write_bytes((ref / name).read_bytes())
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:2]  # as if the single-process job died after two shards
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    precompute_on_ray(model_dir, data, out, resume=True, dtype="float32", progress=False, **SETTINGS)
    assert _files(out) == _files(ref)
    with pytest.raises(ConfigError, match="another job"):  # other settings: refused, not mixed
        precompute_on_ray(model_dir, data, out, resume=True, dtype="float32", progress=False,
                          max_tokens_per_batch=128, shard_examples=20)


@pytest.mark.integration
def test_flag_errors(ray_address, job, tmp_path):
    model_dir, data, _ = job
    base = ["precompute", "--model", model_dir, "--data", data, "--out", tmp_path / "s"]
    for flags in (["--num-workers", "2"], ["--gpus-per-worker", "1"], ["--cpus-per-worker", "2"],
                  ["--ray-address", ray_address]):
        res = run_cli(*base, *flags, check=False)
        assert res.returncode == 2 and f"{flags[0]}: only used with --ray" in res.stderr, res.stderr
    res = run_cli(*base, "--ray", "--num-workers", "0", check=False)
    assert res.returncode == 2 and "--num-workers" in res.stderr
    res = run_cli(*base, "--ray", "--cpus-per-worker", "0", check=False)
    assert res.returncode == 2 and "--cpus-per-worker" in res.stderr
    assert not (tmp_path / "s").exists()
    res = run_cli(*base, "--ray", "--ray-address", "127.0.0.1:1", check=False, timeout=60)  # nothing listens
    assert res.returncode == 1 and "cannot reach the Ray cluster at 127.0.0.1:1" in res.stderr, res.stderr
    assert not (tmp_path / "s").exists()

    if ray.cluster_resources().get("GPU", 0) == 0:
        with pytest.raises(ConfigError, match=r"--gpus-per-worker 1 asks for GPUs, but the Ray cluster has 0 GPU"):
            precompute_on_ray(model_dir, data, tmp_path / "g", gpus_per_worker=1, progress=False)
        assert not (tmp_path / "g").exists()  # refused before anything was written
    with pytest.raises(refmodel.errors.InvalidInput, match="num_workers must be >= 1"):
        precompute_on_ray(model_dir, data, tmp_path / "g", num_workers=0)


def test_wire_format_round_trip():
    from refmodel.precompute.ray import decode_units, encode_units, pack_entries, unpack_entries
    from refmodel.precompute.windows import Unit
    from refmodel.store.format import make_entry

    units = [Unit((1, 2), ((3, 4), (5,)), ((True, False), (True,)), (b"a" * 16, b"b" * 16))]
    assert decode_units(encode_units(units)) == units
    rng = np.random.default_rng(0)
    entries = [make_entry(np.arange(n, dtype=np.int64), rng.standard_normal(n).astype(np.float32),
                          np.arange(n) % 3 != 0) for n in (1, 5, 47)]
    back = unpack_entries(**pack_entries(entries))
    for a, b in zip(entries, back, strict=True):
        assert (a.key, a.seq_len, a.start, a.total) == (b.key, b.seq_len, b.start, b.total)
        assert a.values.tobytes() == b.values.tobytes() and b.values.dtype == np.float32
    with pytest.raises(refmodel.RefModelError, match="malformed"):
        unpack_entries(**{**pack_entries(entries), "keys": b"x"})
