"""recipes.steps.StepLog: the history, metrics.jsonl and the KL monitor of a training loop."""

from __future__ import annotations

import json
from dataclasses import dataclass

from refmodel.losses.kl import KLMonitor
from refmodel.recipes.steps import StepLog


@dataclass
class _Cfg:
    lr: float = 1e-3


def test_steps_go_to_history_file_and_monitor(tmp_path):
    history: list[dict] = []
    monitor = KLMonitor(threshold=10.0)
    log = StepLog(history, monitor, tmp_path / "run", "cfg.json", _Cfg())
    log.record({"step": 1, "loss": 0.5}, 1, 0.25)
    log.record({"step": 2, "loss": 0.4}, 2, float("nan"))  # no KL measured: the monitor is not told
    log.close()
    assert history == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == history
    assert json.loads((tmp_path / "run" / "cfg.json").read_text()) == {"lr": 1e-3}
    assert monitor.history == [(1, 0.25)]


def test_without_an_output_folder_nothing_is_written(tmp_path):
    history: list[dict] = []
    log = StepLog(history, KLMonitor(), None, "cfg.json", _Cfg())
    log.record({"step": 1}, 1, 0.1)
    log.close()
    assert history == [{"step": 1}] and list(tmp_path.iterdir()) == []
