"""The precompute job on a Ray cluster: a pool of scorer actors, fed one shard per idle actor by the driver.

The driver plans the job with the very function :func:`refmodel.precompute` calls,
:func:`~refmodel.precompute.plan.plan_precompute` (same fingerprint, windows, shards and job description in
the manifest; it loads the model once to fingerprint it and check its position limit). It then reads the
shards still to do in one pass over the data (:meth:`~refmodel.precompute.plan.PrecomputePlan.iter_shards`,
one window tokenized at a time) and hands each to an idle :class:`ShardScorer` actor (one model per
actor, loaded once), keeping at most one shard queued per actor beside the ones being scored, so the
driver's memory does not grow with the dataset (issue 27). Each actor scores its shard with the very same
``plan_batches`` / ``score_units`` calls as the single-process job. The entries come back as plain
byte strings and the driver, the only writer, commits ``shard-{i:05d}.safetensors`` as results arrive.
Hence:

* same batches and same model => the same floats, so every entry is byte-identical to a single-process
  run on the same kind of device (on CPU: with the same torch thread count, ``cpus_per_worker`` per
  actor, since CPU GEMMs split their sums by thread), and the manifest's job is the same, so
  ``resume`` works across modes;
* a killed actor is restarted by Ray and its shard retried (``max_restarts=-1``, ``max_task_retries``);
  a shard is written once, only when all of it has arrived, and its keys are checked against the plan,
  so nothing is lost or duplicated;
* a killed driver loses at most the shards in flight; ``resume=True`` finishes the job.

Why shards and not single batches: a shard is the store's unit of atomic commit, and whole-shard results
keep the driver's work to one file write per shard.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .._optional import require
from ..cluster import connect_ray
from ..errors import ConfigError, RefModelError
from ..store import LogprobStore
from ..store.format import KEY_BYTES, Entry
from ..store.manifest import shard_name
from .config import PrecomputeConfig
from .job import score_units
from .plan import PrecomputePlan, load_scoring_model, plan_precompute
from .ranks import launcher_ranks
from .windows import Unit, keys_digest, plan_batches

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ wire format (plain data only)
def encode_units(units: list[Unit]) -> str:
    """One shard's units as JSON (token ids, 0/1 masks, hex keys)."""
    return json.dumps([[u.prompt.tolist(), [c.tolist() for c in u.completions], [m.astype(int).tolist() for m in u.masks],
                        [k.hex() for k in u.keys]] for u in units], separators=(",", ":"))


def decode_units(text: str) -> list[Unit]:
    """Inverse of :func:`encode_units`."""
    return [Unit(p, tuple(cs), tuple(ms), tuple(bytes.fromhex(k) for k in ks)) for p, cs, ms, ks in json.loads(text)]


def pack_entries(entries: list[Entry]) -> dict[str, bytes]:
    """Entries as four byte strings: keys [N*16], meta int64 [N, 3] (seq_len, start, count), float32 values,
    float64 totals. Bit-exact: the driver rebuilds the very same entries."""
    meta = np.array([(e.seq_len, e.start, e.values.shape[0]) for e in entries], dtype="<i8").reshape(-1, 3)
    values = np.concatenate([e.values for e in entries]) if entries else np.zeros(0, np.float32)
    return {"keys": b"".join(e.key for e in entries), "meta": meta.tobytes(),
            "values": values.astype("<f4", copy=False).tobytes(),
            "totals": np.array([e.total for e in entries], dtype="<f8").tobytes()}


def unpack_entries(keys: bytes, meta: bytes, values: bytes, totals: bytes) -> list[Entry]:
    """Inverse of :func:`pack_entries`."""
    meta_arr = np.frombuffer(meta, dtype="<i8").reshape(-1, 3)
    vals = np.frombuffer(values, dtype="<f4").astype(np.float32)
    tots = np.frombuffer(totals, dtype="<f8")
    if len(keys) != KEY_BYTES * len(meta_arr) or len(tots) != len(meta_arr) or int(meta_arr[:, 2].sum()) != len(vals):
        raise RefModelError("a Ray worker returned a malformed shard result (sizes disagree)")
    entries, offset = [], 0
    for i, (seq_len, start, count) in enumerate(meta_arr.tolist()):
        entries.append(Entry(keys[i * KEY_BYTES:(i + 1) * KEY_BYTES], seq_len, start,
                             vals[offset:offset + count].copy(), float(tots[i])))
        offset += count
    return entries


# ------------------------------------------------------------------ the actor
class ShardScorer:
    """A scorer actor: holds one reference model (loaded once per actor) and scores whole shards.

    :meth:`score_packed` (what the driver calls): shard index and its units (:func:`encode_units`) in, the
    byte strings of :func:`pack_entries` out. ``__call__`` does the same over a batch of rows (``shard``
    int64 [B], ``plan`` str [B]), for use as a Ray Data callable class. Subclass it to change how the model
    is loaded or to observe shards (override :meth:`score_shard`); pass the subclass as ``scorer_cls``.
    """

    def __init__(self, model_path: str, *, max_tokens_per_batch: int = PrecomputeConfig.max_tokens_per_batch,
                 temperature: float = PrecomputeConfig.temperature,
                 share_prompt: bool = PrecomputeConfig.share_prompt, pad_id: int = 0, device: str = "cpu",
                 model_kwargs: dict | None = None, torch_threads: int | None = None):
        if torch_threads:
            # CPU GEMMs split their reductions by thread count, so the bits depend on it: fix it explicitly.
            torch.set_num_threads(torch_threads)
        self.model, _ = load_scoring_model(model_path, None, model_kwargs)
        self.model.to(device)
        self.max_tokens_per_batch = max_tokens_per_batch
        self.temperature = temperature
        self.share_prompt = share_prompt
        self.pad_id = pad_id
        log.info("scorer pid %d: loaded %s on %s (%d torch threads)", os.getpid(), model_path, device,
                 torch.get_num_threads())

    def score_shard(self, index: int, units: list[Unit]) -> list[Entry]:
        """Entries of one shard, batch by batch exactly as the single-process job does it."""
        entries = []
        for batch in plan_batches(units, self.max_tokens_per_batch):
            entries += score_units(self.model, batch, pad_id=self.pad_id, temperature=self.temperature,
                                   share_prompt=self.share_prompt)
        return entries

    def score_packed(self, index: int, plan: str) -> dict[str, bytes]:
        """:func:`pack_entries` of shard ``index``, whose units are ``plan`` (:func:`encode_units`)."""
        return pack_entries(self.score_shard(int(index), decode_units(plan)))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: dict[str, list] = {"shard": [], "keys": [], "meta": [], "values": [], "totals": []}
        for index, plan in zip(batch["shard"].tolist(), batch["plan"].tolist(), strict=True):
            packed = self.score_packed(int(index), plan)
            rows["shard"].append(int(index))
            for name, blob in packed.items():
                rows[name].append(blob)
        out = {"shard": np.array(rows["shard"], dtype=np.int64)}
        for name in ("keys", "meta", "values", "totals"):
            col = np.empty(len(rows[name]), dtype=object)
            col[:] = rows[name]
            out[name] = col
        return out


# ------------------------------------------------------------------ the driver
def _pool_size(ray, num_workers: int | None, gpus_per_worker: float, cpus_per_worker: float, todo: int) -> int:
    """Number of actors: ``num_workers`` or what the cluster holds; ConfigError when GPUs are asked for but absent."""
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    if gpus_per_worker > 0 and gpus < gpus_per_worker:
        raise ConfigError(f"--gpus-per-worker {gpus_per_worker:g} asks for GPUs, but the Ray cluster has "
                          f"{gpus:g} GPU(s) (CPU={cpus:g}); run without --gpus-per-worker to score on CPUs, "
                          "or connect to a cluster with GPUs (--ray-address)")
    if num_workers is None:
        num_workers = int(gpus // gpus_per_worker) if gpus_per_worker > 0 else int(cpus // max(cpus_per_worker, 1e-9))
    if num_workers * gpus_per_worker > gpus or num_workers * cpus_per_worker > cpus:
        log.warning("precompute: %d workers x (%g CPU, %g GPU) exceed the cluster's %g CPU / %g GPU; the pool "
                    "waits for resources (or an autoscaler)", num_workers, cpus_per_worker, gpus_per_worker,
                    cpus, gpus)
    return max(1, min(num_workers, todo))


def precompute_on_ray(model_path, data, out, config: PrecomputeConfig | None = None, *,
                      model_kwargs: dict | None = None, scorer_cls: type = ShardScorer,
                      **settings) -> LogprobStore:
    """:func:`refmodel.precompute` with the scoring spread over a Ray actor pool; returns the store (read-only).

    Args:
        model_path: local model folder, readable at the same path on every Ray node.
        data, out, config, model_kwargs: as for :func:`refmodel.precompute`; the same settings give the
            same store bytes. ``**settings`` override :class:`PrecomputeConfig` fields by name. Of its
            fields, these are Ray's own:
            ``ray_address``: cluster to join (else ``RAY_ADDRESS``, else a new local cluster on this
            machine's cores). A connection already open in this process is used as is.
            ``num_workers``: actors, one model each (default: as many as the cluster's GPUs or CPUs allow).
            ``gpus_per_worker`` / ``cpus_per_worker``: resources of one actor. GPU actors score on ``cuda``;
            a CPU actor runs torch on ``int(cpus_per_worker)`` threads, and its bits equal a
            single-process run's on that many threads (``torch.set_num_threads``). ``device`` is not used.
            ``max_task_retries``: retries of a shard whose actor died (actors restart without limit).
        scorer_cls: the actor class, :class:`ShardScorer` or a subclass.
    """
    ray = require("ray", "ray")  # before any work: MissingDependency names the extra
    cfg = (config or PrecomputeConfig()).with_overrides(**settings)
    ranks = launcher_ranks()
    if ranks is not None:
        raise ConfigError(f"precompute on Ray runs one driver, but this process is {ranks} of a launch (torchrun, "
                          "accelerate launch), so every rank would start its own: run it in one process (Ray spreads "
                          "the work), or drop --ray (ray=) to split the shards over the launcher's ranks")
    model_kwargs = {**cfg.model_kwargs(), **(model_kwargs or {})}
    model_path = str(Path(model_path).resolve())
    model, tokenizer = load_scoring_model(model_path, None, model_kwargs)
    plan = plan_precompute(model, tokenizer, data, cfg)
    del model  # the actors hold the model; the driver only needed its fingerprint and position limit
    gpus_per_worker, cpus_per_worker = cfg.gpus_per_worker, cfg.cpus_per_worker
    connection = connect_ray(cfg.ray_address)
    try:
        workers = _pool_size(ray, cfg.num_workers, gpus_per_worker, cpus_per_worker, max(plan.n_shards, 1))
        store, todo = plan.open_store(out)
        try:
            log.info("precompute on Ray: %d sequences in %d shards (%d to do) on %d worker(s), fingerprint %s",
                     plan.job["sequences"], plan.n_shards, len(todo), workers, plan.fingerprint)
            if todo:
                scorer_kwargs = {"model_path": model_path, "max_tokens_per_batch": cfg.max_tokens_per_batch,
                                 "temperature": cfg.temperature, "share_prompt": cfg.share_prompt,
                                 "pad_id": plan.pad_id, "device": "cuda" if gpus_per_worker > 0 else "cpu",
                                 "model_kwargs": model_kwargs,
                                 "torch_threads": None if gpus_per_worker > 0 else max(1, int(cpus_per_worker))}
                _run(ray, store, plan, todo, scorer_cls, scorer_kwargs, workers=min(workers, len(todo)))
        finally:
            store.close()
    finally:
        connection.close()
    return LogprobStore.open(out, plan.fingerprint)


def _run(ray, store: LogprobStore, plan: PrecomputePlan, todo: list[int], scorer_cls: type, scorer_kwargs: dict,
         *, workers: int) -> None:
    """Score the ``todo`` shards of ``plan`` on ``workers`` actors; write each result as it arrives.

    The shards are read from the data lazily: at most ``workers`` encoded shards wait beside the ones being
    scored, so the driver holds O(workers) shards whatever the dataset's size.
    """
    cfg = plan.config
    actor_cls = ray.remote(scorer_cls).options(
        num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker,
        # Actors restart without limit (a lost node); a shard whose actor keeps dying fails the job after
        # max_task_retries retries.
        max_restarts=-1, max_task_retries=cfg.max_task_retries)
    idle = deque(actor_cls.remote(**scorer_kwargs) for _ in range(workers))
    source: Iterator[tuple[int, tuple[Unit, ...]]] | None = plan.iter_shards(todo)
    waiting: deque = deque()  # (index, encoded units) read from the data, not yet sent
    running: dict = {}  # object ref -> (index, actor)
    total, left = plan.total_tokens, sum(plan.shard_tokens(i) for i in todo)
    written: set[int] = set()
    start = time.perf_counter()
    with tqdm(total=total, initial=total - left, unit="tok", unit_scale=True, desc="reference log-probs (ray)",
              disable=not cfg.progress) as bar:
        while True:
            while source is not None and len(waiting) < workers:
                item = next(source, None)
                if item is None:
                    source = None
                    break
                waiting.append((item[0], encode_units(list(item[1]))))
            while idle and waiting:
                index, units = waiting.popleft()
                actor = idle.popleft()
                running[actor.score_packed.remote(index, units)] = (index, actor)
            if not running:
                break
            (done,), _ = ray.wait(list(running), num_returns=1)
            index, actor = running.pop(done)
            idle.append(actor)
            try:
                row = ray.get(done)
            except Exception as exc:  # the actor's error, or its death after max_task_retries retries
                raise RefModelError(f"shard {index} failed on Ray: {exc}; every shard finished is kept in "
                                    f"{store.path}: run again with resume=True (--resume)") from exc
            entries = unpack_entries(row["keys"], row["meta"], row["values"], row["totals"])
            spec = plan.shards[index]
            if keys_digest(e.key for e in entries) != spec.digest:
                raise RefModelError(f"shard {index} came back from Ray with {len(entries)} entries that do not "
                                    f"match its plan ({spec.sequences} sequences); nothing was written for it")
            store.write_shard(shard_name(index), entries)
            written.add(index)
            bar.update(spec.tokens)
    missing = sorted(set(todo) - written)
    if missing:
        raise RefModelError(f"the Ray job ended without shards {missing[:10]}; run again with resume=True (--resume)")
    elapsed = time.perf_counter() - start
    log.info("precompute on Ray: %d tokens in %.2fs (%.0f tokens/s) on %d worker(s)", left, elapsed,
             left / max(elapsed, 1e-9), workers)


__all__ = ["ShardScorer", "precompute_on_ray", "encode_units", "decode_units", "pack_entries", "unpack_entries"]
