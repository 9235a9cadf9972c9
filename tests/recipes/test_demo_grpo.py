"""The GRPO demo through the CLI (about 100 s on 2 busy CPU cores)."""

from __future__ import annotations

import json

import pytest

from refmodel.testing import run_cli


@pytest.mark.slow
@pytest.mark.integration
def test_grpo_demo_cli_learns(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--algo", "grpo", "--out", out, timeout=900)
    assert "reward of fresh samples" in proc.stdout and "time share: reference" in proc.stdout
    f = json.loads((out / "grpo_summary.json").read_text())
    assert f["reward_before"] < 0.05 and f["reward_after"] > 0.8  # measured 0.006 -> 0.931
    assert 0 < f["final_exact_kl"] < 10 and f["reference_bytes"] == 0
    assert 0 < f["time_share"]["time_reference_s"] < 0.5 and f["time_share"]["time_old_s"] == 0
    assert (out / "grpo_curves.png").stat().st_size > 10_000
    assert f["metrics"] == str(out / "grpo_metrics.jsonl")  # not the DPO demo's metrics.jsonl
    assert len((out / "grpo_metrics.jsonl").read_text().splitlines()) == f["steps"]
