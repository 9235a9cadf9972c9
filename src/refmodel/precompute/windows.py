"""The data in windows: what :mod:`.plan` decides a precompute run scores, shard by shard (issue 27).

The records are cut into windows of ``shard_examples`` consecutive records (:func:`job_examples` numbers them,
KTO's KL completions after the records); each window's examples become its shard's :class:`Unit` s
(:func:`example_groups`, :func:`window_units`: every sequence not already in an earlier window once, grouped by
shared prompt, sorted by (completions, length, key)), scored in greedy batches under a padded-token budget
(:func:`plan_batches`). :func:`plan_windows` reads the data once and keeps per window only a
:class:`ShardSpec` (O(shards)) and the keys seen so far (:class:`SeenKeys`); the position limit is checked on
the way (:class:`PositionCheck`). The layout's version is :data:`PLAN_VERSION`.
"""


from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data import Example, iter_examples, iter_kto_kl_examples, iter_records
from ..errors import InvalidInput
from ..models.limits import position_limit
from ..store.format import KEY_BYTES, key_bytes
from .config import PrecomputeConfig

log = logging.getLogger(__name__)

# The shards' layout (see the module docstring); recorded in the job as "plan_version".
PLAN_VERSION = 2


@dataclass(frozen=True, eq=False)
class Unit:
    """One prompt and the completions of it still to score, held compactly (numpy, 4 bytes a token rather than a
    Python int's ~36): ``prompt`` int32 [P], ``completions`` int32 [C_i] each, ``masks`` bool [C_i] each (the
    scored completion tokens), ``keys`` the store keys of prompt + completion ``i``. Sequences of ids are
    converted on construction; two units are equal when their ids, masks and keys are."""

    prompt: np.ndarray
    completions: tuple[np.ndarray, ...]
    masks: tuple[np.ndarray, ...]
    keys: tuple[bytes, ...]

    def __post_init__(self):
        # int32 holds every vocabulary (ids < 2**31); the store keys hash them as int64 (store.format.key_bytes)
        object.__setattr__(self, "prompt", np.asarray(self.prompt, dtype=np.int32))
        object.__setattr__(self, "completions", tuple(np.asarray(c, dtype=np.int32) for c in self.completions))
        object.__setattr__(self, "masks", tuple(np.asarray(m, dtype=bool) for m in self.masks))

    def __eq__(self, other) -> bool:
        if not isinstance(other, Unit):
            return NotImplemented
        return (self.keys == other.keys and np.array_equal(self.prompt, other.prompt)
                and len(self.completions) == len(other.completions)
                and all(np.array_equal(a, b) for a, b in zip(self.completions, other.completions, strict=True))
                and all(np.array_equal(a, b) for a, b in zip(self.masks, other.masks, strict=True)))

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside

    @property
    def tokens(self) -> int:
        return len(self.prompt) + sum(len(c) for c in self.completions)

    def sequences(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(input_ids int64 [P + C_i], score_mask bool [P + C_i])]``: the prompt + each completion, as stored."""
        unscored = np.zeros(len(self.prompt), dtype=bool)
        return [(np.concatenate([self.prompt, c]).astype(np.int64), np.concatenate([unscored, m]))
                for c, m in zip(self.completions, self.masks, strict=True)]


class PositionCheck:
    """The model's position limit checked one example at a time (:meth:`add`), refused at the end (:meth:`check`).

    Keeps only the first offending row and counts, so a streamed plan checks every sequence in O(1) memory.
    Models whose config names no limit are not checked.
    """

    def __init__(self, model):
        self.found = position_limit(model)
        self.first: tuple[Example, str, int] | None = None
        self.over = 0
        self.rows = 0

    def add(self, ex: Example) -> None:
        self.rows += 1
        if self.found is None:
            return
        lengths = [(name, len(ex.prompt_ids) + len(comp)) for comp, name in zip(ex.completions, ex.names, strict=True)]
        over = [(name, n) for name, n in lengths if n > self.found[0]]
        if over:
            self.over += 1
            if self.first is None:
                self.first = (ex, *over[0])

    def check(self) -> None:
        """Raise InvalidInput naming the first offending row (file and line), its length and the limit, and how
        many rows exceed it."""
        if self.first is None or self.found is None:
            return
        (limit, field_name), (ex, name, length) = self.found, self.first
        raise InvalidInput(f"{ex.where or 'a record'}: the {name} sequence has {length} tokens (prompt "
                           f"{len(ex.prompt_ids)} + {name} {length - len(ex.prompt_ids)}), more than the model's "
                           f"position limit of {limit} (config.{field_name}); {self.over} of {self.rows} rows are too "
                           "long. Shorten or drop them, or truncate them as TRL does with max_length (--max-length)")


def check_position_limit(model, examples: Iterable[Example]) -> None:
    """Refuse data with a sequence longer than the model's position limit, before any store is made
    (:class:`PositionCheck` over ``examples``)."""
    check = PositionCheck(model)
    for ex in examples:
        check.add(ex)
    check.check()


# One prompt and its candidate completions: (prompt int32 [P], [(completion int32 [C], score mask bool [C], key)]).
Group = tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray, bytes]]]


def example_groups(ex: Example) -> list[Group]:
    """``ex``'s candidate sequences (prompt + each non-empty completion) with their store keys, held compactly:
    what a window keeps of an example as soon as it is tokenized (4 bytes a token, not a tuple's 8-36)."""
    rows = list(zip(ex.completions, ex.completion_masks, strict=True))
    split = [(ex.prompt_ids, rows)]
    if not ex.prompt_ids:  # no shared prefix (e.g. keep_end truncation cut the prompt): one unit per row
        split = [(c[:1], [(c[1:], m[1:])]) for c, m in rows if c]
    groups = []
    for prompt, group in split:
        head = np.asarray(prompt, dtype=np.int64)
        candidates = []
        for comp, mask in group:
            if comp:
                ids = np.concatenate([head, np.asarray(comp, dtype=np.int64)])
                candidates.append((ids[len(head):].astype(np.int32), np.asarray(mask, dtype=bool), key_bytes(ids)))
        groups.append((head.astype(np.int32), candidates))
    return groups


def window_units(groups: Sequence[Group],
                 earlier: Callable[[list[bytes]], Sequence[bool] | np.ndarray] | None = None) -> list[Unit]:
    """One window's distinct sequences grouped by shared prompt, in canonical order (completions, length, key).

    ``groups``: the window's :func:`example_groups`, in record order. ``earlier(keys)``: which of the
    window's candidate sequences (in record order) were already planned in an earlier window (left out);
    None: none were. A sequence repeated inside the window is kept at its first occurrence.
    """
    candidates = [key for _, group in groups for _, _, key in group]
    before = earlier(candidates) if earlier is not None and candidates else [False] * len(candidates)
    seen: set[bytes] = set()
    units, position = [], 0
    for prompt, group in groups:
        comps, masks, keys = [], [], []
        for comp, mask, key in group:
            if not before[position] and key not in seen:
                seen.add(key)
                comps.append(comp)
                masks.append(mask)
                keys.append(key)
            position += 1
        if comps:
            units.append(Unit(prompt, tuple(comps), tuple(masks), tuple(keys)))
    units.sort(key=lambda u: (len(u.completions), len(u.prompt) + max(map(len, u.completions)), u.keys[0]))
    return units


def plan_batches(units: list[Unit], max_tokens: int) -> list[list[Unit]]:
    """Greedy batches of consecutive units (same completion count) whose padded size stays under ``max_tokens``."""
    batches: list[list[Unit]] = []
    cur: list[Unit] = []
    p_max, c_max = 0, 0
    for u in units:
        p, c = max(p_max, len(u.prompt)), max(c_max, max(map(len, u.completions)))
        k = len(u.completions)
        if cur and (len(cur[0].completions) != k or (len(cur) + 1) * (p + k * c) > max_tokens):
            batches.append(cur)
            cur, p, c = [], len(u.prompt), max(map(len, u.completions))
        cur.append(u)
        p_max, c_max = p, c
    if cur:
        batches.append(cur)
    return batches


class SeenKeys:
    """The keys of the sequences planned so far: a sorted array of 16-byte keys (16 bytes per distinct sequence,
    not a Python set's ~100), looked up and extended one window at a time."""

    def __init__(self):
        self.keys = np.empty(0, dtype=f"V{KEY_BYTES}")

    def __len__(self) -> int:
        return len(self.keys)

    def contains(self, keys: list[bytes]) -> np.ndarray:
        """bool [len(keys)]: which of ``keys`` are in the set."""
        probe = np.frombuffer(b"".join(keys), dtype=self.keys.dtype)
        at = np.searchsorted(self.keys, probe)
        hit = at < len(self.keys)
        hit[hit] = self.keys[at[hit]] == probe[hit]
        return hit

    def add(self, keys: list[bytes]) -> None:
        """Add ``keys`` (none of them in the set yet)."""
        if keys:
            new = np.sort(np.frombuffer(b"".join(keys), dtype=self.keys.dtype))
            self.keys = np.insert(self.keys, np.searchsorted(self.keys, new), new)


@dataclass(frozen=True)
class ShardSpec:
    """What the plan keeps of one shard (O(1) each; its units are read again by :meth:`PrecomputePlan.iter_shards`).

    ``window``: the shard holds records ``[window * shard_examples, (window + 1) * shard_examples)``;
    ``tokens``: tokens it scores (prompt once + every completion; the progress bars' unit); ``sequences``:
    its distinct sequences; ``digest``: blake2b-128 of its sorted keys (the data must read back the same);
    ``earlier``: window-local positions of the candidate sequences already in an earlier window (left out).
    """

    window: int
    tokens: int
    sequences: int
    digest: bytes
    earlier: tuple[int, ...] = ()


def keys_digest(keys: Iterable[bytes]) -> bytes:
    """blake2b-128 of ``keys`` sorted: a shard's identity, whatever order its entries come in."""
    return hashlib.blake2b(b"".join(sorted(keys)), digest_size=16).digest()


def job_examples(data, tokenizer, config: PrecomputeConfig, *, wanted: Callable[[int], bool] | None = None,
                 stop: int | None = None) -> Iterator[tuple[int, Example]]:
    """``(index, example)`` of everything a precompute job scores, in plan order, one record at a time.

    First the records TRL keeps (index = the record's index, :func:`refmodel.data.iter_examples`); then,
    with ``config.kto_kl_batch_size``, the KL completions TRL's ``KTOTrainer`` builds
    (:func:`refmodel.data.iter_kto_kl_examples`), numbered on from the first window after the records, so
    that they fill windows (and shards) of their own. ``wanted`` / ``stop`` as in ``iter_examples``: a
    caller re-reading some windows skips tokenizing the others' records (the KL part is tokenized up to
    ``stop``: its rotation needs every earlier record of its batch). The KL part reads the data twice more
    (a count, then the batches), holding one batch of records at a time.
    """
    yield from iter_examples(data, tokenizer, max_length=config.max_length, truncation_mode=config.truncation_mode,
                             wanted=wanted, stop=stop)
    if config.kto_kl_batch_size is None:
        return
    size = config.shard_examples
    records = sum(1 for _ in iter_records(data))  # read, not tokenized: where the records' windows end
    offset = -(-records // size) * size
    if stop is not None and offset >= stop:
        return
    for j, ex in enumerate(iter_kto_kl_examples(data, tokenizer, batch_size=config.kto_kl_batch_size,
                                                max_length=config.max_length)):
        index = offset + j
        if stop is not None and index >= stop:
            return
        if wanted is None or wanted(index):
            yield index, ex


def plan_windows(data, tokenizer, config: PrecomputeConfig, check: PositionCheck | None = None
                 ) -> tuple[tuple[ShardSpec, ...], dict]:
    """Read and tokenize ``data`` once, one window at a time: ``(shard specs, job description)``.

    A pure function of the data and the settings; the description carries a hash of the plan (every
    shard's keys in order, as version 1 had it) so that resuming with other data or settings is refused.
    ``check`` sees every example (the position limit).
    """
    size = config.shard_examples
    seen = SeenKeys()
    plan = hashlib.blake2b(digest_size=16)
    specs: list[ShardSpec] = []

    def close(window: int, groups: list[Group]) -> None:
        earlier: list[int] = []

        def lookup(keys: list[bytes]) -> np.ndarray:
            hit = seen.contains(keys)
            earlier.extend(np.flatnonzero(hit).tolist())
            return hit

        units = window_units(groups, lookup)
        keys = [k for u in units for k in u.keys]
        if not keys:
            return
        seen.add(keys)
        plan.update(f"{len(specs)}|".encode() + b"".join(keys))
        specs.append(ShardSpec(window, sum(u.tokens for u in units), len(keys), keys_digest(keys), tuple(earlier)))

    current, groups = -1, []  # type: tuple[int, list[Group]]
    for index, ex in job_examples(data, tokenizer, config):
        if check is not None:
            check.add(ex)
        if index // size != current:
            if groups:
                close(current, groups)
            current, groups = index // size, []
        groups += example_groups(ex)
    if groups:
        close(current, groups)
    tokenization: dict[str, Any] = {"max_length": config.max_length, "truncation_mode": config.truncation_mode}
    if config.kto_kl_batch_size is not None:
        tokenization["kto_kl_batch_size"] = config.kto_kl_batch_size
    job = {"kind": "precompute", "plan_version": PLAN_VERSION, "plan_blake2b": plan.hexdigest(), "shards": len(specs),
           "sequences": sum(s.sequences for s in specs), "max_tokens_per_batch": config.max_tokens_per_batch,
           "shard_examples": size, "share_prompt": config.share_prompt, "temperature": config.temperature,
           # the tokenization too: `store export-trl` and `store repair` tokenize the data again with it
           "tokenization": tokenization}
    return tuple(specs), job

__all__ = ["PLAN_VERSION", "Group", "PositionCheck", "SeenKeys", "ShardSpec", "Unit", "check_position_limit",
           "example_groups", "job_examples", "keys_digest", "plan_batches", "plan_windows", "window_units"]
