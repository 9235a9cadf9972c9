"""Dynamic batching: concurrent requests' sequences merge into token-budgeted batches.

Each model has one :class:`Batcher`. ``submit`` admits a request's sequences (or raises
:class:`~refmodel.ServiceOverloaded` when ``max_queue`` would be exceeded) and awaits their results.
A single loop forms batches in arrival order: a batch closes when adding the next sequence would
exceed ``max_batch_tokens`` padded tokens (rows x longest row) or when its oldest sequence has waited
``max_wait_s``. The model runs in a worker thread, so the event loop keeps accepting, validating and
answering requests while a batch computes; the next batch forms meanwhile. The worker hands a
finished batch back with one ``call_soon_threadsafe``, which answers every request it completes and
frees the loop for the next batch in the same event-loop turn (no future chaining, no ``gather``).

With ``batching=False`` every request runs as its own batch (the baseline of the benchmark).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

from ..errors import ServiceOverloaded

log = logging.getLogger(__name__)


def check_admission(name: str, accepting: bool, admitted: int, adding: int, max_queue: int,
                    where: str = "") -> None:
    """Raise 503 when ``name`` is not accepting, 429 when ``adding`` more sequences exceed ``max_queue``."""
    if not accepting:
        raise ServiceOverloaded(f"model {name!r} is not accepting requests (shutting down)", status=503)
    if admitted + adding > max_queue:
        raise ServiceOverloaded(
            f"the queue of model {name!r} is full ({admitted} of {max_queue} sequences "
            f"admitted{where}, this request adds {adding}); retry later", status=429)


def drain_seconds(queued_tokens: int, tokens_per_s: float) -> int:
    """A ``Retry-After`` hint: seconds to drain ``queued_tokens`` at the recent rate, clamped to 1..30."""
    if tokens_per_s <= 0:
        return 1
    return max(1, min(30, math.ceil(queued_tokens / tokens_per_s)))


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


class Batcher:
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
        self._wake.set()
        try:
            return await request.future
        finally:
            self._set_admitted(self._admitted - len(items))

    def _set_admitted(self, value: int) -> None:
        self._admitted = value
        if self._on_depth is not None:
            self._on_depth(value)

    def _fits(self, batch: list[_Item], item: _Item) -> bool:
        longest = max([item.tokens] + [b.tokens for b in batch])
        return (len(batch) + 1) * longest <= self.max_batch_tokens

    async def _collect(self) -> list[_Item]:
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

            self._executor.submit(self._run_batch, [item.payload for item in live]).add_done_callback(hand_back)
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
        results = job.result() if exc is None else None
        if exc is None and len(results) != len(live):
            exc = RuntimeError(f"run_batch returned {len(results)} results for {len(live)} sequences")
        if exc is not None:  # a bug in the model run: fail this batch, keep serving
            log.error("batch of %d sequences for %s failed", len(live), self.name, exc_info=exc)
            _fail(live, exc)
            return
        seconds = time.perf_counter() - start
        tokens = sum(item.tokens for item in live)
        self._recent_tokens_per_s = tokens / seconds if seconds > 0 else 0.0
        if self._observe is not None:
            self._observe(len(live), tokens, seconds)
        for item, result in zip(live, results, strict=True):
            request = item.request
            request.results[item.index] = result
            request.remaining -= 1
            if request.remaining == 0 and not request.future.done():
                request.future.set_result(request.results)


def _fail(items: list[_Item], exc: BaseException) -> None:
    for item in items:
        if not item.request.future.done():
            item.request.future.set_exception(exc)


__all__ = ["Batcher"]
