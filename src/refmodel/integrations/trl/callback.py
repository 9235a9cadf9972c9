"""``RefmodelCallback``: refmodel's reference metrics in TRL's logs, the reference's ``on_step`` after each
optimizer step and its ``on_epoch_end`` after each epoch (a ``Synced.per_epoch`` reference syncs there).

Per optimizer step it records ``refmodel/ref_seconds`` (wall time spent in the reference, all
micro-batches of the step), ``refmodel/ref_rows`` (sequences scored) and, for a store,
``refmodel/store_hits`` / ``refmodel/store_misses`` (rows answered by the store / computed live by a
fallback). Under a launcher each step's values are reduced over the ranks before they are logged
(:func:`refmodel.cluster.reduce_over_ranks`): rows, hits and misses summed (the global batch's), the
seconds the slowest rank's (``max``: the ranks wait for each other every step, so that is what the
reference costs the step). TRL averages its metric buffer over the logging interval, so a logged value
is the mean per step. With ``kl_threshold`` it feeds the logged KL (TRL's ``kl`` key: GRPO's mean k3, KTO's batch KL)
into a :class:`refmodel.kl.KLMonitor`, which warns once when the KL exceeds the threshold, and logs
``refmodel/kl_warnings``.
"""

from __future__ import annotations

from transformers import TrainerCallback

from ...cluster import get_logger, reduce_over_ranks
from ...losses.kl import KLMonitor

log = get_logger(__name__)  # shared warnings: main process only (refmodel.cluster)


REDUCE = {"refmodel/ref_seconds": "max"}  # the rest (rows, store hits and misses) are counts: summed


class RefmodelCallback(TrainerCallback):
    """Logs a :class:`ReferenceRunner`'s metrics; calls ``reference.on_step`` after each optimizer step and
    ``reference.on_epoch_end`` (when it has one) after each epoch, with the unwrapped policy.

    Args:
        runner: the trainer's :class:`~refmodel.integrations.trl._reference.ReferenceRunner`.
        metrics: TRL's metric buffer (``trainer._metrics``: ``{"train": {name: [values]}}``); without it
            the metrics are added to the logs in ``on_log``.
        unwrap: maps the ``model`` TRL hands to callbacks to the policy module (drops DDP wrappers).
        kl_threshold: nats; warn (once) when the logged ``kl`` exceeds it. ``None``: no monitor.
    """

    def __init__(self, runner, *, metrics: dict | None = None, unwrap=None, kl_threshold: float | None = None):
        self.runner = runner
        self.metrics = metrics
        self.unwrap = unwrap or (lambda m: m)
        # TRL's logged ``kl`` is already gathered over the ranks (the same value on each): no second reduction.
        self.monitor = KLMonitor(threshold=kl_threshold, over_ranks=False) if kl_threshold is not None else None
        self._pending: dict[str, float] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # The trainer got reference= before accelerate wrapped the policy (FSDP2 shards it, DeepSpeed
        # partitions it, in place, in train()); a model-based reference is sharded like it now, so each rank
        # holds its shards only. Not a store's live fallback: it runs on the ranks that miss only, and a
        # sharded forward is a collective every rank must join (it would hang or mismatch), so it stays whole.
        shard_like = getattr(self.runner.reference, "shard_like", None)
        if model is not None and callable(shard_like):
            shard_like(self.unwrap(model))
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.runner.reference.on_step(state.global_step, self.unwrap(model))
        step = reduce_over_ranks(self.runner.take_metrics(), REDUCE)
        if self.metrics is not None:
            for key, value in step.items():
                self.metrics.setdefault("train", {}).setdefault(key, []).append(value)
        else:
            self._pending = step
        return control

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        # A reference on an epoch schedule (Synced.per_epoch) moves here; on_step leaves it alone.
        on_epoch_end = getattr(self.runner.reference, "on_epoch_end", None)
        if model is not None and callable(on_epoch_end):
            on_epoch_end(round(state.epoch or 0), self.unwrap(model))
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return control
        if self.metrics is None and self._pending:
            logs.update(self._pending)
            self._pending = {}
        if self.monitor is not None and "kl" in logs:
            warned = self.monitor.warned
            self.monitor.update(float(logs["kl"]), step=state.global_step)
            logs["refmodel/kl_warnings"] = float(self.monitor.warned and not warned)
        return control


__all__ = ["RefmodelCallback"]
