"""recipes.steps.StepLog: the history, metrics.jsonl and the KL monitor of a training loop."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass

import pytest

from refmodel.errors import MissingDependency
from refmodel.losses.kl import KLMonitor
from refmodel.recipes.steps import StepLog, plot_or_skip
from refmodel.recipes.train import plot_metrics


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


def test_metrics_file_name_is_the_callers(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("another run's rows\n")
    log = StepLog([], KLMonitor(), tmp_path, "cfg.json", _Cfg(), metrics_name="grpo_metrics.jsonl")
    log.record({"step": 1}, 1, float("nan"))
    log.close()
    assert log.metrics_path == tmp_path / "grpo_metrics.jsonl"
    assert (tmp_path / "metrics.jsonl").read_text() == "another run's rows\n"  # left alone
    assert json.loads(log.metrics_path.read_text()) == {"step": 1}


def test_a_missing_matplotlib_skips_the_plot_with_one_line(tmp_path, monkeypatch, caplog):
    # sys.modules[name] = None is how Python itself marks a module as not importable: `import` raises.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependency, match=r"'matplotlib'.*'plot' extra: pip install -e .*\[plot\]"):
        plot_metrics([{"step": 1, "loss": 0.5}], tmp_path / "curves.png")
    with caplog.at_level(logging.WARNING, logger="refmodel.recipes.steps"):
        assert plot_or_skip(plot_metrics, [{"step": 1, "loss": 0.5}], tmp_path / "curves.png") is None
    assert len(caplog.records) == 1 and "curves.png not drawn" in caplog.records[0].getMessage()
    assert "[plot]" in caplog.records[0].getMessage() and not (tmp_path / "curves.png").exists()
