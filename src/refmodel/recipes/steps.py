"""The per-step record the training loops (:func:`refmodel.train`, :func:`refmodel.grpo`) share.

Each optimizer step's metrics go to the run's history, to ``metrics.jsonl`` in the output folder
(``grpo_metrics.jsonl`` for :func:`refmodel.grpo`, so a DPO and a GRPO run can share a folder; one JSON
object per line, written as the step ends, so a crashed run keeps its curve) and, when the step
measured a KL, to the :class:`~refmodel.kl.KLMonitor` that warns above the threshold.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .._optional import require
from ..errors import MissingDependency
from ..losses.kl import KLMonitor

log = logging.getLogger(__name__)


class StepLog:
    """History, ``metrics.jsonl`` and KL monitor of one run.

    Args:
        history: the result's list; every recorded step's metrics are appended to it.
        monitor: receives each step's KL (nats/token) when it is not NaN.
        out_dir: created if given; holds ``metrics_name`` and ``config_name`` (the run's config, ``asdict``).
        config_name, cfg: the config file's name and the dataclass config written to it.
        metrics_name: the JSONL file's name (:attr:`metrics_path`; ``None`` without ``out_dir``).
    """

    def __init__(self, history: list[dict], monitor: KLMonitor, out_dir: Path | None, config_name: str,
                 cfg: Any, metrics_name: str = "metrics.jsonl") -> None:
        self.history, self.monitor = history, monitor
        self._file = None
        self.metrics_path = out_dir / metrics_name if out_dir is not None else None
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(out_dir / metrics_name, "w", encoding="utf-8")
            (out_dir / config_name).write_text(json.dumps(asdict(cfg), indent=2))

    def record(self, metrics: dict, step: int, kl: float) -> None:
        """Keep one step's ``metrics``; ``kl`` (NaN when the step measured none) goes to the monitor first."""
        if not math.isnan(kl):
            self.monitor.update(kl, step)
        self.history.append(metrics)
        if self._file is not None:
            self._file.write(json.dumps(metrics) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def plot_or_skip(plot: Callable[[Sequence[dict], Path], Path], history: Sequence[dict], path: Path) -> Path | None:
    """``plot(history, path)``, or ``None`` with one WARNING line when matplotlib (the ``plot`` extra) is missing.

    The curves are a view of ``metrics.jsonl``, which is written either way: a run that trained for
    minutes must not end in a traceback because the picture cannot be drawn.
    """
    try:
        require("matplotlib", "plot")
    except MissingDependency as exc:
        log.warning("%s not drawn (metrics.jsonl has the same numbers): %s", path.name, exc)
        return None
    return plot(history, path)


__all__ = ["StepLog", "plot_or_skip"]
