"""A full disk or a read-only filesystem: a one-line StorageError naming the path and cause, no temp files.

Uses a real small filesystem (a tmpfs of a few hundred KiB, mounted here; needs root, else skipped).
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from refmodel.errors import StorageError
from refmodel.store import LogprobStore
from refmodel.testing import preference_pairs, run_cli, write_jsonl


@pytest.fixture
def small_fs(tmp_path):
    """``remount(size_kib, ro=False)`` and the mount point of a fresh tmpfs."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")

    def remount(size_kib: int | None = None, ro: bool = False):
        opts = ",".join(["remount", "ro" if ro else "rw"] + ([f"size={size_kib}k"] if size_kib else []))
        subprocess.run(["mount", "-o", opts, str(mnt)], check=True)

    yield mnt, remount
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _seq(i, t=600):
    ids = torch.arange(i * t, (i + 1) * t)
    return ids, -torch.rand(t, generator=torch.Generator().manual_seed(i)) - 0.01, torch.arange(t) >= 1


def _leftovers(root):
    return [p.name for p in root.iterdir() if ".tmp-" in p.name]


def test_disk_full_raises_storage_error_and_leaves_no_temp_file(small_fs):
    mnt, remount = small_fs
    root = mnt / "s"
    store = LogprobStore.create(root, "fp", dtype="float32", shard_entries=10)  # ~24 KiB per shard
    with pytest.raises(StorageError) as err:
        for i in range(200):
            store.put(*_seq(i))
    msg = str(err.value)
    assert str(root) in msg and "No space left on device (ENOSPC)" in msg and "\n" not in msg
    assert isinstance(err.value, OSError) and _leftovers(root) == []
    store.close(flush=False)
    with LogprobStore.open(root) as readable:  # what was committed is intact
        committed = len(readable)
        assert committed >= 10 and readable.verify()
        assert torch.equal(readable.get(_seq(0)[0]), torch.where(_seq(0)[2], _seq(0)[1], 0.0))
    remount(2048)
    with LogprobStore.open(root, mode="a") as store:
        for i in range(committed + 40):
            store.put(*_seq(i))
    assert len(LogprobStore.open(root, verify=True)) == committed + 40


def test_read_only_filesystem(small_fs):
    mnt, remount = small_fs
    remount(ro=True)
    with pytest.raises(StorageError, match=r"Read-only file system \(EROFS\).*read-only; choose a writable"):
        LogprobStore.create(mnt / "s", "fp")


@pytest.mark.integration
def test_cli_precompute_on_a_full_disk_then_resume(small_fs, tiny_model_dirs, tmp_path):
    mnt, remount = small_fs
    data = write_jsonl(preference_pairs(24, seed=1), tmp_path / "d.jsonl")
    args = ["precompute", "--model", tiny_model_dirs["gpt2"], "--data", data, "--shard-examples", "2",
            "--dtype", "float32"]
    full = json.loads(run_cli(*args, "--out", tmp_path / "full").stdout)
    remount(max(16, full["bytes"] // 2048))  # room for about half of the store
    res = run_cli(*args, "--out", mnt / "s", check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: StorageError: cannot write ") and str(mnt / "s") in last and "ENOSPC" in last
    assert _leftovers(mnt / "s") == []
    remount(4096)
    run_cli(*args, "--out", mnt / "s", "--resume")
    files = lambda p: {f.name: f.read_bytes() for f in p.iterdir() if f.name != "writer.lock"}  # noqa: E731
    assert files(mnt / "s") == files(tmp_path / "full")
