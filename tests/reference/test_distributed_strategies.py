"""Every model-based strategy under DDP and FSDP2 (``torchrun --nproc_per_node 2``, gloo, CPU) against one process.

One launch runs every case (``dist_strategies_script.py``: model_logprobs, Frozen from a path and from the
policy, sharded like it, AdapterDisabled with a real LoRA policy, Synced full and PEFT after an optimizer
step, the DPO loop's loss, fingerprints); each rank writes JSON that this test checks within 1e-6 (float32).
Before ``models.sharding`` and ``run_in_forward``, FSDP2 crashed in ``model_logprobs`` (``aten.embedding got
mixed torch.Tensor and DTensor``), ``Frozen.from_policy`` (``FSDP does not support deepcopy``) and
``fingerprint``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from refmodel.testing import free_port, make_tiny_model, subprocess_env

SCRIPT = Path(__file__).with_name("dist_strategies_script.py")
BACKENDS = ("ddp", "fsdp2")
CHECKS = {  # every check the script must report, per part
    "full": {"model_logprobs", "Frozen.from_policy", "full_parameters", "DPO step-1 loss (Frozen path)",
             "Frozen(path, shard_like=policy)",
             "Synced full after a step", "policy after a step", "DPO step-2 loss (Frozen.from_policy)"},
    "peft": {"AdapterDisabled", "model_logprobs PEFT", "Synced PEFT before a step",
             "DPO step-1 loss (AdapterDisabled)", "Synced PEFT after a step"},
}


@pytest.mark.integration
@pytest.mark.slow
def test_strategies_under_ddp_and_fsdp2_equal_one_process(tmp_path):
    pytest.importorskip("peft")
    policy = make_tiny_model("llama", tmp_path / "policy", seed=0)
    reference = make_tiny_model("llama", tmp_path / "reference", seed=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(SCRIPT), str(policy), str(reference), str(tmp_path), "--backends", ",".join(BACKENDS)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(OMP_NUM_THREADS=1))
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(line) for rank in (0, 1) for line in (tmp_path / f"rank{rank}.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(BACKENDS) * len(CHECKS)
    for row in rows:
        where = f"rank {row['rank']} {row['backend']}"
        part = "peft" if "AdapterDisabled" in row["diffs"] else "full"
        assert set(row["diffs"]) == CHECKS[part], where
        too_far = {name: diff for name, diff in row["diffs"].items() if not diff <= 1e-6}
        assert not too_far, f"{where}: differs from one process: {too_far}"
        assert all(row["equal"].values()), f"{where}: {row['equal']}"
        if part == "full":
            full, frozen = row["bytes"]["full"], row["bytes"]["Frozen.from_policy"]
            # FSDP2: the frozen copy is sharded like the policy (about half per rank); DDP: a whole copy
            assert (frozen < 0.6 * full) if row["backend"] == "fsdp2" else frozen == full, (where, row["bytes"])
            assert row["bytes"]["Synced full"] == frozen
            assert row["bytes"]["Frozen(path, shard_like=policy)"] == frozen  # the same architecture, same shards
