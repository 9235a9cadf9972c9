"""The precompute job: reference log-probs of a dataset into a :class:`~refmodel.store.LogprobStore`.

Plan (a pure function of the tokenized data and the settings, so a resumed run redoes exactly the
same work): every distinct sequence once; examples sorted by (completions, length, key) so batches
hold similar lengths; cut into shards of ``shard_examples`` examples; inside a shard, greedy batches
under ``max_tokens_per_batch`` padded tokens. Shard ``i`` is written as ``shard-{i:05d}`` when all its
batches are done, so a killed run loses at most one shard and ``resume=True`` gives the same bytes.

Scoring one batch: the prompts (left-padded) run through the backbone once with a KV cache; the cache
is repeated for each completion (chosen and rejected) and the completions (right-padded, so real
tokens stay contiguous and position ids continue from each prompt's length) run on top of it. Only
scored completion positions reach the head, through :func:`refmodel.token_logprobs`. The result equals
``model_logprobs`` on the full sequences up to float32 summation order (see tests).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import Example, collate, load_examples, pad_id_of
from ..errors import ConfigError, InvalidInput, StoreCorrupt
from ..logprobs.model import (
    backbone_of,
    head_logprobs,
    model_logprobs,
    position_ids_from_mask,
    unwrap_causal_lm,
)
from ..models.fingerprint import fingerprint as model_fingerprint
from ..models.limits import position_limit
from ..store import LogprobStore
from ..store.format import Entry, key_bytes, make_entry, normalize_dtype
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


@torch.no_grad()
def score_units(model, units: list[Unit], *, pad_id: int = 0, temperature: float = 1.0,
                share_prompt: bool = True) -> list[Entry]:
    """Store entries of every (prompt + completion) of ``units`` (all with the same completion count)."""
    if not share_prompt:
        return _score_full(model, units, pad_id, temperature)
    causal = unwrap_causal_lm(model)
    device = next(model.parameters()).device
    k = len(units[0].completions)
    if any(len(u.completions) != k for u in units):
        raise ValueError("units of one batch must have the same number of completions")
    # Prompts left-padded (their last tokens line up for the cache), completions right-padded.
    prompts = collate([(u.prompt, None) for u in units], pad_id, side="left")
    prompt, prompt_mask = prompts["input_ids"], prompts["attention_mask"]
    comps = collate([(c, m) for u in units for c, m in zip(u.completions, u.masks, strict=True)], pad_id)
    comp, comp_mask, scored = comps["input_ids"], comps["attention_mask"], comps["score_mask"]
    c_len = comp.shape[1]
    prompt_len = prompt_mask.sum(1)
    backbone = backbone_of(causal)
    out = backbone(input_ids=prompt.to(device), attention_mask=prompt_mask.to(device),
                   position_ids=position_ids_from_mask(prompt_mask).to(device), use_cache=True)
    cache, last = out.past_key_values, out.last_hidden_state[:, -1]
    if k > 1:
        cache.batch_repeat_interleave(k)
    full_mask = torch.cat([prompt_mask.repeat_interleave(k, 0), comp_mask], 1)
    # Padding after a short completion keeps its row's last real position: arange(c_len) alone would push
    # a short prompt + long batch-mate past the model's position limit (an IndexError in GPT-2's table).
    steps = torch.minimum(torch.arange(c_len)[None], (comp_mask.sum(1) - 1).clamp(min=0)[:, None])
    positions = prompt_len.repeat_interleave(k)[:, None] + steps
    hidden = backbone(input_ids=comp.to(device), attention_mask=full_mask.to(device),
                      position_ids=positions.to(device), past_key_values=cache, use_cache=True).last_hidden_state
    # Completion token j is predicted from the state before it: the prompt's last for j = 0.
    pred = torch.cat([last.repeat_interleave(k, 0)[:, None], hidden[:, :-1]], 1)
    targets = torch.where(scored.to(device), comp.to(device), -100)
    logps = head_logprobs(causal, pred, targets, temperature=temperature).cpu().numpy()
    entries = []
    for i, u in enumerate(units):
        for j, (c, m) in enumerate(zip(u.completions, u.masks, strict=True)):
            ids = np.asarray(u.prompt + c, dtype=np.int64)
            values = np.concatenate([np.zeros(len(u.prompt), np.float32), logps[i * k + j, :len(c)]])
            entries.append(make_entry(ids, values, np.asarray((False,) * len(u.prompt) + m)))
    return entries


def _score_full(model, units: list[Unit], pad_id: int, temperature: float) -> list[Entry]:
    """Fallback without prefix sharing: ``model_logprobs`` on the right-padded full sequences."""
    device = next(model.parameters()).device
    seqs = [(u.prompt + c, (False,) * len(u.prompt) + m) for u in units for c, m in zip(u.completions, u.masks,
                                                                                         strict=True)]
    batch = collate(seqs, pad_id)
    ids, attn, score = batch["input_ids"], batch["attention_mask"], batch["score_mask"]
    logps = model_logprobs(model, ids.to(device), attn.to(device), score.to(device), temperature=temperature).cpu()
    return [make_entry(np.asarray(s, dtype=np.int64), logps[r, :len(s)].numpy(), np.asarray(m))
            for r, (s, m) in enumerate(seqs)]


def _load_model(model, tokenizer, model_kwargs):
    """``(model, tokenizer)``: a loaded model as is, or a local folder through the one safe loader."""
    if isinstance(model, (str, Path)):
        from ..models.loading import load_model, load_tokenizer

        path = model
        model = load_model(path, what="--model", **(model_kwargs or {}))
        tokenizer = tokenizer or load_tokenizer(path)
    model.eval()
    return model, tokenizer


def precompute(model, data, out, config: PrecomputeConfig | None = None, *, tokenizer=None,
               model_kwargs: dict | None = None, **settings) -> LogprobStore:
    """Reference log-probs of every sequence in ``data`` into a store at ``out`` (returned, read-only).

    Args:
        model: a loaded ``*ForCausalLM`` or a local model folder, loaded by
            :func:`refmodel.models.loading.load_model` with ``model_kwargs`` and ``config.model_dtype``
            (safetensors only unless ``model_kwargs={"allow_pickle": True}``; never the folder's own code).
        data: a data path, a ``datasets.Dataset`` or a list of records (see :mod:`refmodel.data`),
            tokenized with TRL's rule and ``config.max_length`` / ``config.truncation_mode``.
        out: the store folder to create (or, with ``resume``, to finish).
        config: a :class:`PrecomputeConfig` (default: its defaults); ``**settings`` override its fields
            by name (``dtype="float32"``, ``max_tokens_per_batch=...``, ``resume=True``, ...).
    """
    cfg = (config or PrecomputeConfig()).with_overrides(**settings)
    from_path = isinstance(model, (str, Path))
    model, tokenizer = _load_model(model, tokenizer, {**cfg.model_kwargs(), **(model_kwargs or {})})
    if from_path or cfg.device != "auto":  # "auto" leaves a model the caller placed where it is
        model.to(cfg.resolved_device())
    dtype, temperature, max_tokens_per_batch = normalize_dtype(cfg.dtype), cfg.temperature, cfg.max_tokens_per_batch
    share_prompt, resume, progress = cfg.share_prompt, cfg.resume, cfg.progress
    fp = model_fingerprint(model, temperature=temperature)  # 1.0 left out: models.fingerprint_settings
    examples = load_examples(data, tokenizer, max_length=cfg.max_length, truncation_mode=cfg.truncation_mode)
    check_position_limit(model, examples)
    shards, job = plan_job(examples, max_tokens_per_batch=max_tokens_per_batch, shard_examples=cfg.shard_examples,
                           share_prompt=share_prompt, temperature=temperature)
    job["tokenization"] = {"max_length": cfg.max_length, "truncation_mode": cfg.truncation_mode}  # for export-trl
    units = [u for shard in shards for u in shard]
    store = open_or_create_store(out, fp, dtype, job, resume=resume)
    out = Path(out)
    pad_id = pad_id_of(tokenizer)
    todo = pending_shards(store, len(shards))
    total = sum(u.tokens for u in units)
    left = sum(u.tokens for i in todo for u in shards[i])
    log.info("precompute: %d sequences in %d shards (%d to do), %d tokens, fingerprint %s",
             job["sequences"], len(shards), len(todo), total, fp)
    start = time.perf_counter()
    with tqdm(total=total, initial=total - left, unit="tok", unit_scale=True, desc="reference log-probs",
              disable=not progress) as bar:
        for i in todo:
            entries = []
            for batch in plan_batches(shards[i], max_tokens_per_batch):
                entries += score_units(model, batch, pad_id=pad_id, temperature=temperature,
                                       share_prompt=share_prompt)
                bar.update(sum(u.tokens for u in batch))
            store.write_shard(shard_name(i), entries)
    elapsed = time.perf_counter() - start
    log.info("precompute: %d tokens in %.2fs (%.0f tokens/s)", left, elapsed, left / max(elapsed, 1e-9))
    store.close()
    return LogprobStore.open(out, fp)


def repair_store(model, data, path, *, tokenizer=None, progress: bool = True,
           model_kwargs: dict | None = None) -> LogprobStore:
    """Make the precompute store at ``path`` whole again: rescore its missing and damaged shards.

    Needs the model and data the store was made from; the settings (storage dtype, batch budget,
    shard size, prompt sharing, temperature) come from the job in the manifest, so the repaired store
    is byte-identical to an uninterrupted run. Another model gives FingerprintMismatch, other data a
    ConfigError, both before anything is changed. What ``refmodel store repair --model --data`` runs.
    """
    with LogprobStore.open(path) as store:
        job, dtype = store.job, store.dtype
    if not isinstance(job, dict) or job.get("kind") != "precompute":
        raise ConfigError(f"store {path} was not made by `refmodel precompute` (no job in its manifest), so it "
                          f"cannot be rescored; `refmodel store repair {path} --drop` removes its damaged shards")
    settings = {}
    for field, kind in (("max_tokens_per_batch", int), ("shard_examples", int), ("share_prompt", bool),
                        ("temperature", (int, float))):
        if not isinstance(job.get(field), kind):
            raise StoreCorrupt(f"the manifest of {path} is invalid: job.{field} is {job.get(field)!r}; recompute "
                               "the store (refmodel precompute into an empty folder)")
        settings[field] = job[field]
    # The tokenization settings too, so that the rescored shards hold the same keys; stores made before
    # they were recorded were not truncated.
    tokenization = job.get("tokenization")
    if isinstance(tokenization, dict):
        settings["max_length"] = tokenization.get("max_length")
        settings["truncation_mode"] = tokenization.get("truncation_mode", PrecomputeConfig.truncation_mode)
    else:
        settings["max_length"] = None
    return precompute(model, data, path, tokenizer=tokenizer, dtype=dtype, resume=True, progress=progress,
                      model_kwargs=model_kwargs, **settings)


__all__ = ["precompute", "repair_store", "check_position_limit", "plan_units", "plan_batches", "plan_job",
           "open_or_create_store", "pending_shards", "score_units", "shard_name", "Unit"]
