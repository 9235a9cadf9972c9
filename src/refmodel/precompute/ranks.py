"""The precompute job split over the ranks of a launcher (``torchrun``, ``accelerate launch``).

Under a launcher (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` in the environment, or ``torch.distributed``
already initialized) every rank plans the same job (:func:`~refmodel.precompute.plan.plan_precompute`,
a pure function of the model and data) and scores only its own shards, on ``cuda:LOCAL_RANK`` when it
scores on CUDA. The protocol, over a gloo group (a few small messages; the shards themselves go to disk):

1. every rank shows the others its plan (fingerprint, plan hash): a rank with another model or other
   data stops the job on every rank, before anything is written;
2. rank 0 alone creates the store (or, with ``resume``, reopens it and drops damaged shards) and sends
   the shards still to do; a refusal (an existing store without ``--resume``) stops every rank;
3. rank ``r`` scores the ``r``-th, ``r + W``-th, ... of them (shard ``i`` on rank ``i % W`` in a fresh
   run) and commits each one as soon as it is scored: shard file and manifest under the store's writer
   lock, which the ranks take in turn, for the write only (:class:`SharedStoreWriter`);
4. a final exchange: every rank reports; rank 0 checks the store lists every shard of the job; every
   rank opens the finished store.

The store folder must be the same for every rank (on several nodes: a shared filesystem with ``flock``).
The shards and the batches in them are the plan's, scored by the same ``score_units`` calls as one
process, and the manifest lists shards sorted by name, so the store is byte-identical to a
single-process run (on CPU, with the same torch thread count). A rank that dies loses only the shard it
was scoring; ``--resume`` (on any number of ranks, or one process) scores only the missing ones.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from ..cluster import launch_ranks
from ..errors import ConfigError, RefModelError
from ..store import LogprobStore
from ..store.format import Entry
from .plan import PrecomputePlan, pending_shards

log = logging.getLogger(__name__)

# A rank can wait long at a barrier: for the others' last shards, or (split=False) for rank 0's whole job.
WAIT = timedelta(hours=24)

# Test hook (tests/precompute/test_ranks.py): "R:N" makes rank R leave abruptly (os._exit(1), as a killed
# process would) once it has committed N shards and scored the next one, before writing it: a rank that
# dies midway, for sure, in a test.
EXIT_AFTER_ENV = "REFMODEL_TEST_RANK_EXIT_AFTER"


@dataclass(frozen=True)
class Ranks:
    """This process's place in a multi-process launch: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def own(self, todo: list[int]) -> list[int]:
        """This rank's share of the shard indices ``todo``: every ``world_size``-th, from the ``rank``-th."""
        return todo[self.rank::self.world_size]

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


def launcher_ranks() -> Ranks | None:
    """This process's :class:`Ranks` under torch.distributed or a launcher; None in a single process.

    The rule is :func:`refmodel.cluster.launch_ranks` (an initialized default group wins, else the
    launcher's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``). A world of one is a single process.
    """
    rank, world, local = launch_ranks()
    return Ranks(rank, world, local) if world > 1 else None


class RankGroup:
    """The ranks' control channel: a gloo group (the default one when :func:`rank_group` made it)."""

    def __init__(self, group: Any = None):
        self.group = group

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (also a barrier)."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list:
        """Every rank's ``obj``, by rank, on every rank (also a barrier)."""
        import torch.distributed as dist

        out: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(out, obj, group=self.group)
        return out


@contextmanager
def rank_group() -> Iterator[RankGroup]:
    """A gloo :class:`RankGroup` for the launch. Every rank must enter it.

    Nothing initialized yet: a default gloo group over :func:`launch_store` (with a key prefix of its
    own), destroyed on exit, so that the script may call ``init_process_group`` itself afterwards.
    Else a gloo group beside the caller's (whatever its backend), destroyed on exit.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        group = dist.new_group(backend="gloo", timeout=WAIT)
        try:
            yield RankGroup(group)
        finally:
            dist.destroy_process_group(group)
        return
    ranks = launcher_ranks()
    assert ranks is not None  # the caller found a launcher (RANK / WORLD_SIZE), else it would run alone
    store = dist.PrefixStore(f"refmodel/precompute/{next(_GROUPS)}", launch_store(ranks))
    dist.init_process_group("gloo", store=store, rank=ranks.rank, world_size=ranks.world_size, timeout=WAIT)
    try:
        yield RankGroup()
    finally:
        dist.destroy_process_group()


# The rendezvous store of this process's launch, made once and kept (see launch_store), and a count of the
# groups made on it: every rank makes them in the same order, so the n-th group's keys are its own.
_STORE: list = []
_GROUPS = itertools.count()


def launch_store(ranks: Ranks) -> Any:
    """The launch's rendezvous store (``MASTER_ADDR:MASTER_PORT``), created on first use and kept for the process.

    Why kept: without torchrun's agent store (a launcher that only sets ``RANK`` / ``WORLD_SIZE`` /
    ``MASTER_ADDR`` / ``MASTER_PORT``: SLURM, mpirun, a shell loop), rank 0 hosts the store. A default
    group made from the environment and destroyed takes rank 0's store down with it, so a second
    ``precompute()`` (or the script's own ``init_process_group``) raced it: a rank that got there first
    read the last rendezvous' keys from the dying store and hung. This store is created the way
    ``init_process_group``'s ``env://`` rendezvous creates it (torchrun's agent store when there is one,
    else hosted by rank 0, multi-tenant), so the script's own ``init_process_group`` later shares it.
    """
    import torch.distributed as dist

    if not _STORE:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise ConfigError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} not: the ranks cannot "
                              "meet. Launch with torchrun or accelerate launch, or unset RANK / WORLD_SIZE for one "
                              "process")
        store, _, _ = next(dist.rendezvous("env://", rank=ranks.rank, world_size=ranks.world_size, timeout=WAIT))
        _STORE.append(store)
    return _STORE[0]


class SharedStoreWriter:
    """Commits shards into a store that the other ranks write too, one shard at a time.

    Each :meth:`write_shard` opens the store for appending, waiting for the writer lock while another
    rank commits, writes and commits the shard and closes (releasing the lock): the lock is held for the
    file write only, never while scoring, and every committed shard survives the death of any rank.
    """

    def __init__(self, path, fingerprint: str, ranks: Ranks):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.ranks = ranks
        self.written = 0
        self._exit_after = _exit_after(ranks)

    def write_shard(self, name: str, entries: list[Entry]) -> None:
        if self.written == self._exit_after:
            log.warning("precompute: %s leaves before writing %s (%s)", self.ranks, name, EXIT_AFTER_ENV)
            os._exit(1)
        with LogprobStore.open(self.path, self.fingerprint, mode="a", wait=True) as store:
            store.write_shard(name, entries)
        self.written += 1


def _exit_after(ranks: Ranks) -> int | None:
    """The shard count after which this rank leaves, from :data:`EXIT_AFTER_ENV` (tests only); else None."""
    spec = os.environ.get(EXIT_AFTER_ENV, "")
    rank, _, count = spec.partition(":")
    if rank.strip().isdigit() and count.strip().isdigit() and int(rank) == ranks.rank:
        return int(count)
    return None


def split_precompute(plan: PrecomputePlan, out, ranks: Ranks, group: RankGroup,
                     score: Callable[[list[int], SharedStoreWriter], None]) -> LogprobStore:
    """Run ``plan`` into the store at ``out`` with every rank scoring its share (the protocol above).

    ``score(todo, writer)`` scores the shards ``todo`` and commits each through ``writer``. Returns the
    finished store (read-only) on every rank; the same error on every rank when any rank failed.
    """
    mine = (plan.fingerprint, plan.dtype, plan.job)  # the job holds the plan's hash and the settings
    for rank, theirs in enumerate(group.gather(mine)):
        if theirs != mine:
            raise ConfigError(f"rank {rank} planned another precompute job than {ranks} (its fingerprint, dtype, "
                              f"data or settings differ: {theirs[:2]}, job {theirs[2]} vs {mine[:2]}, job {mine[2]}); "
                              "give every rank the same model, data and flags")
    def pending() -> list[int]:
        store, todo = plan.open_store(out)
        store.close()
        return todo

    _, todo = _on_rank0(pending, ranks, group)
    own = ranks.own(todo)
    log.info("precompute: %s scores %d of the %d shards still to do", ranks, len(own), len(todo))
    writer = SharedStoreWriter(out, plan.fingerprint, ranks)
    failure, cause = None, None
    try:
        score(own, writer)
    except Exception as exc:  # reported to every rank below, then raised everywhere
        failure, cause = f"{type(exc).__name__}: {exc}", exc
        log.error("precompute: %s failed after %d shard(s): %s", ranks, writer.written, failure)
    failures = [(rank, f) for rank, f in enumerate(group.gather(failure)) if f is not None]
    if failures:
        rank, first = failures[0]
        raise RefModelError(f"precompute failed on {len(failures)} of {ranks.world_size} ranks (rank {rank}: {first}); "
                            f"every shard finished is kept in {out}: run the same command with --resume "
                            "(resume=True) to score the rest") from cause
    missing = None
    if ranks.is_main:
        with LogprobStore.open(out, plan.fingerprint) as store:
            missing = pending_shards(store, plan.n_shards)
    missing = group.broadcast(missing)
    if missing:
        raise RefModelError(f"the ranks finished, but store {out} lacks shards {missing[:10]} of its job; "
                            "run the same command with --resume (resume=True) to score them")
    return LogprobStore.open(out, plan.fingerprint)


def on_main_rank(run: Callable[[], LogprobStore], out, ranks: Ranks, group: RankGroup) -> LogprobStore:
    """Rank 0 runs the whole job (``run()``); the other ranks wait for it, then open the finished store.

    An error on rank 0 is raised there and on the other ranks (the same refmodel error class, else a
    RefModelError naming it).
    """
    store, fingerprint = _on_rank0(run, ranks, group, share=lambda store: store.fingerprint)
    return store if store is not None else LogprobStore.open(out, fingerprint)


def _on_rank0(work: Callable[[], Any], ranks: Ranks, group: RankGroup,
              share: Callable[[Any], Any] = lambda value: value) -> tuple[Any, Any]:
    """``(work()'s result on rank 0, else None; share(result) on every rank)``: rank 0 works, the others
    wait for what it shares. An error on rank 0 is raised there and, sent along, on every other rank."""
    result: Any = None
    error: Exception | None = None
    sent: tuple[Any, tuple | None] = (None, None)
    if ranks.is_main:
        try:
            result = work()
            sent = (share(result), None)
        except Exception as exc:  # sent to the other ranks, so that they stop too
            error, sent = exc, (None, (type(exc), str(exc)))
    shared, failure = group.broadcast(sent)
    if error is not None:
        raise error
    if failure is not None:
        _raise_rank0_error(*failure)
    return result, shared


def _raise_rank0_error(kind: type, message: str) -> None:
    """Raise on this rank the error rank 0 raised: the same refmodel error class, else a RefModelError."""
    if isinstance(kind, type) and issubclass(kind, RefModelError):
        raise kind(f"{message} (on rank 0)")
    raise RefModelError(f"rank 0 failed: {getattr(kind, '__name__', kind)}: {message}")


__all__ = ["EXIT_AFTER_ENV", "RankGroup", "Ranks", "SharedStoreWriter", "launch_store", "launcher_ranks", "on_main_rank",
           "rank_group", "split_precompute"]
