"""Every model-based reference strategy under DeepSpeed ZeRO-3 on 2 processes (``torchrun``, gloo, CPU) against one
process: ``model_logprobs``, ``Frozen.from_policy``, ``Frozen(path)`` loaded under an active config (TRL's script
order), ``AdapterDisabled`` of a PEFT LoRA policy, ``Synced`` full and PEFT after one DPO step of refmodel's own
loss, and the fingerprints. One launch runs every case (``zero3_strategies_script.py``); importing DeepSpeed is slow.

Values are compared relative to ``max(1, |one process|)`` within 1e-6 (float32): the tiny llama's log-probs reach
-20, where one float32 step is 2e-6. Under ZeRO-3 the head runs as its own module (its hooks gather it), the
fused kernel on one process: the two sum in different orders.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from refmodel.testing import free_port, subprocess_env

SCRIPT = Path(__file__).with_name("zero3_strategies_script.py")
TOL = 1e-6


@pytest.fixture(scope="module")
def zero3_run(tiny_model_dirs) -> list[dict]:
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install 'refmodel[distributed]')")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(SCRIPT), str(tiny_model_dirs["llama"])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(OMP_NUM_THREADS=1))
    lines = [line for line in done.stdout.splitlines() if line.startswith("ZERO3_RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads(lines[-1].removeprefix("ZERO3_RESULT "))


@pytest.mark.integration
@pytest.mark.slow
def test_every_strategy_under_zero3_equals_one_process(zero3_run):
    assert len(zero3_run) == 2
    for rank, res in enumerate(zero3_run):
        assert res["partitioned"], f"rank {rank}: the policy was not partitioned, nothing was tested"
        for case in ("from_policy_ref", "synced_full_ref", "frozen_path_ref", "synced_peft_ref"):
            assert res[case] == "ok", f"rank {rank}: {case}: {res[case]}"
        for case in ("model_logprobs", "from_policy", "frozen_path", "adapter_disabled", "synced_full", "synced_peft",
                     "peft_policy_after_step", "dpo_loss", "dpo_loss_peft"):
            assert isinstance(res[case], float) and res[case] <= TOL, f"rank {rank}: {case} differs from one process by {res[case]:.3g}"
        for case in ("head_outside_gather", "unprepared_model"):  # a clear error naming ZeRO-3, not InvalidBatch
            assert isinstance(res[case], str) and res[case].startswith("ConfigError") and "ZeRO-3" in res[case], \
                f"rank {rank}: {case}: {res[case]}"
        assert res["frozen_offload"].startswith("ConfigError") and "offload_to_cpu" in res["frozen_offload"]
        # The step moved both references (so the synced comparisons could fail).
        assert res["synced_full_changed"] > 1e-2 and res["synced_peft_changed"] > 1e-2
        for case in ("fingerprint", "from_policy_fingerprint", "frozen_path_fingerprint",
                     "adapter_disabled_fingerprint"):
            assert res[case] is True, f"rank {rank}: {case} differs from the plain model's"
        for case in ("from_policy_bytes", "frozen_path_bytes"):  # per rank: about half of the plain model
            local, whole = res[case]
            assert whole / 2 <= local <= whole / 2 + 4096, f"rank {rank}: {case} {local} of {whole}"
