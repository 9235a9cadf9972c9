"""The precompute plan: what a run will do, decided once by :func:`plan_precompute` for every driver.

:func:`refmodel.precompute` (one process) and :func:`refmodel.precompute.ray.precompute_on_ray` (an actor pool) both call
:func:`plan_precompute` and then only score and write what the :class:`PrecomputePlan` says: the same
fingerprint, storage dtype, pad id, shards and job description in the manifest. Whichever driver runs,
and whichever resumes the other's store, the same inputs give the same plan; the bytes then match
because both score a shard with the same ``plan_batches`` + ``score_units`` calls.

Plan (a pure function of the data and the settings, so a resumed run redoes exactly the same work), in
windows (:mod:`.windows`) so that memory does not grow with the dataset (issue 27): the records are cut into windows of
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
Layout version :data:`.windows.PLAN_VERSION` is recorded in the job (``store info`` shows it): version 1 (no
``plan_version`` in the job, refmodel before issue 27) sorted the whole dataset at once, so its shards
hold other sequences than version 2's once the data has more than one window; its stores are not resumed
by this version (their job differs).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import is_reiterable, pad_id_of
from ..errors import ConfigError, DataFormatError
from ..models.fingerprint import fingerprint as model_fingerprint
from ..store import LogprobStore
from ..store.format import normalize_dtype
from ..store.manifest import shard_name
from .config import PrecomputeConfig
from .windows import (
    Group,
    PositionCheck,
    ShardSpec,
    Unit,
    example_groups,
    job_examples,
    keys_digest,
    plan_windows,
    window_units,
)

log = logging.getLogger(__name__)

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


__all__ = ["PrecomputePlan", "load_scoring_model", "open_or_create_store", "pending_shards", "plan_precompute"]
