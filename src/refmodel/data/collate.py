"""THE padder: ragged token rows to ``[B, T]`` tensors, used by every path (training, precompute, tools).

Right padding by default (real tokens first, so position ids are ``0..len-1`` and the padded batch
scores like each row alone); left padding for prompts run through a KV-cache prefill. Padded positions
hold ``pad_id`` in ``input_ids``, 0 in ``attention_mask`` and False in ``score_mask``. TRL's collators
(``DataCollatorForPreference``: chosen rows, then rejected rows) pad the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import InvalidInput
from .tokenize import Example


def pad(rows: Sequence[Sequence | torch.Tensor | np.ndarray], value=0, *, side: str = "right",
        dtype: torch.dtype = torch.long, width: int | None = None, pad_to_multiple_of: int | None = None
        ) -> torch.Tensor:
    """``[B, T]`` tensor of ``rows`` (sequences or 1-D tensors) padded with ``value`` to the longest row
    (or ``width``).

    ``pad_to_multiple_of`` rounds ``T`` up (tensor-core friendly shapes), as TRL's ``pad`` does.
    """
    if side not in ("right", "left"):
        raise InvalidInput(f"side must be 'right' or 'left', got {side!r}")
    longest = max((len(r) for r in rows), default=0)
    t = longest if width is None else width
    if t < longest:
        raise InvalidInput(f"width={width} is shorter than the longest row ({longest} tokens)")
    if pad_to_multiple_of:
        t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
    out = torch.full((len(rows), t), value, dtype=dtype)
    for i, row in enumerate(rows):
        n = len(row)
        if n:
            cols = slice(0, n) if side == "right" else slice(t - n, t)
            if isinstance(row, torch.Tensor):
                out[i, cols] = row.to(dtype)
            else:  # a numpy row converts as one block (precompute's units hold int32 / bool arrays)
                out[i, cols] = torch.as_tensor(row if isinstance(row, np.ndarray) else list(row), dtype=dtype)
    return out


def collate(sequences: Sequence[tuple[Sequence[int] | np.ndarray, Sequence[bool] | np.ndarray | None]],
            pad_id: int = 0, *, side: str = "right", pad_to_multiple_of: int | None = None
            ) -> dict[str, torch.Tensor]:
    """Pad ``[(input_ids, score_mask or None)]`` (sequences or numpy arrays) into ``input_ids`` (long), ``attention_mask`` (long, 1 =
    real token) and ``score_mask`` (bool, the scored tokens; all real tokens but the first when None),
    each ``[B, T]``."""
    ids = [s if isinstance(s, np.ndarray) else list(s) for s, _ in sequences]
    masks = [[False] + [True] * (len(s) - 1) if m is None else m if isinstance(m, np.ndarray) else list(m)
             for s, m in sequences]
    for i, (s, m) in enumerate(zip(ids, masks, strict=True)):
        if len(s) != len(m):
            raise InvalidInput(f"row {i}: score_mask has {len(m)} values for {len(s)} tokens")
    multiple = pad_to_multiple_of
    return {"input_ids": pad(ids, pad_id, side=side, pad_to_multiple_of=multiple),
            "attention_mask": pad([[1] * len(s) for s in ids], 0, side=side, pad_to_multiple_of=multiple),
            "score_mask": pad(masks, False, side=side, dtype=torch.bool, pad_to_multiple_of=multiple)}


def collate_examples(examples: Sequence[Example], pad_id: int = 0, *,
                     pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """One batch of ``examples`` that all have the same completion roles: rows grouped by role, so a
    preference batch is ``[chosen_0..chosen_b, rejected_0..rejected_b]`` (``[2b, T]``, TRL's order)."""
    if not examples:
        raise InvalidInput("collate_examples needs at least one example")
    names = examples[0].names
    for ex in examples:
        if ex.names != names:
            raise InvalidInput(f"{ex.where}: completions {ex.names} in a batch of {names}; batch one record "
                               "type at a time")
    seqs = [ex.sequences()[j] for j in range(len(names)) for ex in examples]
    return collate(seqs, pad_id, pad_to_multiple_of=pad_to_multiple_of)


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id (TRL's fallback), else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


__all__ = ["collate", "collate_examples", "pad", "pad_id_of"]
