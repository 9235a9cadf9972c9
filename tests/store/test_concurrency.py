"""One writer process and several reader processes on the same store at once.

Readers must only ever see complete, committed shards: every entry they can read has exactly the
values the writer put, and the entry count is always a whole number of shards.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from refmodel.testing import subprocess_env

N, SHARD = 60, 5

COMMON = textwrap.dedent(f"""
    import sys, time, torch
    from refmodel.store import LogprobStore, key_of
    N, SHARD = {N}, {SHARD}
    def seq(i):
        ids = torch.arange(i, i + 5 + i % 17)
        logps = -(ids % 7).float() / 3 - i
        return ids, logps, torch.arange(len(ids)) >= 2
    expected = {{key_of(seq(i)[0]): torch.where(seq(i)[2], seq(i)[1], 0.0) for i in range(N)}}
""")

WRITER = COMMON + textwrap.dedent("""
    import pathlib
    while len(list(pathlib.Path(sys.argv[1]).parent.glob("ready-*"))) < 2:  # readers are up
        time.sleep(0.01)
    store = LogprobStore.open(sys.argv[1], mode="a")
    for i in range(N):
        store.put(*seq(i))
        if (i + 1) % SHARD == 0:
            store.flush()
            time.sleep(0.03)
    store.close()
""")

READER = COMMON + textwrap.dedent("""
    while True:
        try:
            store = LogprobStore.open(sys.argv[1])
            break
        except Exception:
            time.sleep(0.01)
    import os, pathlib
    pathlib.Path(sys.argv[1]).parent.joinpath(f"ready-{os.getpid()}").touch()
    snapshots, t0 = 0, time.time()
    while time.time() - t0 < 60:
        store.refresh()
        items = list(store.items())
        assert len(items) == len(store) and len(items) % SHARD == 0, (len(items), len(store))
        for key, logps in items:
            assert torch.equal(logps, expected[key]), key
        snapshots += 1
        if len(items) == N:
            break
    assert len(items) == N, len(items)
    print(snapshots)
""")


@pytest.mark.integration
def test_readers_never_see_partial_shards(tmp_path):
    from refmodel.store import LogprobStore

    path = tmp_path / "s"
    LogprobStore.create(path, "fp", dtype="float32").close()
    env = subprocess_env()
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(path)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    writer = subprocess.run([sys.executable, "-c", WRITER, str(path)], env=env, capture_output=True, text=True,
                            timeout=120)
    assert writer.returncode == 0, writer.stderr
    for proc in readers:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert int(out.strip()) >= 3  # it read while the writer was writing
    assert len(LogprobStore.open(path)) == N
