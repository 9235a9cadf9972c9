"""``Precomputed``: pi_ref log-probs read from a :class:`~refmodel.store.LogprobStore`.

Nothing is held in memory but the store's index; every call is a lookup by the exact token ids. On a
miss it raises :class:`~refmodel.errors.StoreMiss` with what to do, or, when a ``fallback``
reference (with the same fingerprint) is given, computes just the missing rows with it. Misses are
never silent: they are counted (:meth:`Precomputed.metrics`) and logged at WARNING with the running
count, at most once every ``warn_every_s`` seconds.

Sequence-level losses (DPO, IPO, KTO, ...) need the per-sequence sum. :meth:`Precomputed.sequence_logps`
returns the float32 sum the store kept from before its storage cast, so a bfloat16 store (8 mantissa
bits per token value: up to ~0.06 nats off over a sequence) costs those losses no accuracy.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import torch

from .._deprecation import renamed_fields
from ..errors import FingerprintMismatch, InvalidBatch, StoreMiss
from ..logprobs.model import validate_batch

log = logging.getLogger(__name__)


@renamed_fields(token_logps="token_logprobs")
class ReferenceLogps(NamedTuple):
    """Reference log-probs of a batch: ``token_logprobs`` ``[B, T]`` float32 (0 outside the score mask) and
    ``sequence_logps`` ``[B]`` float32 (their per-row sum, exact from the store where it holds the row)."""

    token_logprobs: torch.Tensor
    sequence_logps: torch.Tensor


class Precomputed:
    """Reference log-probs from a store (``store.get_batch(ids, mask) -> [B, T] float32``).

    Args:
        store: an open ``LogprobStore`` (or anything with ``fingerprint`` and ``get_batch``; with
            ``get_sums`` too, :meth:`sequence_logps` uses the stored sums).
        fallback: another :class:`~refmodel.reference.Reference` with the same fingerprint, used for
            rows the store does not hold; ``None`` makes a miss an error.
        warn_every_s: the least time between two miss WARNINGs (the first miss always warns).
    """

    def __init__(self, store, *, fallback=None, warn_every_s: float = 30.0):
        if fallback is not None and fallback.fingerprint != store.fingerprint:
            raise FingerprintMismatch(
                f"the fallback reference ({fallback.fingerprint}) is not the model the store was computed with "
                f"({store.fingerprint}); its log-probs would silently mix two references. Use the model the "
                "store was made from as fallback, or precompute the store again with this one")
        self.store = store
        self.fallback = fallback
        self.hits = 0  # rows read from the store
        self.misses = 0  # rows computed by the fallback so far
        self.warn_every_s = warn_every_s
        self._last_warning = float("-inf")

    @property
    def fingerprint(self) -> str:
        return self.store.fingerprint

    @property
    def memory_bytes(self) -> int:
        """The store is memory-mapped (0 resident weights); plus the fallback's weights."""
        return 0 if self.fallback is None else int(self.fallback.memory_bytes)

    def metrics(self) -> dict[str, float]:
        """``hits`` (rows from the store), ``misses`` (rows from the fallback) and ``miss_rate``."""
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "miss_rate": self.misses / total if total else 0.0}

    @torch.no_grad()
    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 score_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T]`` float32 stored log-probs, zero outside ``score_mask`` (and padding)."""
        return self._lookup(input_ids, attention_mask, score_mask)[1]

    @torch.no_grad()
    def sequence_logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       score_mask: torch.Tensor | None = None) -> ReferenceLogps:
        """Token log-probs ``[B, T]`` and per-sequence sums ``[B]`` (float32, nats) in one lookup.

        A row found in the store gets the store's exact float32 sum when ``score_mask`` covers the stored
        scored span (first to last scored token, the same tokenization); otherwise, and for fallback rows,
        the sum of the token values.
        """
        raw, token, hit = self._lookup(input_ids, attention_mask, score_mask)
        sums = token.sum(1)
        if hit.any() and hasattr(self.store, "get_sums"):
            rows = hit.nonzero().flatten()
            attn, score = validate_batch(input_ids, attention_mask, score_mask)
            stored = torch.as_tensor(self.store.get_sums(input_ids[rows.cpu()].cpu(), attn[rows].long().cpu()),
                                     dtype=torch.float32, device=sums.device)
            same = _same_span(raw[rows] != 0, score[rows].to(token.device))
            sums[rows] = torch.where(same, stored, sums[rows])
        return ReferenceLogps(token, sums)

    def _lookup(self, input_ids, attention_mask, score_mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, T]`` log-probs as stored, the same masked by ``score_mask``, ``[B]`` bool: from the store."""
        attn, score = validate_batch(input_ids, attention_mask, score_mask)
        mask = attn.long() if attention_mask is not None else None
        hit = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        try:
            out = self.store.get_batch(input_ids, mask)
            self.hits += int(input_ids.shape[0])
        except StoreMiss as exc:
            if self.fallback is None:
                raise StoreMiss(
                    f"{exc} -- the store has no log-probs for some of these sequences. Precompute them "
                    "(`refmodel precompute` over this dataset with the same model, tokenizer, max_length and "
                    "truncation_mode), or construct Precomputed(store, fallback=Frozen(ref_model)) to compute "
                    "misses live") from exc
            out, hit = self._with_fallback(input_ids, attn)
        out = torch.as_tensor(out, dtype=torch.float32, device=input_ids.device)
        if tuple(out.shape) != tuple(input_ids.shape):
            raise InvalidBatch(f"the store returned shape {tuple(out.shape)} for input_ids "
                               f"{tuple(input_ids.shape)}; it must be aligned like model_logprobs")
        return out, out * score, hit

    def _with_fallback(self, input_ids: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        self.hits += input_ids.shape[0] - len(missing)
        now = time.monotonic()
        if now - self._last_warning >= self.warn_every_s:
            self._last_warning = now
            log.warning("precomputed reference: %d of %d rows of this batch missed the store and were computed "
                        "by the fallback %r (%d misses, %d hits so far); precompute this data with the same "
                        "tokenization to avoid it", len(missing), input_ids.shape[0], self.fallback,
                        self.misses, self.hits)
        hit = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        hit[idx] = False
        return torch.stack([r for r in rows if r is not None]), hit  # every row is filled by now

    def on_step(self, step: int, policy) -> None:
        """Stored log-probs never change."""

    def __repr__(self) -> str:
        return f"Precomputed({self.fingerprint}, fallback={self.fallback!r})"


def _same_span(stored_nonzero: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: the first and last nonzero stored value sit at the first and last scored position."""
    t = torch.arange(score.shape[1], device=score.device)
    big = score.shape[1]

    def ends(m):
        return torch.where(m, t, big).amin(1), torch.where(m, t, -1).amax(1)

    (a0, a1), (b0, b1) = ends(stored_nonzero), ends(score.bool())
    return (a0 == b0) & (a1 == b1) & score.any(1)


__all__ = ["Precomputed", "ReferenceLogps"]
