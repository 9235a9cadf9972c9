"""The demo end to end through the CLI (about 40 s on 2 busy CPU cores)."""

from __future__ import annotations

import json
import re

import pytest

from refmodel.testing import run_cli


@pytest.mark.slow
@pytest.mark.integration
def test_demo_cli_learns_and_strategies_agree(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--out", out, timeout=600)
    assert "held-out reward accuracy" in proc.stdout and "curves:" in proc.stdout
    # The demo quantizes nothing and uses no service: no notice from torchao, bitsandbytes, Ray or FastAPI
    # (they used to print "Failed to load ... _C_mxfp8" and "Detected no triton"), no INFO lines.
    noise = re.compile(r"torchao|bitsandbytes|triton|_C_mxfp8|_pytree|gemm_4bit|\bray\b|fastapi|uvicorn", re.I)
    assert noise.search(proc.stderr) is None, proc.stderr
    assert re.search(r"^\S+ \S+ INFO ", proc.stderr, re.M) is None, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr  # nor any library's warning (PEFT's FutureWarning was the last)
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["eval_accuracy_after"] > 0.75  # chance is 0.5; measured 0.87
    assert summary["first_batch_loss_max_abs_diff"] < 1e-5  # float32 store: same numbers as live
    names = [row["strategy"] for row in summary["strategies"]]
    assert names == ["frozen copy", "adapter disabled (LoRA)", "precomputed (store)"]
    memory = {row["strategy"]: row["reference_bytes"] for row in summary["strategies"]}
    assert memory["frozen copy"] > 0 and memory["precomputed (store)"] == 0
    assert memory["adapter disabled (LoRA)"] == 0
    assert (out / "curves.png").stat().st_size > 10_000
    assert len((out / "metrics.jsonl").read_text().splitlines()) == summary["steps"]
