"""The ``reference=`` argument of the TRL trainers: what it may be, and how it runs on TRL's batches.

:func:`refmodel.reference.resolve` turns the argument into a :class:`~refmodel.reference.Reference`;
:class:`ReferenceRunner` calls it on the ``[B, T]`` batches TRL's own collators built (so store keys are
TRL's token ids), times it, counts store hits / fallback rows, and turns a store miss into a
:class:`~refmodel.errors.StoreMiss` that names the sequence of the batch and what to do.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from ..._deprecation import warn_deprecated
from ...cluster import get_logger
from ...errors import StoreMiss
from ...reference import Precomputed, resolve

log = get_logger(__name__)  # shared warnings: main process only (refmodel.cluster)


def resolve_reference(reference, policy, *, temperature: float = 1.0, who: str = "trainer"):
    """Deprecated alias of :func:`refmodel.reference.resolve` (same arguments); removed in the next release."""
    warn_deprecated("refmodel.integrations.trl.resolve_reference", "refmodel.reference.resolve (same arguments)")
    return resolve(reference, policy, temperature=temperature, who=who)


def _store_of(reference):
    return getattr(reference, "store", None) if isinstance(reference, Precomputed) else None


class ReferenceRunner:
    """Runs a Reference on TRL batches; counts what it did since the last :meth:`take_metrics`.

    Attributes (totals over the run): ``calls``, ``rows`` (sequences scored), ``seconds`` (wall time in
    the reference), ``store_hits`` / ``store_misses`` (rows answered by the store / by a live fallback).
    """

    def __init__(self, reference, tokenizer=None, hint: str = ""):
        self.reference = reference
        self.tokenizer = tokenizer
        self.hint = hint
        self.calls = self.rows = self.store_hits = self.store_misses = 0
        self.seconds = 0.0
        self._step = {"seconds": 0.0, "rows": 0, "store_hits": 0, "store_misses": 0}

    @torch.no_grad()
    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, score_mask: torch.Tensor,
                 names: list[str] | None = None) -> torch.Tensor:
        """``[B, T]`` float32 reference log-probs on ``input_ids``' device (see ``Reference.logprobs``)."""
        return self._run("logprobs", input_ids, attention_mask, score_mask, names)

    @torch.no_grad()
    def sequence_logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, score_mask: torch.Tensor,
                       names: list[str] | None = None) -> torch.Tensor:
        """``[B]`` float32 sums over ``score_mask`` (nats); a store's own float32 sums where it has them.

        A bf16 store keeps bf16 token values but an exact float32 sum per sequence, so sequence-level
        losses (DPO, KTO) lose nothing to the storage dtype.
        """
        if callable(getattr(self.reference, "sequence_logps", None)):
            return self._run("sequence_logps", input_ids, attention_mask, score_mask, names).sequence_logps.to(
                device=input_ids.device, dtype=torch.float32)
        return self.logprobs(input_ids, attention_mask, score_mask, names).sum(dim=1)

    def _run(self, method: str, input_ids, attention_mask, score_mask, names):
        store = _store_of(self.reference)
        misses_before = int(getattr(self.reference, "misses", 0) or 0)
        start = time.perf_counter()
        try:
            # The reference has its own precision (its dtype / quantization); the trainer's autocast
            # (TRL's default bf16=True) must not silently lower it.
            with torch.autocast(device_type=input_ids.device.type, enabled=False):
                out = getattr(self.reference, method)(input_ids, attention_mask, score_mask)
        except StoreMiss as exc:
            raise StoreMiss(self._describe_miss(exc, store, input_ids, attention_mask, names)) from exc
        elapsed = time.perf_counter() - start
        batch = int(input_ids.shape[0])
        self.calls += 1
        self.rows += batch
        self.seconds += elapsed
        self._step["seconds"] += elapsed
        self._step["rows"] += batch
        if store is not None:
            missed = int(getattr(self.reference, "misses", 0) or 0) - misses_before
            self.store_misses += missed
            self.store_hits += batch - missed
            self._step["store_misses"] += missed
            self._step["store_hits"] += batch - missed
            # Precomputed itself logs the misses as a (rate-limited) WARNING with the running count.
        return out if method != "logprobs" else out.to(device=input_ids.device, dtype=torch.float32)

    def _describe_miss(self, exc, store, input_ids, attention_mask, names) -> str:
        if store is None:
            return str(exc)
        missing = []
        for b in range(input_ids.shape[0]):
            real = input_ids[b][attention_mask[b].bool()].detach().cpu()
            if real not in store:
                missing.append((b, real))
        if not missing:
            return str(exc)
        b, real = missing[0]
        name = names[b] if names is not None else f"row {b}"
        text = ""
        if self.tokenizer is not None:
            with contextlib.suppress(Exception):
                text = f": {self.tokenizer.decode(real.tolist())[:120]!r}"
        return (f"{len(missing)} of {input_ids.shape[0]} sequences of this TRL batch are not in store {store.path} "
                f"(first: {name}, {real.numel()} tokens{text}). The store is keyed by the exact token ids TRL "
                f"feeds the model{self.hint}; precompute it over this dataset with the same tokenizer and "
                "truncation settings (`refmodel precompute`), or give a live fallback: "
                f"reference=Precomputed(store, fallback=Frozen(ref_model)) ({exc})")

    def take_metrics(self) -> dict[str, float]:
        """This step's metrics (``refmodel/...``), then reset them."""
        step, self._step = self._step, {"seconds": 0.0, "rows": 0, "store_hits": 0, "store_misses": 0}
        out = {"refmodel/ref_seconds": step["seconds"], "refmodel/ref_rows": float(step["rows"])}
        if _store_of(self.reference) is not None:
            out["refmodel/store_hits"] = float(step["store_hits"])
            out["refmodel/store_misses"] = float(step["store_misses"])
        return out


@contextlib.contextmanager
def patched(obj, **values) -> Iterator[None]:
    """Set attributes of ``obj`` for the duration of the block, then restore them."""
    old = {k: getattr(obj, k) for k in values}
    for k, v in values.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


def unwrap(trainer, model=None):
    """The policy module itself (no DDP / accelerate wrapper)."""
    model = trainer.model if model is None else model
    return trainer.accelerator.unwrap_model(model)


__all__ = ["ReferenceRunner", "patched", "resolve_reference", "unwrap"]
