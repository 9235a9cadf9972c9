"""Recovery advice that works: a damaged precompute store, repaired as its error says, equals an unbroken run."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from refmodel.data import load_examples
from refmodel.errors import ConfigError, FingerprintMismatch, StoreCorrupt
from refmodel.precompute.job import precompute, repair_store
from refmodel.store import LogprobStore
from refmodel.testing import load_tiny, preference_pairs, run_cli, write_jsonl


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != "writer.lock"}


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _damage(root):
    """Delete one shard, flip a value byte in another, truncate a third."""
    (root / "shard-00001.safetensors").unlink()
    third = root / "shard-00003.safetensors"
    _flip(third, third.stat().st_size - 2)
    fourth = root / "shard-00004.safetensors"
    fourth.write_bytes(fourth.read_bytes()[:100])


@pytest.fixture
def made(tiny_model_dirs, tmp_path):
    # Model and data from files, as the CLI loads them (load_tiny's eager attention differs in the last bits).
    model_dir = tiny_model_dirs["gpt2"]
    pairs = preference_pairs(30, seed=4)
    data = write_jsonl(pairs, tmp_path / "d.jsonl")
    full = precompute(model_dir, data, tmp_path / "full", shard_examples=6, max_tokens_per_batch=200,
                      progress=False)
    assert full.info()["shards"] == 5
    full.close()
    return model_dir, data, pairs, tmp_path / "full"


def test_resume_rescores_missing_and_corrupt_shards(made, tmp_path):
    model_dir, data, _, full = made
    broken = tmp_path / "broken"
    shutil.copytree(full, broken)
    _damage(broken)
    store = precompute(model_dir, data, broken, shard_examples=6, max_tokens_per_batch=200, resume=True,
                       progress=False)
    assert store.problems() == []
    assert _files(broken) == _files(full)


def test_repair_refuses_another_model_or_data_and_changes_nothing(made, tiny_model_dirs, tmp_path):
    model_dir, data, pairs, full = made
    broken = tmp_path / "broken"
    shutil.copytree(full, broken)
    _damage(broken)
    before = _files(broken)
    with pytest.raises(FingerprintMismatch):
        repair_store(tiny_model_dirs["llama"], data, broken, progress=False)
    with pytest.raises(ConfigError, match="another job"):
        repair_store(model_dir, pairs[:10], broken, progress=False)
    assert _files(broken) == before
    assert _files(repair_store(model_dir, data, broken, progress=False).path) == _files(full)


@pytest.mark.integration
def test_following_the_error_message_literally_makes_the_store_whole(made, tmp_path, cli_python):
    model_dir, data, pairs, full = made
    _, tok = load_tiny(model_dir)
    broken = tmp_path / "broken"
    shutil.copytree(full, broken)
    _damage(broken)
    store = LogprobStore.open(broken)
    seqs = [torch.tensor(s) for ex in load_examples(pairs, tok) for s, _ in ex.sequences()]
    errors = []
    for ids in seqs:
        try:
            store.get(ids)
        except StoreCorrupt as exc:
            errors.append(str(exc))
    assert errors and len(errors) < len(seqs)  # only the damaged shards' rows fail
    verify = run_cli("store", "verify", broken, check=False, python=cli_python)
    assert verify.returncode == 1 and "shard-00001" in verify.stderr and "shard-00003" in verify.stderr
    for message in (errors[0], verify.stderr):
        advice = re.search(r"`refmodel (store repair \S+ --model MODEL --data DATA)`", message)
        assert advice, message
    args = advice.group(1).replace("MODEL", str(model_dir)).replace("DATA", str(data)).split()
    res = run_cli(*args, python=cli_python)
    assert "repaired, ok: 5 shards" in res.stdout
    assert _files(broken) == _files(full)
    assert "ok: 5 shards" in run_cli("store", "verify", broken, python=cli_python).stdout


def test_drop_leaves_a_smaller_valid_store(tmp_path, cli_python):
    root = tmp_path / "s"
    with LogprobStore.create(root, "fp", dtype="float32", shard_entries=3) as store:
        for i in range(9):
            ids = torch.arange(i, i + 6)
            store.put(ids, -torch.ones(6), torch.arange(6) >= 2)
    (root / "shard-00001.safetensors").write_bytes(b"junk")
    with LogprobStore.open(root, mode="a") as store:
        dropped = store.discard_damaged()
    assert [p.file for p in dropped] == ["shard-00001.safetensors"]
    store = LogprobStore.open(root)
    assert len(store) == 6 and store.verify()["shards"] == 2 and not (root / "shard-00001.safetensors").exists()
    res = run_cli("store", "repair", root, "--drop", python=cli_python)
    assert "repaired, ok: 2 shards, 6 entries" in res.stdout
    bad = run_cli("store", "repair", root, check=False, python=cli_python)
    assert bad.returncode == 2 and "--model and --data" in bad.stderr
