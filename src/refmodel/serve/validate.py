"""Turn a request (JSON rows or a binary ``[B, T]`` block) into checked per-sequence tensors.

Every rejection is a :class:`FieldError` (an :class:`~refmodel.errors.InvalidBatch`, HTTP 422) whose
message names the field and row, e.g. ``input_ids[3][7] = 99999 is outside the vocabulary [0, 64)``.
"""

from __future__ import annotations

import json
from functools import partial
from typing import NamedTuple

import numpy as np
import torch

from .. import validation
from ..errors import InvalidBatch


class FieldError(InvalidBatch):
    """A request field is malformed; ``field`` names it (``input_ids``, ``score_mask`` ...)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class Sequence(NamedTuple):
    """One checked sequence: ``ids`` long ``[L]`` (0 at padding), ``attn`` and ``score`` bool ``[L]``.

    ``attn`` None: every token is real; ``score`` None: every real token is scored. The common case
    (no masks) then costs no mask tensors and lets a batch run without masks. ``temperature``: the
    log-probs are of ``softmax(logits / temperature)`` (a sampler's temperature, for RL references).
    """

    ids: torch.Tensor
    attn: torch.Tensor | None = None
    score: torch.Tensor | None = None
    temperature: float = 1.0


class Limits(NamedTuple):
    """A model's request limits. ``max_seq_len`` is the effective one, min(the server's ``max_seq_len``,
    the model's position limit); ``max_seq_len_name`` says which of the two it is, for the message."""

    vocab_size: int
    max_seq_len: int
    max_sequences: int
    max_seq_len_name: str = "this server's max_seq_len"


def model_limits(vocab_size: int, server_max_seq_len: int, max_sequences: int, model_name: str,
                 position_limit: tuple[int, str] | None) -> Limits:
    """The limits of one served model: its position limit (``(value, config field)`` of
    :func:`refmodel.models.limits.position_limit`, e.g. ``(1024, "n_positions")``) wins over the server's
    ``max_seq_len`` when it is smaller.

    Past its position limit a model with learned positions (GPT-2) raises ``IndexError`` and one with
    rotary positions (Llama) silently scores out of its training range; both are refused here (422).
    """
    if position_limit is not None and position_limit[0] < server_max_seq_len:
        value, field = position_limit
        return Limits(vocab_size, value, max_sequences, f"model {model_name!r}'s position limit ({field})")
    return Limits(vocab_size, server_max_seq_len, max_sequences)


def _too_long(i: int, length: int, limits: Limits) -> FieldError:
    return FieldError("input_ids", f"input_ids[{i}] has {length} tokens, more than {limits.max_seq_len_name}="
                                   f"{limits.max_seq_len}; shorten or split the sequence")


# The per-row and the vectorized check raise the same errors, built here once.
def _empty_row(i: int) -> FieldError:
    return FieldError("attention_mask", f"attention_mask[{i}] is all 0: input_ids[{i}] has no real tokens "
                                        "(empty sequence)")


def _outside_vocab(i: int, j: int, value: int, vocab_size: int) -> FieldError:
    return FieldError("input_ids", f"input_ids[{i}][{j}] = {value} is outside the vocabulary [0, {vocab_size})")


def _scores_padding(i: int) -> FieldError:
    return FieldError("score_mask", f"score_mask[{i}] marks padded positions (attention_mask 0); "
                                    "only real tokens can be scored")


def _too_many_rows(rows: int, max_sequences: int) -> FieldError:
    return FieldError("input_ids", f"input_ids has {rows} sequences; this server accepts at most "
                                   f"{max_sequences} per request (split the batch)")


# JSON arrays a valid request may hold: the outer one and one row per sequence in input_ids and in each
# mask, plus score_start's list
def _max_arrays(max_sequences: int) -> int:
    return 3 * max_sequences + 4


def _too_many_arrays(arrays: int, max_sequences: int) -> FieldError:
    return FieldError("input_ids", f"the body holds at least {arrays} JSON arrays, more than {max_sequences} "
                                   f"sequences (one row each in input_ids and its masks) can; this server accepts at "
                                   f"most {max_sequences} sequences per request (split the batch)")


class JsonRowBound:
    """The row bound of :func:`decode_json_rows`, applied to a JSON body as it arrives (``feed`` each chunk):
    the guard refuses a body of millions of rows after its first kilobytes, before it is read into memory.

    A ``[`` inside a string counts too: a valid request never holds more arrays than the bound allows
    whatever its strings, so nothing valid is refused.
    """

    def __init__(self, max_sequences: int) -> None:
        self.max_sequences, self.limit, self.arrays = max_sequences, _max_arrays(max_sequences), 0

    def feed(self, chunk: bytes | bytearray) -> None:
        """Count ``chunk``'s arrays; raises :class:`FieldError` (``input_ids``) past the bound."""
        self.arrays += chunk.count(b"[")
        if self.arrays > self.limit:
            raise _too_many_arrays(self.arrays, self.max_sequences)


def decode_json_rows(body: bytes | bytearray, max_sequences: int) -> dict:
    """A JSON request body as a dict, its row count checked before anything else is built.

    Counting ``[`` bounds the rows before the decode (C speed, no allocation): a 16 MiB body of 4 million
    one-token rows is refused here in milliseconds instead of being turned into 4 million Python lists
    (and the guard applies the same bound while the body arrives, :class:`JsonRowBound`).
    Then ``input_ids``' rows are counted before the schema's validation. Raises :class:`FieldError`
    (``body`` for what is not a JSON object, ``input_ids`` for too many rows).
    """
    JsonRowBound(max_sequences).feed(body)
    try:
        obj = json.loads(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise FieldError("body", f"the body is not valid JSON: {exc} (send UTF-8 JSON)") from None
    if not isinstance(obj, dict):
        raise FieldError("body", f"the body must be a JSON object, not {type(obj).__name__} (send Content-Type: "
                                 "application/json with an object)")
    rows = obj.get("input_ids")
    if isinstance(rows, list) and len(rows) > max_sequences:
        raise _too_many_rows(len(rows), max_sequences)
    return obj


def check_temperature(temperature) -> float:
    """``float(temperature)`` under the one temperature rule (:func:`refmodel.validation.temperature`),
    else a FieldError naming ``temperature`` (HTTP 422)."""
    return validation.temperature(temperature, error=partial(FieldError, "temperature"))


def _as_tensor(field: str, row: list, index: int, dtype=torch.long) -> torch.Tensor:
    try:
        return torch.tensor(row, dtype=dtype)
    except (OverflowError, RuntimeError, TypeError, ValueError) as exc:
        raise FieldError(field, f"{field}[{index}] holds a value that is not a 64-bit integer: {exc}") from exc


def _mask_rows(field: str, rows, ids_rows: list[torch.Tensor]) -> list[torch.Tensor] | None:
    if rows is None:
        return None
    if len(rows) != len(ids_rows):
        raise FieldError(field, f"{field} has {len(rows)} rows but input_ids has {len(ids_rows)}; "
                                "give one mask row per sequence")
    out = []
    for i, (row, ids) in enumerate(zip(rows, ids_rows, strict=True)):
        mask = row if isinstance(row, torch.Tensor) else _as_tensor(field, row, i)
        if mask.numel() != ids.numel():
            raise FieldError(field, f"{field}[{i}] has {mask.numel()} entries but input_ids[{i}] has "
                                    f"{ids.numel()}; masks must match their sequence position by position")
        if ((mask != 0) & (mask != 1)).any():
            bad = mask[(mask != 0) & (mask != 1)][0].item()
            raise FieldError(field, f"{field}[{i}] holds {bad}; masks hold only 0 and 1")
        out.append(mask.bool())
    return out


def check_sequences(input_ids, limits: Limits, attention_mask=None, score_mask=None,
                    score_start: int | list[int] | None = None, temperature: float = 1.0) -> list[Sequence]:
    """Check rows of ids and masks (lists or 1-D tensors) against the vocabulary and the limits."""
    temperature = check_temperature(temperature)
    if len(input_ids) == 0:
        raise FieldError("input_ids", "input_ids is empty; send at least one sequence")
    if len(input_ids) > limits.max_sequences:
        raise _too_many_rows(len(input_ids), limits.max_sequences)
    ids_rows = []
    for i, row in enumerate(input_ids):
        ids = row.long() if isinstance(row, torch.Tensor) else _as_tensor("input_ids", row, i)
        if ids.numel() == 0:
            raise FieldError("input_ids", f"input_ids[{i}] is empty; every sequence needs at least one token")
        if ids.numel() > limits.max_seq_len:
            raise _too_long(i, ids.numel(), limits)
        ids_rows.append(ids)
    attn_rows = _mask_rows("attention_mask", attention_mask, ids_rows)
    score_rows = _mask_rows("score_mask", score_mask, ids_rows)
    if score_start is not None and score_rows is not None:
        raise FieldError("score_start", "give score_mask or score_start, not both")
    starts = None
    if score_start is not None:
        starts = [score_start] * len(ids_rows) if isinstance(score_start, int) else list(score_start)
        if len(starts) != len(ids_rows):
            raise FieldError("score_start", f"score_start has {len(starts)} entries but input_ids has "
                                            f"{len(ids_rows)} sequences; give one int or one per sequence")
    out = []
    for i, ids in enumerate(ids_rows):
        attn = attn_rows[i] if attn_rows is not None else None
        if attn is not None and not attn.any():
            raise _empty_row(i)
        bad = (ids < 0) | (ids >= limits.vocab_size)
        if attn is not None:
            bad &= attn  # padding may hold anything
        if bad.any():
            pos = int(bad.nonzero()[0, 0])
            raise _outside_vocab(i, pos, int(ids[pos].item()), limits.vocab_size)
        if attn is None and score_rows is None and starts is None:
            out.append(Sequence(ids, temperature=temperature))
            continue
        attn = attn if attn is not None else torch.ones_like(ids, dtype=torch.bool)
        if score_rows is not None:
            score = score_rows[i]
            if (score & ~attn).any():
                raise _scores_padding(i)
        elif starts is not None:
            start = starts[i]
            if not 0 <= start <= ids.numel():
                raise FieldError("score_start", f"score_start for sequence {i} is {start}; expected "
                                                f"0 <= score_start <= {ids.numel()} (its length)")
            score = attn & (torch.arange(ids.numel()) >= start)
        else:
            score = attn.clone()
        out.append(Sequence(torch.where(attn, ids, 0), attn, score, temperature))
    return out


def check_block(input_ids: np.ndarray, limits: Limits, attention_mask: np.ndarray | None = None,
                score_mask: np.ndarray | None = None, temperature: float = 1.0) -> list[Sequence]:
    """:func:`check_sequences` for a binary ``[B, T]`` block, vectorized (same rules, same messages).

    The binary endpoint is the throughput path, so the checks run once over the block in numpy instead
    of a dozen small torch ops per row.
    """
    temperature = check_temperature(temperature)
    batch, length = input_ids.shape
    if batch == 0:
        raise FieldError("input_ids", "input_ids is empty; send at least one sequence")
    if length == 0:
        raise FieldError("input_ids", "input_ids has T=0 tokens per sequence; send at least one token")
    if batch > limits.max_sequences:
        raise FieldError("input_ids", f"input_ids has {batch} sequences; this server accepts at most "
                                      f"{limits.max_sequences} per request (split the batch)")
    if length > limits.max_seq_len:
        raise _too_long(0, length, limits)
    masks = []
    for field, mask in (("attention_mask", attention_mask), ("score_mask", score_mask)):
        if mask is not None:
            bad = mask > 1
            if bad.any():
                i, j = np.argwhere(bad)[0]
                raise FieldError(field, f"{field}[{i}] holds {mask[i, j]}; masks hold only 0 and 1")
            mask = mask.astype(bool)
        masks.append(mask)
    attn, score = masks
    if attn is not None:
        empty = ~attn.any(axis=1)
        if empty.any():
            raise _empty_row(int(np.argmax(empty)))
    bad = (input_ids < 0) | (input_ids >= limits.vocab_size)
    if attn is not None:
        bad &= attn  # padding may hold anything
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise _outside_vocab(i, j, input_ids[i, j], limits.vocab_size)
    if attn is None and score is None:  # the common case: no mask tensors at all
        # unbind: one call for the row views (iterating a tensor costs several times more per row)
        return [Sequence(row, temperature=temperature) for row in torch.from_numpy(input_ids.astype(np.int64)).unbind()]
    if attn is None:
        attn = np.ones((batch, length), dtype=bool)
    if score is None:
        score = attn
    elif (score & ~attn).any():
        raise _scores_padding(int(np.argmax((score & ~attn).any(axis=1))))
    ids = torch.from_numpy(np.where(attn, input_ids, 0).astype(np.int64))
    attn_t, score_t = torch.from_numpy(attn.copy()), torch.from_numpy(score.copy())
    return [Sequence(ids[i], attn_t[i], score_t[i], temperature) for i in range(batch)]


__all__ = ["FieldError", "JsonRowBound", "Limits", "Sequence", "check_block", "check_sequences",
           "check_temperature", "decode_json_rows", "model_limits"]
