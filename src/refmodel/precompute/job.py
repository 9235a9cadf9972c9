"""The precompute job: reference log-probs of a dataset into a :class:`~refmodel.store.LogprobStore`.

What to score, in which shards, and under which fingerprint and job is the plan
(:func:`~refmodel.precompute.plan.plan_precompute`, shared with the Ray driver); this module scores it.

Scoring one batch: the prompts (left-padded) run through the backbone once with a KV cache; the cache
is repeated for each completion (chosen and rejected) and the completions (right-padded, so real
tokens stay contiguous and position ids continue from each prompt's length) run on top of it. Only
scored completion positions reach the head, through :func:`refmodel.token_logprobs`. The result equals
``model_logprobs`` on the full sequences up to float32 summation order (see tests).
"""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..cluster import is_main_process
from ..data import collate
from ..errors import ConfigError, StoreCorrupt
from ..logprobs.model import (
    backbone_of,
    head_logprobs,
    model_logprobs,
    position_ids_from_mask,
    unwrap_causal_lm,
)
from ..models.limits import position_limit
from ..store import LogprobStore
from ..store.format import Entry, make_entry
from ..store.manifest import shard_name
from .config import PrecomputeConfig
from .plan import PrecomputePlan, load_scoring_model, plan_precompute
from .ranks import Ranks, SharedStoreWriter, launcher_ranks, on_main_rank, rank_group, split_precompute
from .windows import Unit, plan_batches

log = logging.getLogger(__name__)


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
    limit = position_limit(causal)
    if limit is not None and prompt.shape[1] + c_len > limit[0]:
        # A long prompt padded beside a long completion of another row: the cache + completion keys pass the
        # limit though no row does. transformers 4.56's GPT-2 slices its causal mask to the limit (a shape
        # error); the rows scored whole, right-padded, stay within it.
        return _score_full(model, units, pad_id, temperature)
    prompt_len = prompt_mask.sum(1)
    backbone = backbone_of(causal)
    cache_name = _cache_argument(backbone)
    out = backbone(input_ids=prompt.to(device), attention_mask=prompt_mask.to(device),
                   position_ids=position_ids_from_mask(prompt_mask).to(device), use_cache=True)
    cache, last = out[cache_name], out.last_hidden_state[:, -1]
    if k > 1:
        cache.batch_repeat_interleave(k)
    full_mask = torch.cat([prompt_mask.repeat_interleave(k, 0), comp_mask], 1)
    # Padding after a short completion keeps its row's last real position: arange(c_len) alone would push
    # a short prompt + long batch-mate past the model's position limit (an IndexError in GPT-2's table).
    steps = torch.minimum(torch.arange(c_len)[None], (comp_mask.sum(1) - 1).clamp(min=0)[:, None])
    positions = prompt_len.repeat_interleave(k)[:, None] + steps
    hidden = backbone(input_ids=comp.to(device), attention_mask=full_mask.to(device),
                      position_ids=positions.to(device), use_cache=True, **{cache_name: cache}).last_hidden_state
    # Completion token j is predicted from the state before it: the prompt's last for j = 0.
    pred = torch.cat([last.repeat_interleave(k, 0)[:, None], hidden[:, :-1]], 1)
    targets = torch.where(scored.to(device), comp.to(device), -100)
    logps = head_logprobs(causal, pred, targets, temperature=temperature).cpu().numpy()
    entries = []
    for i, u in enumerate(units):
        for j, (ids, mask) in enumerate(u.sequences()):
            values = np.concatenate([np.zeros(len(u.prompt), np.float32), logps[i * k + j, :len(ids) - len(u.prompt)]])
            entries.append(make_entry(ids, values, mask))
    return entries


def _cache_argument(backbone) -> str:
    """The backbone's name for the KV cache, in its ``forward`` and its output: ``cache`` since transformers
    5.24, ``past_key_values`` before (5.24 still takes the old name, with a FutureWarning on every call)."""
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


def _score_full(model, units: list[Unit], pad_id: int, temperature: float) -> list[Entry]:
    """Fallback without prefix sharing: ``model_logprobs`` on the right-padded full sequences."""
    device = next(model.parameters()).device
    seqs = [seq for u in units for seq in u.sequences()]
    batch = collate(seqs, pad_id)
    ids, attn, score = batch["input_ids"], batch["attention_mask"], batch["score_mask"]
    logps = model_logprobs(model, ids.to(device), attn.to(device), score.to(device), temperature=temperature).cpu()
    return [make_entry(s, logps[r, :len(s)].numpy(), m) for r, (s, m) in enumerate(seqs)]


def precompute(model, data, out, config: PrecomputeConfig | None = None, *, tokenizer=None,
               model_kwargs: dict | None = None, split: bool = True, **settings) -> LogprobStore:
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
        split: under a launcher (``torchrun``, ``accelerate launch``, or torch.distributed initialized;
            every rank must call this): True splits the shards over the ranks, each scoring on
            ``cuda:LOCAL_RANK`` when on CUDA, into one store byte-identical to a single process's
            (:mod:`refmodel.precompute.ranks`); False runs the whole job on rank 0 while the others wait.
            Every rank gets the finished store. Ignored in a single process.
    """
    cfg = (config or PrecomputeConfig()).with_overrides(**settings)
    ranks = launcher_ranks()
    if ranks is None:
        return _precompute_here(model, data, out, cfg, tokenizer, model_kwargs)
    with rank_group() as group:
        if not split:
            return on_main_rank(lambda: _precompute_here(model, data, out, cfg, tokenizer, model_kwargs,
                                                         ranks=ranks), out, ranks, group)
        model, tokenizer = _load_and_place(model, tokenizer, cfg, model_kwargs, ranks)
        plan = plan_precompute(model, tokenizer, data, cfg)
        return split_precompute(plan, out, ranks, group,
                                lambda todo, writer: score_plan(model, plan, writer, todo, ranks=ranks))


def _load_and_place(model, tokenizer, cfg: PrecomputeConfig, model_kwargs: dict | None, ranks: Ranks | None):
    """``(model, tokenizer)`` loaded and on ``cfg``'s device (``cuda:LOCAL_RANK`` under a launcher)."""
    from_path = isinstance(model, (str, Path))
    model, tokenizer = load_scoring_model(model, tokenizer, {**cfg.model_kwargs(), **(model_kwargs or {})})
    if from_path or cfg.device != "auto":  # "auto" leaves a model the caller placed where it is
        model.to(cfg.resolved_device(ranks.local_rank if ranks is not None else None))
    return model, tokenizer


def _precompute_here(model, data, out, cfg: PrecomputeConfig, tokenizer, model_kwargs: dict | None,
                     ranks: Ranks | None = None) -> LogprobStore:
    """The whole job in this process."""
    model, tokenizer = _load_and_place(model, tokenizer, cfg, model_kwargs, ranks)
    plan = plan_precompute(model, tokenizer, data, cfg)
    store, todo = plan.open_store(out)
    try:
        score_plan(model, plan, store, todo)
    finally:
        store.close()
    return LogprobStore.open(out, plan.fingerprint)


def score_plan(model, plan: PrecomputePlan, store: LogprobStore | SharedStoreWriter, todo: list[int], *,
               ranks: Ranks | None = None) -> None:
    """Score the shards ``todo`` of ``plan`` with ``model`` in this process and commit each to ``store``.

    ``ranks``: this process's place when the shards are split over ranks; its progress bar (rank 0's only)
    and log then count this rank's shards, and each committed shard is logged with the rank at INFO.
    """
    cfg = plan.config
    left = sum(plan.shard_tokens(i) for i in todo)
    total = plan.total_tokens if ranks is None else left
    where = "" if ranks is None else f" ({ranks})"
    log.info("precompute%s: %d sequences in %d shards (%d to do here), %d tokens, fingerprint %s", where,
             plan.job["sequences"], plan.n_shards, len(todo), plan.total_tokens, plan.fingerprint)
    start = time.perf_counter()
    with tqdm(total=total, initial=total - left, unit="tok", unit_scale=True, desc="reference log-probs" + where,
              disable=not cfg.progress or not is_main_process()) as bar:
        for i, units in plan.iter_shards(todo):  # one window of the data in memory at a time
            entries = []
            for batch in plan_batches(list(units), cfg.max_tokens_per_batch):
                entries += score_units(model, batch, pad_id=plan.pad_id, temperature=cfg.temperature,
                                       share_prompt=cfg.share_prompt)
                bar.update(sum(u.tokens for u in batch))
            store.write_shard(shard_name(i), entries)
            log.info("precompute%s: wrote shard %d (%d sequences)", where, i, len(entries))
    elapsed = time.perf_counter() - start
    log.info("precompute%s: %d tokens in %.2fs (%.0f tokens/s)", where, left, elapsed, left / max(elapsed, 1e-9))


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
        settings["kto_kl_batch_size"] = tokenization.get("kto_kl_batch_size")
    else:
        settings["max_length"] = None
    return precompute(model, data, path, tokenizer=tokenizer, dtype=dtype, resume=True, progress=progress,
                      model_kwargs=model_kwargs, **settings)


# The planning names stay importable from here (their home is .plan).
__all__ = ["precompute", "repair_store", "score_plan", "score_units"]
