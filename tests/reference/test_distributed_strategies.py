"""Every model-based strategy under DDP, FSDP2 and DeepSpeed ZeRO-3 (``torchrun --nproc_per_node 2``, gloo, CPU)
against one process.

One launch runs every case (``dist_strategies_script.py``: model_logprobs, Frozen from a path and from the
policy, sharded like it, AdapterDisabled with a real LoRA policy, Synced full and PEFT after an optimizer
step, the DPO loop's loss, fingerprints); each rank writes JSON that this test checks within 1e-6 (float32).
Before ``models.sharding`` and ``run_in_forward``, FSDP2 crashed in ``model_logprobs`` (``aten.embedding got
mixed torch.Tensor and DTensor``), ``Frozen.from_policy`` (``FSDP does not support deepcopy``) and
``fingerprint``.

ZeRO-3 (when deepspeed is installed) runs its own cases in the same launch, last (``run_zero3``: engine steps,
``Frozen(path)`` under an active ``HfDeepSpeedConfig``, the clear errors outside a gather). Its values are compared
relative to ``max(1, |one process|)`` within 1e-6: the tiny llama's log-probs reach -20, where one float32 step is
2e-6. Before ``models.zero3`` every ZeRO-3 case failed (``InvalidBatch ... [0, 0)``, fingerprints of the empty
placeholders, 64-byte ``memory_bytes``, a RuntimeError in Synced PEFT).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from refmodel.testing import free_port, make_tiny_model, subprocess_env

SCRIPT = Path(__file__).with_name("dist_strategies_script.py")
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
BACKENDS = ("ddp", "fsdp2", "zero3") if HAS_DEEPSPEED else ("ddp", "fsdp2")  # zero3 last (see the script)
ZERO3_TOL = 1e-6  # relative to max(1, |one process|)
CHECKS = {  # every check the script must report, per part
    "full": {"model_logprobs", "Frozen.from_policy", "full_parameters", "DPO step-1 loss (Frozen path)",
             "Frozen(path, shard_like=policy)",
             "Synced full after a step", "policy after a step", "DPO step-2 loss (Frozen.from_policy)"},
    "peft": {"AdapterDisabled", "model_logprobs PEFT", "Synced PEFT before a step",
             "DPO step-1 loss (AdapterDisabled)", "Synced PEFT after a step"},
}


@pytest.mark.integration
@pytest.mark.slow
def test_strategies_under_ddp_fsdp2_and_zero3_equal_one_process(tmp_path):
    pytest.importorskip("peft")
    policy = make_tiny_model("llama", tmp_path / "policy", seed=0)
    reference = make_tiny_model("llama", tmp_path / "reference", seed=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(SCRIPT), str(policy), str(reference), str(tmp_path), "--backends", ",".join(BACKENDS)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=540, env=subprocess_env(OMP_NUM_THREADS=1))
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(line) for rank in (0, 1) for line in (tmp_path / f"rank{rank}.jsonl").read_text().splitlines()]
    plain_backends = [b for b in BACKENDS if b != "zero3"]
    assert len(rows) == 2 * (len(plain_backends) * len(CHECKS) + HAS_DEEPSPEED)
    for row in rows:
        if row["backend"] == "zero3":
            _check_zero3(row["rank"], row["zero3"])
            continue
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


def _check_zero3(rank: int, res: dict) -> None:
    """The ZeRO-3 cases of one rank (``run_zero3``): values within 1e-6 relative, clear errors, bytes per rank."""
    assert res["partitioned"], f"rank {rank}: the policy was not partitioned, nothing was tested"
    for case in ("from_policy_ref", "synced_full_ref", "frozen_path_ref", "synced_peft_ref"):
        assert res[case] == "ok", f"rank {rank}: {case}: {res[case]}"
    for case in ("model_logprobs", "from_policy", "frozen_path", "adapter_disabled", "synced_full", "synced_peft",
                 "peft_policy_after_step", "dpo_loss", "dpo_loss_peft"):
        assert isinstance(res[case], float) and res[case] <= ZERO3_TOL, \
            f"rank {rank}: zero3 {case} differs from one process by {res[case]}"
    for case in ("head_outside_gather", "unprepared_model"):  # a clear error naming ZeRO-3, not InvalidBatch
        assert isinstance(res[case], str) and res[case].startswith("ConfigError") and "ZeRO-3" in res[case], \
            f"rank {rank}: {case}: {res[case]}"
    assert res["frozen_offload"].startswith("ConfigError") and "offload_to_cpu" in res["frozen_offload"]
    # The step moved both references (so the synced comparisons could fail).
    assert res["synced_full_changed"] > 1e-2 and res["synced_peft_changed"] > 1e-2
    for case in ("fingerprint", "from_policy_fingerprint", "frozen_path_fingerprint", "adapter_disabled_fingerprint"):
        assert res[case] is True, f"rank {rank}: zero3 {case} differs from the plain model's"
    for case in ("from_policy_bytes", "frozen_path_bytes"):  # per rank: about half of the plain model
        local, whole = res[case]
        assert whole / 2 <= local <= whole / 2 + 4096, f"rank {rank}: zero3 {case} {local} of {whole}"
