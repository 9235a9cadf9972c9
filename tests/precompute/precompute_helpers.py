"""Shared by the precompute tests: kill a running ``refmodel precompute`` once it has committed shards."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from refmodel.testing import subprocess_env


def committed_shards(out: Path) -> int:
    return len(json.loads((out / "manifest.json").read_text())["shards"])


def kill_after_shards(args: list, out: Path, at_least: int, timeout_s: float = 120) -> int:
    """Run ``refmodel *args --out out``, SIGKILL it once ``at_least`` shards are committed; return how many are."""
    proc = subprocess.Popen([sys.executable, "-m", "refmodel", *map(str, args), "--out", str(out)],
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        try:
            if committed_shards(out) >= at_least:
                break
        except (OSError, ValueError):  # no manifest yet, or read while being replaced
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the job finished before it could be killed"
    return committed_shards(out)


def assert_store_follows_plan(path: Path, plan) -> None:
    """The store at ``path`` is what ``plan`` (a ``PrecomputePlan``) says: its job, fingerprint, dtype, and in
    each shard file exactly the keys of that shard of the plan."""
    from safetensors.numpy import load_file

    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["job"] == plan.job
    assert manifest["fingerprint"] == plan.fingerprint and manifest["dtype"] == plan.dtype
    files = sorted(path.glob("shard-*.safetensors"))
    assert len(files) == plan.n_shards
    for i, file in enumerate(files):
        assert file.name.startswith(f"shard-{i:05d}")
        stored = sorted(k.tobytes() for k in load_file(str(file))["keys"])
        assert stored == sorted(k for u in plan.shard(i) for k in u.keys), file.name
