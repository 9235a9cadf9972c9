"""Manifest validation (every field and path) and what `store verify` checks beyond the shard bytes."""

from __future__ import annotations

import json
import os

import pytest
import torch

from refmodel.errors import StoreCorrupt
from refmodel.store import LogprobStore
from refmodel.testing import run_cli

N, PER_SHARD = 12, 4


def _seq(i):
    ids = torch.arange(i, i + 5 + i % 7)
    return ids, -(ids % 5).float() / 2 - 0.1, torch.arange(len(ids)) >= 2


def _store(root, job=True):
    with LogprobStore.create(root, "fp", dtype="float32", shard_entries=PER_SHARD) as store:
        for i in range(N):
            store.put(*_seq(i))
        if job:  # as `refmodel precompute` records it: shard i is shard-{i:05d}
            store.set_job({"kind": "precompute", "shards": N // PER_SHARD, "sequences": N, "plan_blake2b": "0" * 32})
    return root


def _edit(root, fn):
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    fn(manifest)
    path.write_text(json.dumps(manifest))


def _set(*keys, value):
    def fn(m):
        for k in keys[:-1]:
            m = m[k]
        m[keys[-1]] = value
    return fn


def _delete(*keys):
    def fn(m):
        for k in keys[:-1]:
            m = m[k]
        del m[keys[-1]]
    return fn


BAD = [
    ("top level", lambda m: (m.clear(), m.update({"x": 1})), "not a refmodel-logprob-store"),
    ("no fingerprint", _delete("fingerprint"), "fingerprint"),
    ("fingerprint type", _set("fingerprint", value=7), "fingerprint"),
    ("version type", _set("version", value="3"), "version"),
    ("dtype", _set("dtype", value="int4"), "dtype"),
    ("shards type", _set("shards", value={"a": 1}), "shards"),
    ("shard not object", _set("shards", 0, value="shard-00000.safetensors"), r"shards\[0\]"),
    ("no file", _delete("shards", 1, "file"), r"shards\[1\]\.file"),
    ("entries negative", _set("shards", 0, "entries", value=-1), r"shards\[0\]\.entries"),
    ("entries bool", _set("shards", 0, "entries", value=True), r"shards\[0\]\.entries"),
    ("tokens string", _set("shards", 2, "tokens", value="12"), r"shards\[2\]\.tokens"),
    ("bytes float", _set("shards", 0, "bytes", value=1.5), r"shards\[0\]\.bytes"),
    ("blake2b", _set("shards", 0, "blake2b", value="xyz"), r"shards\[0\]\.blake2b"),
    ("parent path", _set("shards", 0, "file", value="../other/shard-00000.safetensors"), r"shards\[0\]\.file"),
    ("absolute path", _set("shards", 0, "file", value="/etc/passwd"), r"shards\[0\]\.file"),
    ("dotdot name", _set("shards", 0, "file", value="shard-.."), r"shards\[0\]\.file"),
    ("duplicate", _set("shards", 1, "file", value="shard-00000.safetensors"), r"shards\[1\]\.file.*once"),
    ("job type", _set("job", value=[1]), "job"),
    ("job shards", _set("job", "shards", value="3"), r"job\.shards"),
]


@pytest.mark.parametrize("name,edit,field", BAD, ids=[b[0] for b in BAD])
def test_malformed_manifest_raises_store_corrupt_naming_the_field(tmp_path, name, edit, field):
    root = _store(tmp_path / "s")
    _edit(root, edit)
    with pytest.raises(StoreCorrupt, match=field):
        LogprobStore.open(root)


def test_malformed_manifest_is_a_one_line_cli_error(tmp_path, cli_python):
    root = _store(tmp_path / "s")
    _edit(root, _delete("shards", 0, "blake2b"))
    for cmd in ("info", "verify"):
        res = run_cli("store", cmd, root, check=False, python=cli_python)
        assert res.returncode == 1 and "Traceback" not in res.stderr
        assert "StoreCorrupt" in res.stderr and "shards[0].blake2b" in res.stderr


def test_verify_ok_on_a_whole_store(tmp_path, cli_python):
    root = _store(tmp_path / "s")
    assert LogprobStore.open(root).problems() == []
    assert "ok: 3 shards, 12 entries" in run_cli("store", "verify", root, python=cli_python).stdout


@pytest.mark.parametrize("edit,where,reason", [
    (_set("shards", 1, "tokens", value=1), "shard-00001", "tokens"),
    (_set("shards", 2, "entries", value=3), "shard-00002", "entries"),
    (lambda m: m["shards"][0].update(bytes=m["shards"][0]["bytes"] + 8), "shard-00000", "bytes"),
    (lambda m: m["shards"].pop(1), "shard-00001", "not in the manifest"),
    (_set("job", "sequences", value=13), "manifest.json", "13 sequences"),
], ids=["tokens", "entries", "bytes", "dropped shard", "sequences"])
def test_verify_catches_edited_counts_and_a_dropped_shard(tmp_path, edit, where, reason, cli_python):
    root = _store(tmp_path / "s")
    _edit(root, edit)
    problems = LogprobStore.open(root).problems()
    assert any(p.file.startswith(where) and reason in p.reason for p in problems), problems
    res = run_cli("store", "verify", root, check=False, python=cli_python)
    assert res.returncode == 1 and "Traceback" not in res.stderr and where in res.stderr
    assert "refmodel store repair" in res.stderr


def test_symlink_escaping_the_store_is_refused(tmp_path):
    root = _store(tmp_path / "s")
    other = _store(tmp_path / "other")
    os.replace(root / "shard-00001.safetensors", tmp_path / "moved")
    os.symlink(other / "shard-00001.safetensors", root / "shard-00001.safetensors")
    store = LogprobStore.open(root)
    with pytest.raises(StoreCorrupt, match="symbolic link"):
        store.get(_seq(4)[0])
    assert any(p.file == "shard-00001.safetensors" and "outside the store" in p.reason for p in store.problems())
    assert torch.equal(store.get(_seq(0)[0]), torch.where(_seq(0)[2], _seq(0)[1], 0.0))  # other shards fine


@pytest.mark.parametrize("edit,field", [
    (_set("job", "shards", value=100_000_000), "job.shards"),
    (_set("shards", 0, "entries", value=10**30), "shards[0].entries"),
    (lambda m: m["shards"].extend([m["shards"][0]] * 100_001), "shards"),
], ids=["job shards", "entries", "shard list"])
def test_manifest_counts_are_bounded_before_any_allocation(tmp_path, edit, field, cli_python):
    # Before: verify built 10**8 shard names (GBs); `store info` died on len() with OverflowError.
    root = _store(tmp_path / "s")
    _edit(root, edit)
    with pytest.raises(StoreCorrupt, match=rf"{field.replace('[', '.').replace(']', '.')} is .*expected"):
        LogprobStore.open(root)
    res = run_cli("store", "info", root, check=False, python=cli_python)
    assert res.returncode == 1 and "Traceback" not in res.stderr and field in res.stderr, res.stderr


def test_a_writer_lock_symlink_creates_nothing_outside_the_store(tmp_path):
    root = _store(tmp_path / "s")
    (root / "writer.lock").unlink()
    outside = tmp_path / "outside.lock"
    os.symlink(outside, root / "writer.lock")
    with pytest.raises(StoreCorrupt, match="writer.lock is a symbolic link"):
        LogprobStore.open(root, mode="a")
    assert not outside.exists()
    (root / "writer.lock").unlink()
    os.mkfifo(root / "writer.lock")  # nor a FIFO: only a regular file is locked
    with pytest.raises(StoreCorrupt, match="writer.lock is a FIFO"):
        LogprobStore.open(root, mode="a")
