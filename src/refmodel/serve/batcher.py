"""Dynamic batching: concurrent requests' sequences merge into token-budgeted batches.

Each model has one :class:`Batcher`. ``submit`` admits a request's sequences (or raises
:class:`~refmodel.errors.ServiceOverloaded` when ``max_queue`` would be exceeded) and awaits their results.
A single loop forms batches in arrival order: a batch closes when adding the next sequence would
exceed ``max_batch_tokens`` padded tokens (rows x longest row) or when its oldest sequence has waited
``max_wait_s``. The model runs in a worker thread, so the event loop keeps accepting, validating and
answering requests while a batch computes; the next batch forms meanwhile. The worker hands a
finished batch back with one ``call_soon_threadsafe``, which answers every request it completes and
frees the loop for the next batch in the same event-loop turn (no future chaining, no ``gather``).

With ``batching=False`` every request runs as its own batch (the baseline of the benchmark).

A merged batch that fails is run again request by request (:func:`run_per_request`), so one bad row
fails only the request that sent it, never the others that happened to share its batch.
:class:`Batcher` is the protocol that both :class:`LocalBatcher` and the Ray Serve batcher
(:class:`refmodel.serve.ray_serve.RayBatcher`) satisfy; the app takes either.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

from ..errors import RequestTooLarge, ServiceOverloaded

log = logging.getLogger(__name__)


def check_admission(name: str, accepting: bool, admitted: int, adding: int, max_queue: int,
                    where: str = "") -> None:
    """Raise 503 when ``name`` is not accepting, 429 when ``adding`` more sequences exceed ``max_queue``,
    and 413 at once when ``adding`` alone exceeds it: such a request could never be admitted, so "retry
    later" would be a lie that a retrying client follows forever."""
    if adding > max_queue:
        raise RequestTooLarge(
            f"this request has {adding} sequences but model {name!r} admits at most {max_queue} at a time "
            f"(the server's --max-queue); send at most {max_queue} sequences per request, or restart the "
            "server with a larger --max-queue", status=413)
    if not accepting:
        exc = ServiceOverloaded(f"model {name!r} is not accepting requests (shutting down)", status=503)
    elif admitted + adding > max_queue:
        exc = ServiceOverloaded(
            f"the queue of model {name!r} is full ({admitted} of {max_queue} sequences "
            f"admitted{where}, this request adds {adding}); retry later", status=429)
    else:
        return
    exc.model = name  # type: ignore[attr-defined]  # the app's Retry-After asks this model's batcher
    raise exc


def drain_seconds(queued_tokens: int, tokens_per_s: float) -> int:
    """A ``Retry-After`` hint: seconds to drain ``queued_tokens`` at the recent rate, clamped to 1..30."""
    if tokens_per_s <= 0:
        return 1
    return max(1, min(30, math.ceil(queued_tokens / tokens_per_s)))


@runtime_checkable
class Batcher(Protocol):
    """What the app needs of a model's request merger (built by a :data:`BatcherFactory`)."""

    name: str

    @property
    def depth(self) -> int:
        """Sequences admitted and not yet answered."""
        ...

    def start(self) -> None:
        """Begin accepting (called on the running event loop, in the app's lifespan)."""
        ...

    async def stop(self) -> None:
        """Stop accepting (called after uvicorn has drained in-flight requests)."""
        ...

    def retry_after_s(self) -> int:
        """Seconds a client should wait after a 429."""
        ...

    async def submit(self, payloads: list, tokens: list[int]) -> list:
        """Admit one request's sequences (``tokens[i]``: length of sequence i); their results, in order.

        Raises :class:`~refmodel.errors.ServiceOverloaded` (429/503) when not admitted, or the error of the
        model run that failed on this request's own rows.
        """
        ...


# The constructor both batchers share: name, run_batch, executor and the keyword-only knobs
# max_batch_tokens, max_wait_s, max_queue, batching, observe, on_depth.
BatcherFactory = Callable[..., Batcher]


class Failed(NamedTuple):
    """A per-sequence result slot holding the error of the model run that covered it."""

    error: BaseException


def _run_checked(run_batch: Callable[[list], Sequence], payloads: list) -> list:
    results = list(run_batch(payloads))
    if len(results) != len(payloads):
        raise RuntimeError(f"run_batch returned {len(results)} results for {len(payloads)} sequences")
    return results


def run_per_request(run_batch: Callable[[list], Sequence], payloads: list, owners: Sequence[Hashable],
                    name: str = "") -> list:
    """``run_batch(payloads)``; if that raises and the batch holds rows of several requests (``owners[i]``
    names the request of ``payloads[i]``), each request's rows run again on their own.

    Returns one entry per payload: its result, or :class:`Failed` with the error of the run that
    covered it. Every sequence scores the same alone or in a batch, so the retried results equal what
    the merged run would have given; the cost is paid only when a batch fails.
    """
    try:
        return _run_checked(run_batch, payloads)
    except Exception as exc:
        groups: dict[Hashable, list[int]] = {}
        for i, owner in enumerate(owners):
            groups.setdefault(owner, []).append(i)
        if len(groups) == 1:
            log.error("batch of %d sequences for %s failed", len(payloads), name, exc_info=exc)
            return [Failed(exc)] * len(payloads)
        log.warning("batch of %d sequences from %d requests for %s failed (%s: %s); running each request "
                    "alone", len(payloads), len(groups), name, type(exc).__name__, exc)
    out: list = [None] * len(payloads)
    for indices in groups.values():
        try:
            results = _run_checked(run_batch, [payloads[i] for i in indices])
        except Exception as exc:
            log.error("a request of %d sequences for %s failed", len(indices), name, exc_info=exc)
            results = [Failed(exc)] * len(indices)
        for i, result in zip(indices, results, strict=True):
            out[i] = result
    return out


@dataclass
class _Request:
    """One request's sequences: ``future`` gets the list of results when the last one is done."""

    future: asyncio.Future
    results: list
    remaining: int


@dataclass
class _Item:
    payload: object
    tokens: int
    request: _Request
    index: int  # position in the request
    arrived: float = field(default_factory=time.monotonic)


class LocalBatcher:
    """Merge sequences from concurrent requests into batches for ``run_batch(payloads) -> results``.

    ``run_batch`` is called in ``executor`` with a list of payloads and must return one result per
    payload, in order. ``observe(batch_size, tokens, seconds)`` is called after each batch (metrics).
    """

    def __init__(self, name: str, run_batch: Callable[[list], Sequence], executor: Executor, *,
                 max_batch_tokens: int, max_wait_s: float, max_queue: int, batching: bool = True,
                 observe: Callable[[int, int, float], None] | None = None,
                 on_depth: Callable[[int], None] | None = None):
        self.name = name
        self._run_batch = run_batch
        self._executor = executor
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.batching = batching
        self._observe = observe
        self._on_depth = on_depth
        self._pending: deque[_Item] = deque()
        self._admitted = 0  # sequences waiting or running
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._recent_tokens_per_s = 0.0

    @property
    def depth(self) -> int:
        """Sequences admitted and not yet answered."""
        return self._admitted

    def start(self) -> None:
        """Start the batch loop on the running event loop."""
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Stop the loop (call after in-flight requests have drained)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def retry_after_s(self) -> int:
        """A hint for 429 responses: seconds to drain what is admitted at the recent token rate."""
        return drain_seconds(sum(item.tokens for item in self._pending), self._recent_tokens_per_s)

    async def submit(self, payloads: list, tokens: list[int]) -> list:
        """Admit one request's sequences (``tokens[i]`` = length of sequence i) and await their results."""
        check_admission(self.name, self._task is not None and not self._task.done(), self._admitted,
                        len(payloads), self.max_queue)
        if not payloads:
            return []
        request = _Request(asyncio.get_running_loop().create_future(), [None] * len(payloads), len(payloads))
        items = [_Item(p, n, request, i) for i, (p, n) in enumerate(zip(payloads, tokens, strict=True))]
        self._pending.extend(items)
        self._set_admitted(self._admitted + len(items))
        assert self._wake is not None  # set by start(); check_admission refused the request otherwise
        self._wake.set()
        try:
            return await request.future
        finally:
            self._set_admitted(self._admitted - len(items))
            if request.future.cancelled():  # the client went away: its waiting sequences leave the queue
                self._pending = deque(item for item in self._pending if item.request is not request)

    def _set_admitted(self, value: int) -> None:
        self._admitted = value
        if self._on_depth is not None:
            self._on_depth(value)

    def _fits(self, batch: list[_Item], item: _Item) -> bool:
        longest = max([item.tokens] + [b.tokens for b in batch])
        return (len(batch) + 1) * longest <= self.max_batch_tokens

    async def _collect(self) -> list[_Item]:
        assert self._wake is not None  # the loop runs only after start()
        while not self._pending:
            self._wake.clear()
            await self._wake.wait()
        if not self.batching:
            first = self._pending.popleft()
            batch = [first]
            while self._pending and self._pending[0].request is first.request:
                batch.append(self._pending.popleft())
            return batch
        batch = [self._pending.popleft()]
        deadline = batch[0].arrived + self.max_wait_s
        while True:
            while self._pending and self._fits(batch, self._pending[0]):
                batch.append(self._pending.popleft())
            if self._pending:  # the next sequence does not fit: the batch is full
                return batch
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return batch
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [item for item in batch if not item.request.future.done()]  # skip cancelled requests
            if not live:
                continue
            freed = loop.create_future()  # set when the worker is free for the next batch
            start = time.perf_counter()

            def hand_back(job, live=live, freed=freed, start=start):  # runs in the worker thread
                try:
                    loop.call_soon_threadsafe(self._deliver, live, job, start, freed)
                except RuntimeError:  # the loop has closed (shutdown): nobody is waiting any more
                    pass

            self._executor.submit(run_per_request, self._run_batch, [item.payload for item in live],
                                  [id(item.request) for item in live], self.name).add_done_callback(hand_back)
            try:
                await freed
            except asyncio.CancelledError:
                _fail(live, ServiceOverloaded("the server is shutting down", status=503))
                raise

    def _deliver(self, live: list[_Item], job, start: float, freed: asyncio.Future) -> None:
        """On the event loop: answer the batch's sequences and let the loop form the next batch."""
        if not freed.done():
            freed.set_result(None)
        exc = job.exception()
        if exc is not None:  # run_per_request itself failed (a bug): fail this batch, keep serving
            log.error("batch of %d sequences for %s failed", len(live), self.name, exc_info=exc)
            _fail(live, exc)
            return
        results = job.result()
        seconds = time.perf_counter() - start
        tokens = sum(item.tokens for item in live)
        self._recent_tokens_per_s = tokens / seconds if seconds > 0 else 0.0
        if self._observe is not None:
            self._observe(len(live), tokens, seconds)
        for item, result in zip(live, results, strict=True):
            request = item.request
            if request.future.done():
                continue
            if isinstance(result, Failed):
                request.future.set_exception(result.error)
                continue
            request.results[item.index] = result
            request.remaining -= 1
            if request.remaining == 0:
                request.future.set_result(request.results)


def _fail(items: list[_Item], exc: BaseException) -> None:
    for item in items:
        if not item.request.future.done():
            item.request.future.set_exception(exc)


__all__ = ["Batcher", "BatcherFactory", "Failed", "LocalBatcher", "check_admission", "drain_seconds",
           "run_per_request"]
