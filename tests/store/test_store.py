"""LogprobStore: round trips, alignment, fingerprints, corruption, the one-writer rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from refmodel.errors import ConfigError, FingerprintMismatch, StoreCorrupt, StoreMiss
from refmodel.store import LogprobStore, key_of

# Relative rounding error of each storage dtype (round to nearest: half an ulp of the mantissa).
REL_TOL = {"float32": 0.0, "bfloat16": 2.0**-8, "float16": 2.0**-11}


def _seqs(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = int(torch.randint(3, 40, (1,), generator=g))
        ids = torch.randint(0, 50_000, (t,), generator=g)
        logps = -torch.rand(t, generator=g) * 12
        mask = torch.zeros(t, dtype=torch.bool)
        mask[int(torch.randint(1, t, (1,), generator=g)):] = True
        out.append((ids, logps, mask))
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_round_trip_every_dtype(tmp_path, dtype):
    seqs = _seqs()
    with LogprobStore.create(tmp_path / "s", "fp-A", dtype=dtype, shard_entries=7) as store:
        for ids, logps, mask in seqs:
            assert store.put(ids, logps, mask)
        assert not store.put(*seqs[0])  # same ids again: ignored
    store = LogprobStore.open(tmp_path / "s", "fp-A")
    assert len(store) == len(seqs) and store.dtype == dtype and store.info()["shards"] == 3
    for ids, logps, mask in seqs:
        got = store.get(ids)
        want = torch.where(mask, logps, 0.0)
        assert got.dtype == torch.float32 and got.shape == ids.shape
        assert torch.equal(got[~mask], torch.zeros(int((~mask).sum())))
        torch.testing.assert_close(got, want, rtol=REL_TOL[dtype], atol=0)
        # The sum is taken in float64 from the float32 input, before the storage cast.
        assert store.get_sum(ids) == pytest.approx(float(want.double().sum()), rel=1e-6)
        assert ids in store and key_of(ids) == key_of(ids.tolist())
    assert sorted(k for k, _ in store.items()) == sorted(key_of(s[0]) for s in seqs)
    assert store.verify()["entries"] == len(seqs)


def test_get_batch_left_and_right_padding(tmp_path):
    seqs = _seqs(5, seed=1)
    with LogprobStore.create(tmp_path / "s", "fp", dtype="float32") as store:
        for s in seqs:
            store.put(*s)
    store = LogprobStore.open(tmp_path / "s")
    t = max(len(s[0]) for s in seqs)
    for side in ("left", "right"):
        ids = torch.full((5, t), 7)
        attn = torch.zeros(5, t, dtype=torch.long)
        want = torch.zeros(5, t)
        for b, (i, lp, m) in enumerate(seqs):
            sl = slice(t - len(i), t) if side == "left" else slice(0, len(i))
            ids[b, sl], attn[b, sl], want[b, sl] = i, 1, torch.where(m, lp, 0.0)
        assert torch.equal(store.get_batch(ids, attn), want)
        assert torch.allclose(store.get_sums(ids, attn), want.sum(1))
    with pytest.raises(StoreMiss, match=r"1 of 5 rows .* row 2"):
        bad = ids.clone()
        bad[2, 0] += 1
        store.get_batch(bad, attn)


def test_fingerprint_mismatch_names_both(tmp_path):
    LogprobStore.create(tmp_path / "s", "rm1-aaaa").close()
    with pytest.raises(FingerprintMismatch, match=r"rm1-aaaa.*rm1-bbbb"):
        LogprobStore.open(tmp_path / "s", "rm1-bbbb")
    assert LogprobStore.open(tmp_path / "s", "rm1-aaaa").fingerprint == "rm1-aaaa"


def test_miss_and_bad_input(tmp_path):
    store = LogprobStore.create(tmp_path / "s", "fp")
    with pytest.raises(StoreMiss, match="no entry"):
        store.get([1, 2, 3])
    with pytest.raises(ValueError, match="same T"):
        store.put([1, 2, 3], [0.0, -1.0], [False, True, True])
    with pytest.raises(ValueError, match="storage dtype"):
        LogprobStore.create(tmp_path / "t", "fp", dtype="int8")
    with pytest.raises(ConfigError, match="already exists"):
        LogprobStore.create(tmp_path / "s", "fp")


def test_one_writer_many_readers(tmp_path):
    writer = LogprobStore.create(tmp_path / "s", "fp")
    with pytest.raises(ConfigError, match="another process"):
        LogprobStore.open(tmp_path / "s", mode="a")
    reader = LogprobStore.open(tmp_path / "s")
    ids, lp, m = _seqs(1)[0]
    writer.put(ids, lp, m)
    assert ids not in reader  # not committed yet
    writer.flush()
    assert ids in reader  # the reader picks up the new manifest on a miss
    with pytest.raises(ConfigError, match="read-only"):
        reader.put(ids, lp, m)
    writer.close()
    LogprobStore.open(tmp_path / "s", mode="a").close()  # lock released


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_flipped_byte_detected_by_verify_and_on_read(tmp_path):
    seqs = _seqs(6)
    with LogprobStore.create(tmp_path / "s", "fp", dtype="bfloat16") as store:
        for s in seqs:
            store.put(*s)
    shard = tmp_path / "s" / "shard-00000.safetensors"
    _flip(shard, shard.stat().st_size - 3)  # inside the last entry's values
    store = LogprobStore.open(tmp_path / "s")
    with pytest.raises(StoreCorrupt, match="blake2b"):
        store.verify()
    bad = [s for s in seqs if key_of(s[0]) == max(key_of(x[0]) for x in seqs)][0]  # last key, last values
    with pytest.raises(StoreCorrupt, match="crc32"):
        store.get(bad[0])
    with pytest.raises(StoreCorrupt):
        LogprobStore.open(tmp_path / "s", verify=True)


def test_flipped_header_byte_and_manifest(tmp_path):
    with LogprobStore.create(tmp_path / "s", "fp") as store:
        store.put(*_seqs(1)[0])
    shard = tmp_path / "s" / "shard-00000.safetensors"
    _flip(shard, 12)
    with pytest.raises(StoreCorrupt):
        LogprobStore.open(tmp_path / "s").verify()
    (tmp_path / "s" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreCorrupt, match="manifest"):
        LogprobStore.open(tmp_path / "s")


def test_orphans_from_a_crash_are_ignored_then_removed(tmp_path):
    with LogprobStore.create(tmp_path / "s", "fp") as store:
        store.put(*_seqs(1)[0])
    root = tmp_path / "s"
    (root / "shard-00001.safetensors").write_bytes(b"half a shard")  # renamed, manifest not yet updated
    (root / "shard-00002.safetensors.tmp-123").write_bytes(b"partial")
    assert len(LogprobStore.open(root)) == 1 and LogprobStore.open(root).verify()
    LogprobStore.open(root, mode="a").close()
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "shard-00000.safetensors", "writer.lock"]


def test_readable_without_refmodel(tmp_path):
    from safetensors.numpy import load_file

    ids, lp, m = _seqs(1)[0]
    with LogprobStore.create(tmp_path / "s", "fp", dtype="float32") as store:
        store.put(ids, lp, m)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    tensors = load_file(tmp_path / "s" / manifest["shards"][0]["file"])
    offset, count, start, seq_len, _ = tensors["meta"][0]
    assert bytes(tensors["keys"][0]).hex() == key_of(ids) and seq_len == len(ids)
    np.testing.assert_array_equal(tensors["values"][offset:offset + count], lp[start:].numpy())
