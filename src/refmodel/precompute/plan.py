"""The precompute plan: what a run will do, decided once by :func:`plan_precompute` for every driver.

:func:`refmodel.precompute` (one process) and :func:`refmodel.precompute.ray.precompute_on_ray` (an actor pool) both call
:func:`plan_precompute` and then only score and write what the :class:`PrecomputePlan` says: the same
fingerprint, storage dtype, pad id, shards and job description in the manifest. Whichever driver runs,
and whichever resumes the other's store, the same inputs give the same plan; the bytes then match
because both score a shard with the same ``plan_batches`` + ``score_units`` calls.

Plan (a pure function of the tokenized data and the settings, so a resumed run redoes exactly the
same work): every distinct sequence once; examples sorted by (completions, length, key) so batches
hold similar lengths; cut into shards of ``shard_examples`` examples; inside a shard, greedy batches
under ``max_tokens_per_batch`` padded tokens. Shard ``i`` is written as ``shard-{i:05d}`` when all its
batches are done, so a killed run loses at most one shard and ``resume=True`` gives the same bytes.

The drivers read the shards only through :meth:`PrecomputePlan.shard`, :attr:`~PrecomputePlan.n_shards`
and :meth:`~PrecomputePlan.shard_tokens`, never the list itself, so that a plan produced window by window
(bounded memory, issue 27) can take the place of the materialized one without touching them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data import Example, kto_kl_examples, load_examples, pad_id_of
from ..errors import ConfigError, InvalidInput
from ..models.fingerprint import fingerprint as model_fingerprint
from ..models.limits import position_limit
from ..store import LogprobStore
from ..store.format import key_bytes, normalize_dtype
from ..store.manifest import shard_name
from .config import PrecomputeConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    """One prompt and the completions of it still to score."""

    prompt: tuple[int, ...]
    completions: tuple[tuple[int, ...], ...]
    masks: tuple[tuple[bool, ...], ...]
    keys: tuple[bytes, ...]

    @property
    def tokens(self) -> int:
        return len(self.prompt) + sum(len(c) for c in self.completions)


def check_position_limit(model, examples: list[Example]) -> None:
    """Refuse data with a sequence longer than the model's position limit, before any store is made.

    Raises InvalidInput naming the first offending row (file and line), its length and the limit, and
    how many rows exceed it. Models whose config names no limit are not checked.
    """
    found = position_limit(model)
    if found is None:
        return
    limit, field = found
    over = [(ex, name, len(ex.prompt_ids) + len(comp)) for ex in examples
            for comp, name in zip(ex.completions, ex.names, strict=True) if len(ex.prompt_ids) + len(comp) > limit]
    if over:
        ex, name, length = over[0]
        rows = len({id(e) for e, _, _ in over})
        raise InvalidInput(f"{ex.where or 'a record'}: the {name} sequence has {length} tokens (prompt "
                           f"{len(ex.prompt_ids)} + {name} {length - len(ex.prompt_ids)}), more than the model's "
                           f"position limit of {limit} (config.{field}); {rows} of {len(examples)} rows are too long. "
                           "Shorten or drop them, or truncate them as TRL does with max_length (--max-length)")


def plan_units(examples: list[Example]) -> list[Unit]:
    """Distinct sequences grouped by shared prompt, in canonical order (completions, length, key)."""
    seen: set[bytes] = set()
    units = []
    for ex in examples:
        groups = [(ex.prompt_ids, list(zip(ex.completions, ex.completion_masks, strict=True)))]
        if not ex.prompt_ids:  # no shared prefix (e.g. keep_end truncation cut the prompt): one unit per row
            groups = [(c[:1], [(c[1:], m[1:])]) for c, m in groups[0][1] if c]
        for prompt, rows in groups:
            comps, masks, keys = [], [], []
            for comp, mask in rows:
                key = key_bytes(np.asarray(prompt + comp, dtype=np.int64))
                if key not in seen and comp:
                    seen.add(key)
                    comps.append(comp)
                    masks.append(mask)
                    keys.append(key)
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


def plan_job(examples: list[Example], *, max_tokens_per_batch: int, shard_examples: int, share_prompt: bool,
             temperature: float) -> tuple[list[list[Unit]], dict]:
    """The job's shards (lists of units, ``shard_examples`` each) and its description for the manifest.

    A pure function of the tokenized data and the settings; the description carries a hash of the plan so
    that resuming with other data or settings is refused.
    """
    if max_tokens_per_batch < 1 or shard_examples < 1:
        raise InvalidInput("max_tokens_per_batch and shard_examples must be >= 1")
    units = plan_units(examples)
    shards = [units[i:i + shard_examples] for i in range(0, len(units), shard_examples)]
    plan = hashlib.blake2b(digest_size=16)
    for i, shard in enumerate(shards):
        plan.update(f"{i}|".encode() + b"".join(k for u in shard for k in u.keys))
    job = {"kind": "precompute", "plan_blake2b": plan.hexdigest(), "shards": len(shards),
           "sequences": sum(len(u.keys) for u in units), "max_tokens_per_batch": max_tokens_per_batch,
           "shard_examples": shard_examples, "share_prompt": share_prompt, "temperature": temperature}
    return shards, job


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
    storage ``dtype``, the tokenizer's ``pad_id``, the ``shards`` (tuples of :class:`Unit`, at most
    ``config.shard_examples`` each), the ``job`` description recorded in the manifest (with the plan's
    hash, so resuming with other data or settings is refused) and the ``config`` it was made with.
    """

    fingerprint: str
    dtype: str
    pad_id: int
    shards: tuple[tuple[Unit, ...], ...]
    job: dict
    config: PrecomputeConfig

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    def shard(self, index: int) -> tuple[Unit, ...]:
        """The units of shard ``index``, in scoring order."""
        return self.shards[index]

    def shard_tokens(self, index: int) -> int:
        """Tokens (prompt once + every completion) shard ``index`` scores: the progress bars' unit."""
        return sum(u.tokens for u in self.shards[index])

    @property
    def total_tokens(self) -> int:
        return sum(self.shard_tokens(i) for i in range(self.n_shards))

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
            (:func:`refmodel.data.load_examples`); its pad id pads the batches.
        data: a data path, a ``datasets.Dataset`` or a list of records (see :mod:`refmodel.data`).

    Raises InvalidInput for a sequence past the model's position limit (before any store exists).
    """
    temperature = config.temperature
    fp = model_fingerprint(model, temperature=temperature)  # 1.0 left out: models.fingerprint_settings
    examples = load_examples(data, tokenizer, max_length=config.max_length, truncation_mode=config.truncation_mode)
    if config.kto_kl_batch_size is not None:  # TRL's KL completions, after the examples (same sequences: once)
        examples += kto_kl_examples(data, tokenizer, batch_size=config.kto_kl_batch_size,
                                    max_length=config.max_length)
    check_position_limit(model, examples)
    shards, job = plan_job(examples, max_tokens_per_batch=config.max_tokens_per_batch,
                           shard_examples=config.shard_examples, share_prompt=config.share_prompt,
                           temperature=temperature)
    # the tokenization too: `store export-trl` and `store repair` tokenize the data again with it
    job["tokenization"] = {"max_length": config.max_length, "truncation_mode": config.truncation_mode}
    if config.kto_kl_batch_size is not None:
        job["tokenization"]["kto_kl_batch_size"] = config.kto_kl_batch_size
    return PrecomputePlan(fingerprint=fp, dtype=normalize_dtype(config.dtype), pad_id=pad_id_of(tokenizer),
                          shards=tuple(tuple(s) for s in shards), job=job, config=config)


__all__ = ["PrecomputePlan", "Unit", "check_position_limit", "load_scoring_model", "open_or_create_store",
           "pending_shards", "plan_batches", "plan_job", "plan_precompute", "plan_units"]
