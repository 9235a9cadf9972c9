"""Shards whose checksums are valid but whose content lies, and files that are not regular files.

The bad shards are forged here, independently of refmodel's writer: the tensors are edited with numpy,
then every entry's crc32 (format 3: key, count, start, seq_len, values, sum), the data checksum and the
manifest's size and blake2b are recomputed, so only the content checks can catch them.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from refmodel.errors import InvalidInput, StoreCorrupt
from refmodel.store import LogprobStore, key_of
from refmodel.testing import run_cli

PER_SHARD = 4
BAD = "shard-00000.safetensors"


def _seq(i):
    t = 5 + i % 7
    ids = torch.arange(100 * i, 100 * i + t)
    return ids, -torch.rand(t, generator=torch.Generator().manual_seed(i)) * 5 - 0.01, torch.arange(t) >= 2


def _store(root, n=8):
    """A float32 store of ``n`` sequences, PER_SHARD per shard; returns the sequences by shard file."""
    seqs = [_seq(i) for i in range(n)]
    with LogprobStore.create(root, "fp", dtype="float32", shard_entries=PER_SHARD) as store:
        for s in seqs:
            store.put(*s)
    return {f"shard-{j:05d}.safetensors": seqs[j * PER_SHARD:(j + 1) * PER_SHARD] for j in range(n // PER_SHARD)}


def _forge(root, name, edit):
    """Apply ``edit(tensors)`` to shard ``name``, then make every checksum (entry, data, manifest) valid again."""
    file = root / name
    tensors = {k: v.copy() for k, v in load_file(file).items()}
    edit(tensors)
    keys, meta, sums, values = tensors["keys"], tensors["meta"], tensors["sums"], tensors["values"]
    for row in range(len(keys)):
        off, count, start, seq_len = (int(x) for x in meta[row, :4])
        vals = values[off:off + count].tobytes() if off + count <= values.size else b""
        crc = zlib.crc32(vals, zlib.crc32(keys[row].tobytes() + struct.pack("<qqq", count, start, seq_len)))
        meta[row, 4] = zlib.crc32(struct.pack("<f", float(sums[row])), crc)
    save_file(tensors, file)
    raw = file.read_bytes()
    body = raw[8 + int.from_bytes(raw[:8], "little"):]
    save_file(tensors, file, metadata={"format": "refmodel-logprob-store", "version": "3", "fingerprint": "fp",
                                       "dtype": "float32", "entries": str(len(keys)),
                                       "data_blake2b": hashlib.blake2b(body, digest_size=16).hexdigest()})
    _relist(root, name, len(keys), int(values.size))


def _relist(root, name, entries, tokens):
    """Make the manifest's size, blake2b and counts of shard ``name`` match the file on disk."""
    blob = (root / name).read_bytes() if (root / name).is_file() else b""
    manifest = json.loads((root / "manifest.json").read_text())
    for spec in manifest["shards"]:
        if spec["file"] == name:
            spec.update(bytes=len(blob), blake2b=hashlib.blake2b(blob, digest_size=16).hexdigest(),
                        entries=entries, tokens=tokens)
    (root / "manifest.json").write_text(json.dumps(manifest))


def _row_of(seqs, row):
    """The sequence stored in ``row`` of a shard holding ``seqs`` (rows are in key order)."""
    return sorted(seqs, key=lambda s: key_of(s[0]))[row]


def _meta(row, col, value):
    def edit(t):
        t["meta"][row, col] = value
    return edit


def _value(row, pos, value):
    def edit(t):
        t["values"][int(t["meta"][row, 0]) + pos] = value
        t["sums"][row] = np.float32(t["values"][int(t["meta"][row, 0]):][:int(t["meta"][row, 1])]
                                    .astype(np.float64).sum())  # the sum agrees: only the value lies
    return edit


def _sum(row, delta):
    def edit(t):
        t["sums"][row] += np.float32(delta)
    return edit


def _duplicate_key(t):
    t["keys"][2] = t["keys"][1]


# (edit, row it damages, what the error says)
LIES = {
    "span past the sequence end": (lambda t: _meta(1, 2, int(t["meta"][1, 3]) - int(t["meta"][1, 1]) + 1)(t),
                                   1, "scored span past the end of its sequence"),
    "huge start": (_meta(1, 2, 2**31), 1, "scored span past the end"),
    "NaN value": (_value(1, 0, np.nan), 1, "is nan"),
    "inf value": (_value(1, 0, -np.inf), 1, "is -inf"),
    "positive log-prob": (_value(1, 0, 3.0), 1, "> 0"),
    "sum disagrees": (_sum(1, -0.5), 1, "is not the sum"),
    "duplicate key": (_duplicate_key, 2, "repeats the key of entry 1"),
}


@pytest.mark.parametrize("case", list(LIES))
def test_a_lying_entry_is_store_corrupt_confined_to_its_shard(tmp_path, case):
    edit, row, says = LIES[case]
    root = tmp_path / "s"
    by_shard = _store(root)
    _forge(root, BAD, edit)
    store = LogprobStore.open(root)
    victim = _row_of(by_shard[BAD], row)
    with pytest.raises(StoreCorrupt, match=rf"entry {row} .*{BAD}.*{says}"):
        store.get(victim[0])
    with pytest.raises(StoreCorrupt, match=BAD):
        list(store.entries())
    for ids, logps, mask in by_shard["shard-00001.safetensors"]:  # the intact shard keeps working
        assert torch.equal(store.get(ids), torch.where(mask, logps, 0.0))
    problems = store.problems()
    assert [p.file for p in problems] == [BAD] and says.split()[0] in problems[0].reason, problems


def test_a_huge_seq_len_allocates_nothing(tmp_path):
    # Before: entries() allocated seq_len float32s (16 GiB for 2**32 - 1) for one entry.
    root = tmp_path / "s"
    _store(root)
    _forge(root, BAD, _meta(0, 3, 2**32 - 1))
    store = LogprobStore.open(root)
    with pytest.raises(StoreCorrupt, match=rf"entry 0 .*{BAD} claims a sequence longer than"):
        list(store.entries())
    assert [p.file for p in store.problems()] == [BAD]


def test_sum_tolerance_admits_the_storage_cast(tmp_path):
    # bfloat16 and float16 shards keep the float32 sum taken before the cast: their reads must pass.
    for dtype in ("bfloat16", "float16"):
        seqs = [(torch.arange(i, i + 300), -torch.rand(300, generator=torch.Generator().manual_seed(i)) * 30,
                 torch.ones(300, dtype=torch.bool)) for i in range(6)]
        with LogprobStore.create(tmp_path / dtype, "fp", dtype=dtype) as store:
            for s in seqs:
                store.put(*s)
        with LogprobStore.open(tmp_path / dtype) as store:
            assert store.verify()["entries"] == 6
            for ids, logps, _ in seqs:
                assert store.get_sum(ids) == pytest.approx(float(logps.double().sum()), rel=1e-6)


def test_the_writer_refuses_what_the_reader_would(tmp_path):
    store = LogprobStore.create(tmp_path / "s", "fp", dtype="float16")
    ids = torch.arange(4)
    with pytest.raises(InvalidInput, match="> 0"):
        store.put(ids, torch.tensor([-1.0, 2.0, -1.0, -1.0]), torch.ones(4, dtype=torch.bool))
    assert store.put(ids, torch.tensor([-1.0, -1e5, -1.0, -1.0]), torch.ones(4, dtype=torch.bool))
    with pytest.raises(InvalidInput, match="float16 overflows"):  # -1e5 is -inf in float16
        store.flush()
    store.close(flush=False)


def _deep_header(file):
    head = b"[" * 100_000
    file.write_bytes(struct.pack("<Q", len(head)) + head)


def _directory(file):
    file.unlink()
    file.mkdir()
    (file / "x").write_bytes(b"inside")


@pytest.mark.parametrize("damage", [_directory, _deep_header], ids=["directory", "100000-deep header"])
def test_a_shard_that_cannot_be_parsed_breaks_nothing_else(tmp_path, damage, cli_python):
    root = tmp_path / "s"
    by_shard = _store(root, n=12)
    damage(root / BAD)
    _relist(root, BAD, PER_SHARD, 0)  # even with a matching size and hash in the manifest
    store = LogprobStore.open(root)
    for ids, logps, mask in by_shard["shard-00001.safetensors"] + by_shard["shard-00002.safetensors"]:
        assert torch.equal(store.get(ids), torch.where(mask, logps, 0.0))
    with pytest.raises(StoreCorrupt, match=BAD):
        store.get(by_shard[BAD][0][0])
    assert [p.file for p in store.problems()] == [BAD]
    res = run_cli("store", "verify", root, check=False, timeout=120, python=cli_python)
    assert res.returncode == 1 and "Traceback" not in res.stderr and BAD in res.stderr, res.stderr
    res = run_cli("store", "repair", root, "--drop", check=False, timeout=120, python=cli_python)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert not os.path.lexists(root / BAD)
    assert LogprobStore.open(root).verify()["entries"] == 8


def test_a_fifo_in_place_of_a_shard_blocks_nothing(tmp_path, cli_python):
    root = tmp_path / "s"
    by_shard = _store(root)
    (root / BAD).unlink()
    os.mkfifo(root / BAD)
    # A child process each, with a timeout: before the fix every one of these blocked forever in open().
    res = run_cli("store", "verify", root, check=False, timeout=60, python=cli_python)
    assert res.returncode == 1 and "Traceback" not in res.stderr and BAD in res.stderr, res.stderr
    store = LogprobStore.open(root, mode="a")
    with pytest.raises(StoreCorrupt, match=rf"{BAD} is a FIFO"):
        store.get(by_shard[BAD][0][0])
    ids, logps, mask = by_shard["shard-00001.safetensors"][0]
    assert torch.equal(store.get(ids), torch.where(mask, logps, 0.0))
    store.discard_damaged()
    store.close()
    assert not os.path.lexists(root / BAD)


def test_a_fifo_in_place_of_the_manifest_blocks_nothing(tmp_path, cli_python):
    root = tmp_path / "s"
    _store(root)
    (root / "manifest.json").unlink()
    os.mkfifo(root / "manifest.json")
    for cmd in (("store", "info", root), ("store", "verify", root)):
        res = run_cli(*cmd, check=False, timeout=60, python=cli_python)
        assert res.returncode == 1 and "Traceback" not in res.stderr and "FIFO" in res.stderr, res.stderr
    for mode in ("r", "a"):
        with pytest.raises(StoreCorrupt, match="manifest.json is a FIFO"):
            LogprobStore.open(root, mode=mode)


def test_a_symlinked_shard_inside_the_store_is_refused(tmp_path):
    root = tmp_path / "s"
    by_shard = _store(root)
    os.replace(root / BAD, root / "elsewhere")
    os.symlink(root / "elsewhere", root / BAD)
    store = LogprobStore.open(root)
    with pytest.raises(StoreCorrupt, match="symbolic link"):
        store.get(by_shard[BAD][0][0])


def test_verify_reports_every_damaged_shard_and_drop_removes_them_all(tmp_path, cli_python):
    root = tmp_path / "s"
    by_shard = _store(root, n=16)
    _directory(root / "shard-00000.safetensors")
    _deep_header(root / "shard-00001.safetensors")
    (root / "shard-00002.safetensors").unlink()
    os.mkfifo(root / "shard-00002.safetensors")
    damaged = [f"shard-0000{i}.safetensors" for i in range(3)]
    for name in damaged:
        _relist(root, name, PER_SHARD, 0)
    assert sorted(p.file for p in LogprobStore.open(root).problems()) == damaged
    res = run_cli("store", "verify", root, check=False, timeout=120, python=cli_python)
    assert res.returncode == 1 and "Traceback" not in res.stderr and "3 problem(s)" in res.stderr, res.stderr
    assert all(name in res.stderr for name in damaged)
    res = run_cli("store", "repair", root, "--drop", check=False, timeout=120, python=cli_python)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert not any(os.path.lexists(root / name) for name in damaged)
    with LogprobStore.open(root) as store:
        assert store.verify()["entries"] == PER_SHARD
        for ids, logps, mask in by_shard["shard-00003.safetensors"]:
            assert torch.equal(store.get(ids), torch.where(mask, logps, 0.0))
