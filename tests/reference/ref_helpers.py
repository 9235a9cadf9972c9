"""Helpers for the reference-strategy tests: real tiny models, real PEFT, a padded preference batch.

(Not named conftest: ``from conftest import`` would clash with tests/conftest.py.)
"""

from __future__ import annotations

import torch

from refmodel.errors import StoreMiss
from refmodel.testing import preference_pairs


def make_batch(tok, n: int = 4, seed: int = 0):
    """Right-padded ``(input_ids, attention_mask, score_mask)`` of prompt+chosen; completion scored."""
    rows, scores = [], []
    for pair in preference_pairs(n, seed=seed):
        prompt = tok(pair["prompt"], add_special_tokens=False)["input_ids"]
        completion = tok(pair["chosen"], add_special_tokens=False)["input_ids"]
        rows.append(prompt + completion)
        scores.append([0] * len(prompt) + [1] * len(completion))
    length = max(map(len, rows))
    ids = torch.full((n, length), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros(n, length, dtype=torch.long)
    score = torch.zeros(n, length, dtype=torch.bool)
    for i, (row, sc) in enumerate(zip(rows, scores, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        attn[i, : len(row)] = 1
        score[i, : len(row)] = torch.tensor(sc, dtype=torch.bool)
    return ids, attn, score


class ListStore:
    """Test double of ``refmodel.store.LogprobStore`` (that branch has not landed yet): only ``fingerprint``
    and ``get_batch``, over log-probs that a real model computed. Keyed by the exact real token ids."""

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint
        self.rows: dict[tuple, torch.Tensor] = {}

    def add(self, input_ids, attention_mask, logprobs):
        for ids, mask, lp in zip(input_ids, attention_mask.bool(), logprobs, strict=True):
            self.rows[tuple(ids[mask].tolist())] = lp[mask].clone()

    def get_batch(self, input_ids, attention_mask=None):
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        out = torch.zeros(input_ids.shape, dtype=torch.float32)
        for b, (ids, m) in enumerate(zip(input_ids, mask, strict=True)):
            key = tuple(ids[m].tolist())
            if key not in self.rows:
                raise StoreMiss(f"no stored log-probs for sequence {b} ({len(key)} tokens)")
            out[b, m] = self.rows[key]
        return out
