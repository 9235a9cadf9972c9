"""Format version 3 (sums inside each entry's crc) and reading stores written in versions 1 and 2.

The old layouts are written here by hand (safetensors + the old crc rule), independently of
refmodel's writer, so the test fails if the reader stops honouring them.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from refmodel.data import Example
from refmodel.errors import StoreCorrupt
from refmodel.store import LogprobStore, key_of
from refmodel.store.format import SUM_IN_CRC, VERSION
from refmodel.store.interop import trl_columns


def _seqs(n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = 4 + (7 * i) % 23
        ids = torch.randint(0, 30_000, (t,), generator=g)
        logps = -torch.rand(t, generator=g) * 9
        mask = torch.arange(t) >= 1 + i % 3
        out.append((ids, logps, mask))
    return out


def write_old_store(root, seqs, version: int, fp="fp-old", per_shard=4):
    """A float32 store in format ``version`` (1: I64 meta, 2: U32 meta; crc without the sum)."""
    root.mkdir()
    rows = []
    for ids, logps, mask in seqs:
        key = hashlib.blake2b(ids.numpy().astype("<i8").tobytes(), digest_size=16).digest()
        scored = np.flatnonzero(mask.numpy())
        start, stop = int(scored[0]), int(scored[-1]) + 1
        vals = np.where(mask.numpy()[start:stop], logps.numpy()[start:stop], 0).astype(np.float32)
        rows.append((key, start, len(ids), vals, float(vals.astype(np.float64).sum())))
    shards = []
    for s, i in enumerate(range(0, len(rows), per_shard)):
        chunk = sorted(rows[i:i + per_shard])
        meta, off = [], 0
        for key, start, t, vals, _ in chunk:
            crc = zlib.crc32(vals.tobytes(), zlib.crc32(key + struct.pack("<qqq", vals.size, start, t)))
            meta.append((off, vals.size, start, t, crc))
            off += vals.size
        tensors = {"keys": np.frombuffer(b"".join(r[0] for r in chunk), np.uint8).reshape(-1, 16),
                   "meta": np.array(meta, dtype=np.int64 if version == 1 else np.uint32),
                   "sums": np.array([r[4] for r in chunk], np.float32),
                   "values": np.concatenate([r[3] for r in chunk])}
        file = root / f"shard-{s:05d}.safetensors"
        save_file(tensors, file)
        raw = file.read_bytes()
        body = raw[8 + int.from_bytes(raw[:8], "little"):]
        save_file(tensors, file, metadata={"format": "refmodel-logprob-store", "version": str(version),
                                           "fingerprint": fp, "dtype": "float32", "entries": str(len(chunk)),
                                           "data_blake2b": hashlib.blake2b(body, digest_size=16).hexdigest()})
        blob = file.read_bytes()
        shards.append({"file": file.name, "entries": len(chunk), "tokens": int(tensors["values"].size),
                       "bytes": len(blob), "blake2b": hashlib.blake2b(blob, digest_size=16).hexdigest()})
    manifest = {"format": "refmodel-logprob-store", "version": version, "fingerprint": fp, "dtype": "float32",
                "shards": shards, "job": None}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return rows


def _sum_offset(file, row):
    """Byte offset of the float32 sum of ``row`` in a shard file (from its safetensors header)."""
    raw = file.read_bytes()
    hlen = int.from_bytes(raw[:8], "little")
    begin = json.loads(raw[8:8 + hlen])["sums"]["data_offsets"][0]
    return 8 + hlen + begin + 4 * row


def _rewrite_sum(file, row, value):
    data = bytearray(file.read_bytes())
    off = _sum_offset(file, row)
    data[off:off + 4] = struct.pack("<f", value)
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("version", [1, 2])
def test_old_versions_are_read_and_verified(tmp_path, version):
    seqs = _seqs()
    write_old_store(tmp_path / "s", seqs, version)
    with LogprobStore.open(tmp_path / "s", "fp-old") as store:
        assert store.verify()["entries"] == len(seqs)
        for ids, logps, mask in seqs:
            torch.testing.assert_close(store.get(ids), torch.where(mask, logps, 0.0), rtol=0, atol=0)
            assert store.get_sum(ids) == pytest.approx(float(torch.where(mask, logps, 0.0).double().sum()),
                                                       rel=1e-6)
    # Appending to an old store writes new-format shards beside the old ones; both stay readable.
    extra = _seqs(3, seed=5)
    with LogprobStore.open(tmp_path / "s", mode="a") as store:
        for s in extra:
            assert store.put(*s)
    # ... and the manifest now says version 3, so an older refmodel refuses it by version, not as "corrupt".
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["version"] == VERSION
    with LogprobStore.open(tmp_path / "s") as store:
        assert store.verify()["entries"] == len(seqs) + len(extra)
        assert all(ids in store for ids, _, _ in seqs + extra)


@pytest.mark.parametrize("version", [1, 2])
def test_old_versions_keep_their_crc_semantics(tmp_path, version):
    # Old shards' crc leaves the sum out: an edited sum passes the crc, and the read's sum check (the sum
    # of the values) catches it instead; verify also sees the data checksum.
    seqs = _seqs()
    write_old_store(tmp_path / "s", seqs, version)
    _rewrite_sum(tmp_path / "s" / "shard-00000.safetensors", 0, 123.0)
    store = LogprobStore.open(tmp_path / "s")
    with pytest.raises(StoreCorrupt, match=r"entry 0 .*shard-00000.*stored sum 123\.0 is not the sum"):
        [store.get_sum(ids) for ids, _, _ in seqs]
    with pytest.raises(StoreCorrupt, match="blake2b"):
        store.verify()


def test_corrupted_sum_is_caught_on_every_read_path(tmp_path):
    assert VERSION >= SUM_IN_CRC
    seqs = _seqs()
    with LogprobStore.create(tmp_path / "s", "fp", dtype="float32", shard_entries=4) as store:
        for s in seqs:
            store.put(*s)
    shard = tmp_path / "s" / "shard-00001.safetensors"
    _rewrite_sum(shard, 2, -1.5)
    store = LogprobStore.open(tmp_path / "s")
    victim = [s for s in seqs[4:8] if key_of(s[0]) == sorted(key_of(x[0]) for x in seqs[4:8])[2]][0]
    with pytest.raises(StoreCorrupt, match="crc32"):
        store.get_sum(victim[0])
    with pytest.raises(StoreCorrupt, match="crc32"):
        store.get_sums(victim[0][None])
    with pytest.raises(StoreCorrupt, match="crc32"):
        list(store.entries())
    ids = tuple(victim[0].tolist())
    pair = Example(ids[:1], (ids[1:], ids[1:-1]), ((True,) * (len(ids) - 1), (True,) * (len(ids) - 2)),
                   ("chosen", "rejected"), "row 0")
    with pytest.raises(StoreCorrupt, match="crc32"):  # the columns `store export-trl` writes for this record
        trl_columns(store, pair, {"prompt": "p", "chosen": "c", "rejected": "r"})
    with pytest.raises(StoreCorrupt, match="shard-00001"):
        store.verify()
    for ids, logps, mask in seqs:  # every other entry still reads, sum included
        if ids is not victim[0]:
            assert store.get_sum(ids) == pytest.approx(float(torch.where(mask, logps, 0.0).double().sum()),
                                                       rel=1e-6)


@pytest.mark.parametrize("damage", ["delete", "truncate", "garbage header"])
def test_one_bad_shard_fails_only_its_own_rows(tmp_path, damage):
    seqs = _seqs(12)
    with LogprobStore.create(tmp_path / "s", "fp", dtype="float32", shard_entries=4) as store:
        for s in seqs:
            store.put(*s)
    bad = tmp_path / "s" / "shard-00000.safetensors"
    if damage == "delete":
        bad.unlink()
    elif damage == "truncate":
        bad.write_bytes(bad.read_bytes()[:40])
    else:
        bad.write_bytes(b"\xff" * 64)
    store = LogprobStore.open(tmp_path / "s")
    in_bad = {key_of(s[0]) for s in seqs[:4]}
    for ids, logps, mask in seqs[4:]:  # rows of later shards are found and right
        assert torch.equal(store.get(ids), torch.where(mask, logps, 0.0))
    ids_good = torch.nn.utils.rnn.pad_sequence([s[0] for s in seqs[4:]], batch_first=True)
    attn = torch.nn.utils.rnn.pad_sequence([torch.ones(len(s[0]), dtype=torch.long) for s in seqs[4:]],
                                           batch_first=True)
    assert store.get_sums(ids_good, attn).shape == (8,)
    for ids, _, _ in seqs[:4]:
        assert key_of(ids) in in_bad
        with pytest.raises(StoreCorrupt, match=r"shard-00000\.safetensors.*refmodel store repair"):
            store.get(ids)
    with pytest.raises(StoreCorrupt, match="shard-00000"):
        store.get_batch(seqs[0][0][None])
