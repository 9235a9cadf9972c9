"""The precompute plan: what a run will do, decided once by :func:`plan_precompute` for every driver.

:func:`refmodel.precompute` (one process) and :func:`refmodel.precompute.ray.precompute_on_ray` (an actor pool) both call
:func:`plan_precompute` and then only score and write what the :class:`PrecomputePlan` says: the same
fingerprint, storage dtype, pad id, shards and job description in the manifest. Whichever driver runs,
and whichever resumes the other's store, the same inputs give the same plan; the bytes then match
because both score a shard with the same ``plan_batches`` + ``score_units`` calls.

Plan (a pure function of the data and the settings, so a resumed run redoes exactly the same work), in
windows so that memory does not grow with the dataset (issue 27): the records are cut into windows of
``shard_examples`` consecutive records; each window's examples become its shard: every sequence not
already in an earlier window (or earlier in this one) once, grouped by shared prompt into units, sorted by
(completions, length, key) so batches hold similar lengths; inside a shard, greedy batches under
``max_tokens_per_batch`` padded tokens. A window left with nothing to score (dropped records, repeats)
makes no shard. Shard ``i`` is written as ``shard-{i:05d}`` when all its batches are done, so a killed
run loses at most one shard and ``resume=True`` gives the same bytes.

:func:`plan_precompute` reads the data once (tokenizing one window at a time) and keeps per shard only its
window, token count, a digest of its keys and the positions of its repeats of earlier windows (O(shards)),
plus the keys seen so far (16 bytes per distinct sequence, to drop repeats across windows). The drivers
then get each shard's units from :meth:`PrecomputePlan.iter_shards`, which reads the data again and
tokenizes only the windows asked for: one window in memory at a time, on every rank and driver.
Layout version :data:`PLAN_VERSION` is recorded in the job (``store info`` shows it): version 1 (no
``plan_version`` in the job, refmodel before issue 27) sorted the whole dataset at once, so its shards
hold other sequences than version 2's once the data has more than one window; its stores are not resumed
by this version (their job differs).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data import Example, is_reiterable, iter_examples, iter_kto_kl_examples, iter_records, pad_id_of
from ..errors import ConfigError, DataFormatError, InvalidInput
from ..models.fingerprint import fingerprint as model_fingerprint
from ..models.limits import position_limit
from ..store import LogprobStore
from ..store.format import KEY_BYTES, key_bytes, normalize_dtype
from ..store.manifest import shard_name
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


def open_or_create_store(out, fp: str, dtype: str, job: dict, *, resume: bool) -> LogprobStore:
    """A writable store at ``out`` for ``job``: new, or (``resume=True``) the same job's unfinished one.

    Resuming first checks every committed shard and drops the damaged ones (missing, corrupt, edited),
    so they are scored again with the missing ones: a resumed store is whole, not just finished.
    """
    out = Path(out)
    if (out / "manifest.json").exists():
        if not resume:
            raise ConfigError(f"{out} already holds a store; pass resume=True (--resume) to finish it, "
                              "or choose an empty folder")
        store = LogprobStore.open(out, fp, mode="a")
        if store.job != job or store.dtype != dtype:
            store.close()
            stored_version = store.job.get("plan_version", 1) if isinstance(store.job, dict) else None
            if stored_version is not None and stored_version != job.get("plan_version"):
                raise ConfigError(f"{out} was planned with shard layout version {stored_version} (an older refmodel) "
                                  f"and this refmodel plans version {job.get('plan_version')}: its shards hold other "
                                  "sequences, so it cannot be resumed; finish it with the refmodel that began it, or "
                                  "recompute it into an empty folder")
            raise ConfigError(f"{out} was filled by another job (data, dtype or settings differ: stored "
                              f"{json.dumps(store.job)}, dtype {store.dtype}); resume needs the same ones")
        listed = set(store.shard_files)
        try:
            damaged = [p for p in store.discard_damaged() if p.file in listed]
        except BaseException:
            store.close()
            raise
        for p in damaged:
            log.warning("precompute: %s is damaged and will be scored again (%s)", p.file, p.reason)
        return store
    store = LogprobStore.create(out, fp, dtype=dtype)
    store.set_job(job)
    return store


def pending_shards(store: LogprobStore, n_shards: int) -> list[int]:
    """Indices of the job's shards not yet committed to ``store``."""
    done = set(store.shard_files)
    return [i for i in range(n_shards) if shard_name(i) not in done]


def load_scoring_model(model, tokenizer=None, model_kwargs: dict | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` in eval mode: a loaded model as is, or a local folder through the one safe loader.

    ``model_kwargs`` go to :func:`refmodel.models.loading.load_model` (a folder only); the tokenizer is
    the folder's own unless given.
    """
    if isinstance(model, (str, Path)):
        from ..models.loading import load_model, load_tokenizer

        path = model
        model = load_model(path, what="--model", **(model_kwargs or {}))
        tokenizer = tokenizer or load_tokenizer(path)
    model.eval()
    return model, tokenizer


@dataclass(frozen=True)
class PrecomputePlan:
    """What one precompute run writes, the same for every driver (see the module docstring).

    Fields: ``fingerprint`` of the reference (at ``config.temperature``; see ``models.fingerprint_settings``), the normalized
    storage ``dtype``, the tokenizer's ``pad_id``, the ``shards`` (a :class:`ShardSpec` each: its window of
    records, tokens and digest; the units themselves come from :meth:`iter_shards`), the ``job``
    description recorded in the manifest (with the plan's hash, so resuming with other data or settings is
    refused), the ``config`` it was made with, and the ``data`` and ``tokenizer`` it reads the shards from
    (not compared: two plans are equal when they would write the same store).
    """

    fingerprint: str
    dtype: str
    pad_id: int
    shards: tuple[ShardSpec, ...]
    job: dict
    config: PrecomputeConfig
    data: Any = field(default=None, compare=False, repr=False)
    tokenizer: Any = field(default=None, compare=False, repr=False)

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    def shard(self, index: int) -> tuple[Unit, ...]:
        """The units of shard ``index``, in scoring order (reads the data up to its window)."""
        return next(self.iter_shards([index]))[1]

    def iter_shards(self, indices: Iterable[int]) -> Iterator[tuple[int, tuple[Unit, ...]]]:
        """``(index, units in scoring order)`` of the shards ``indices``, by increasing index, in one pass over
        the data that tokenizes only their windows: one window is held at a time.

        Raises DataFormatError when a shard reads back other sequences than planned (the data changed).
        """
        wanted = {self.shards[i].window: i for i in sorted(set(indices))}
        if not wanted:
            return
        size, last = self.config.shard_examples, max(wanted)
        current, groups = -1, []  # type: tuple[int, list[Group]]
        for index, ex in job_examples(self.data, self.tokenizer, self.config,
                                      wanted=lambda i: i // size in wanted, stop=(last + 1) * size):
            if index // size != current:
                if groups:
                    yield self._rebuild(wanted.pop(current), groups)
                current, groups = index // size, []
            groups += example_groups(ex)
        if groups:
            yield self._rebuild(wanted.pop(current), groups)
        if wanted:
            raise DataFormatError(f"the data has no records left for shard(s) {sorted(wanted.values())[:10]} of the "
                                  "plan: it changed (or was a one-shot iterator) since the plan read it; do not "
                                  "change the data while precompute runs")

    def _rebuild(self, index: int, groups: list[Group]) -> tuple[int, tuple[Unit, ...]]:
        spec = self.shards[index]
        earlier = set(spec.earlier)
        units = window_units(groups, lambda keys: [i in earlier for i in range(len(keys))])
        if keys_digest(k for u in units for k in u.keys) != spec.digest:
            size = self.config.shard_examples
            raise DataFormatError(f"records {spec.window * size}..{(spec.window + 1) * size - 1} (shard {index}) read "
                                  "back other sequences than when the plan was made: the data changed; do not change "
                                  "the data while precompute runs (start again, or resume with the data as it was)")
        return index, tuple(units)

    def shard_tokens(self, index: int) -> int:
        """Tokens (prompt once + every completion) shard ``index`` scores: the progress bars' unit."""
        return self.shards[index].tokens

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def open_store(self, out) -> tuple[LogprobStore, list[int]]:
        """``(writable store at out, indices of the shards still to score)``.

        A new store, or with ``config.resume`` the same job's unfinished one (damaged shards dropped and
        listed again); ConfigError for an existing store without ``resume`` or made by another job.
        """
        store = open_or_create_store(out, self.fingerprint, self.dtype, self.job, resume=self.config.resume)
        return store, pending_shards(store, self.n_shards)


def plan_precompute(model, tokenizer, data, config: PrecomputeConfig) -> PrecomputePlan:
    """The plan of precomputing ``data`` with ``model`` under ``config``; nothing is written.

    Args:
        model: the loaded reference (``*ForCausalLM``, see :func:`load_scoring_model`): fingerprinted
            at ``config.temperature``, and its position limit checked against every sequence.
        tokenizer: tokenizes ``data`` with TRL's rule and ``config.max_length`` / ``config.truncation_mode``
            (:func:`refmodel.data.iter_examples`); its pad id pads the batches.
        data: a data path, a ``datasets.Dataset`` or a list of records (see :mod:`refmodel.data`), read
            once here and again by :meth:`PrecomputePlan.iter_shards`. A one-shot iterator (a generator)
            is read into a list of records first (records, not tokens; pass something re-iterable, such
            as a path or an object whose ``__iter__`` starts afresh, to hold neither).

    Raises InvalidInput for a sequence past the model's position limit (before any store exists).
    """
    temperature = config.temperature
    fp = model_fingerprint(model, temperature=temperature)  # 1.0 left out: models.fingerprint_settings
    if not is_reiterable(data):
        data = list(data)
    check = PositionCheck(model)
    shards, job = plan_windows(data, tokenizer, config, check)
    check.check()
    return PrecomputePlan(fingerprint=fp, dtype=normalize_dtype(config.dtype), pad_id=pad_id_of(tokenizer),
                          shards=shards, job=job, config=config, data=data, tokenizer=tokenizer)


__all__ = ["PLAN_VERSION", "PositionCheck", "PrecomputePlan", "SeenKeys", "ShardSpec", "Unit", "check_position_limit",
           "example_groups", "job_examples", "keys_digest", "load_scoring_model", "open_or_create_store", "pending_shards",
           "plan_batches", "plan_precompute", "plan_windows", "window_units"]
