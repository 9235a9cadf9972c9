"""``Precomputed``: pi_ref log-probs read from a :class:`~refmodel.store.LogprobStore`.

Nothing is held in memory but the store's index; every call is a lookup by the exact token ids. On a
miss it raises :class:`~refmodel.errors.StoreMiss` with what to do, or, when a ``fallback``
reference (with the same fingerprint) is given, computes just the missing rows with it.
"""

from __future__ import annotations

import logging

import torch

from ..errors import FingerprintMismatch, InvalidBatch, StoreMiss
from ..logprobs.model import validate_batch

log = logging.getLogger(__name__)


class Precomputed:
    """Reference log-probs from a store (``store.get_batch(ids, mask) -> [B, T] float32``).

    Args:
        store: an open ``LogprobStore`` (or anything with ``fingerprint`` and ``get_batch``).
        fallback: another :class:`~refmodel.reference.Reference` with the same fingerprint, used for
            rows the store does not hold; ``None`` makes a miss an error.
    """

    def __init__(self, store, *, fallback=None):
        if fallback is not None and fallback.fingerprint != store.fingerprint:
            raise FingerprintMismatch(
                f"the fallback reference ({fallback.fingerprint}) is not the model the store was computed with "
                f"({store.fingerprint}); its log-probs would silently mix two references. Use the model the "
                "store was made from as fallback, or precompute the store again with this one")
        self.store = store
        self.fallback = fallback
        self.misses = 0  # rows computed by the fallback so far

    @property
    def fingerprint(self) -> str:
        return self.store.fingerprint

    @property
    def memory_bytes(self) -> int:
        """The store is memory-mapped (0 resident weights); plus the fallback's weights."""
        return 0 if self.fallback is None else int(self.fallback.memory_bytes)

    @torch.no_grad()
    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 score_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T]`` float32 stored log-probs, zero outside ``score_mask`` (and padding)."""
        attn, score = validate_batch(input_ids, attention_mask, score_mask)
        mask = attn.long() if attention_mask is not None else None
        try:
            out = self.store.get_batch(input_ids, mask)
        except StoreMiss as exc:
            if self.fallback is None:
                raise StoreMiss(
                    f"{exc} -- the store has no log-probs for some of these sequences. Precompute them "
                    "(`refmodel precompute` over this dataset with the same model and tokenizer), or "
                    "construct Precomputed(store, fallback=Frozen(ref_model)) to compute misses live") from exc
            out = self._with_fallback(input_ids, attn)
        out = torch.as_tensor(out, dtype=torch.float32, device=input_ids.device)
        if tuple(out.shape) != tuple(input_ids.shape):
            raise InvalidBatch(f"the store returned shape {tuple(out.shape)} for input_ids "
                               f"{tuple(input_ids.shape)}; it must be aligned like model_logprobs")
        return out * score

    def _with_fallback(self, input_ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Row by row: stored rows from the store, missing rows from the fallback (one batched call)."""
        rows: list[torch.Tensor | None] = []
        missing: list[int] = []
        for b in range(input_ids.shape[0]):
            try:
                rows.append(torch.as_tensor(self.store.get_batch(input_ids[b:b + 1], attn[b:b + 1].long()),
                                            dtype=torch.float32, device=input_ids.device)[0])
            except StoreMiss:
                rows.append(None)
                missing.append(b)
        idx = torch.tensor(missing, device=input_ids.device)
        live = self.fallback.logprobs(input_ids[idx], attn[idx].long())
        for j, b in enumerate(missing):
            rows[b] = live[j].to(input_ids.device)
        self.misses += len(missing)
        log.debug("precomputed reference: %d of %d rows missed the store, computed by %r",
                  len(missing), input_ids.shape[0], self.fallback)
        return torch.stack([r for r in rows if r is not None])  # every None was filled just above

    def on_step(self, step: int, policy) -> None:
        """Stored log-probs never change."""

    def __repr__(self) -> str:
        return f"Precomputed({self.fingerprint}, fallback={self.fallback!r})"


__all__ = ["Precomputed"]
