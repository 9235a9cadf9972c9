"""The per-step record the training loops (:func:`refmodel.train`, :func:`refmodel.grpo`) share.

Each optimizer step's metrics go to the run's history, to ``metrics.jsonl`` in the output folder (one
JSON object per line, written as the step ends, so a crashed run keeps its curve) and, when the step
measured a KL, to the :class:`~refmodel.kl.KLMonitor` that warns above the threshold.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..losses.kl import KLMonitor


class StepLog:
    """History, ``metrics.jsonl`` and KL monitor of one run.

    Args:
        history: the result's list; every recorded step's metrics are appended to it.
        monitor: receives each step's KL (nats/token) when it is not NaN.
        out_dir: created if given; holds ``metrics.jsonl`` and ``config_name`` (the run's config, ``asdict``).
        config_name, cfg: the config file's name and the dataclass config written to it.
    """

    def __init__(self, history: list[dict], monitor: KLMonitor, out_dir: Path | None, config_name: str,
                 cfg: Any) -> None:
        self.history, self.monitor = history, monitor
        self._file = None
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(out_dir / "metrics.jsonl", "w", encoding="utf-8")
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


__all__ = ["StepLog"]
