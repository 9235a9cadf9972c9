"""``refmodel serve --ray``: the reference service as a Ray Serve deployment with replicas.

Same HTTP API, wire formats, status codes, error bodies and auth as ``refmodel serve``: each replica
runs the very FastAPI app of :func:`refmodel.serve.app.create_app` (``@serve.ingress`` with the app
built inside the replica by ``__serve_build_asgi_app__``) and the same model runner
(:meth:`ServedModel.run`). Only the request merger differs: :class:`RayBatcher` hands each sequence to
a ``@serve.batch`` queue whose ``batch_size_fn`` counts *padded tokens* (rows x longest row), so
Ray itself closes a batch at ``max_batch_tokens`` (``batch_size_fn`` arrived with ray PR #59059, Dec
2025; tested with Ray 2.60; no home-made token budget on top). Models load inside each replica from the
allow-list only.

Ray Serve's HTTP proxy spreads requests over the replicas (power of two choices on queue length);
``max_queue`` (429) and ``/metrics`` are per replica. The app's guard (auth, header count and size,
body size and time limits) runs in each replica; the connection-level limits of ``refmodel serve``
(the request-head deadline, h11's bounded head buffer, ``--keep-alive-timeout-s``) are those of Ray's
own proxy here, which also receives a body before the replica's guard can refuse it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import SecretStr

from .._optional import install_command, require
from ..cluster import RayConnection, connect_ray, ray_address
from ..errors import ConfigError, MissingDependency
from .batcher import Failed, LocalBatcher, check_admission, drain_seconds, run_per_request
from .settings import ServeSettings

log = logging.getLogger(__name__)
APP_NAME = "refmodel"


def _require_serve():
    """``ray.serve`` with the two features this module relies on, else MissingDependency."""
    serve = require("ray.serve", "ray")
    if "batch_size_fn" not in inspect.signature(serve.batch).parameters:
        import ray

        raise MissingDependency(f"refmodel serve --ray needs a Ray whose serve.batch takes batch_size_fn "
                                f"(ray PR #59059, releases after Dec 2025; tested with 2.60), but ray "
                                f"{ray.__version__} is installed: {install_command('ray')} --upgrade")
    return serve


class _Queued(NamedTuple):
    """A sequence in Ray's batch queue, with the request it belongs to (for the per-request retry)."""

    owner: object
    seq: Any  # a refmodel.serve.validate.Sequence


def padded_tokens(items: list) -> int:
    """Ray's batch size of a list of :class:`~refmodel.serve.validate.Sequence` (or of the ``_Queued``
    sequences :class:`RayBatcher` hands to Ray): rows x longest row."""
    seqs = [item.seq if isinstance(item, _Queued) else item for item in items]
    return len(seqs) * max((s.ids.numel() for s in seqs), default=0)


class RayBatcher:
    """The :class:`~refmodel.serve.batcher.Batcher` protocol on top of ``ray.serve.batch``.

    ``submit`` admits a request's sequences (429 past ``max_queue``, 503 once stopped) and awaits one
    ``@serve.batch`` call per sequence; Ray merges the sequences of all concurrent requests of this
    replica into batches of at most ``max_batch_tokens`` padded tokens, waiting at most ``max_wait_s``
    for company. ``run_batch`` runs in ``executor`` so the replica's event loop keeps serving.
    """

    def __init__(self, name: str, run_batch: Callable[[list], Sequence], executor: Executor, *,
                 max_batch_tokens: int, max_wait_s: float, max_queue: int, batching: bool = True,
                 observe: Callable[[int, int, float], None] | None = None,
                 on_depth: Callable[[int], None] | None = None):
        serve = _require_serve()
        self.name = name
        self._run_batch = run_batch
        self._executor = executor
        self.max_queue = max_queue
        self.batching = batching
        self._observe = observe
        self._on_depth = on_depth
        self._admitted = 0
        self._queued_tokens = 0
        self._recent_tokens_per_s = 0.0
        self._running = False

        async def refmodel_token_batch(items: list) -> list:
            # items: (request id, sequence); a failed merged batch reruns request by request
            return await self._run([item.seq for item in items], [item.owner for item in items])

        # Ray reorders a sequence that does not fit behind later arrivals (FIFO otherwise); results
        # do not depend on it because every sequence scores the same in any batch.
        self._batched = serve.batch(max_batch_size=max_batch_tokens, batch_wait_timeout_s=max_wait_s,
                                    batch_size_fn=padded_tokens)(refmodel_token_batch)

    @property
    def depth(self) -> int:
        """Sequences admitted and not yet answered (this replica)."""
        return self._admitted

    def start(self) -> None:
        self._running = True

    async def stop(self) -> None:
        """Refuse new requests; Ray has drained the in-flight ones before the app's lifespan ends."""
        self._running = False

    def retry_after_s(self) -> int:
        """Seconds to drain what is admitted at the recent token rate (1..30)."""
        return drain_seconds(self._queued_tokens, self._recent_tokens_per_s)

    async def submit(self, payloads: list, tokens: list[int]) -> list:
        """Admit one request's sequences and await their results, in order."""
        check_admission(self.name, self._running, self._admitted, len(payloads), self.max_queue,
                        where=" on this replica")
        total = sum(tokens)
        self._set_admitted(self._admitted + len(payloads), total)
        try:
            if not self.batching:  # baseline: the request is its own batch
                results = await self._run(list(payloads), [0] * len(payloads))
            else:
                owner = object()
                results = list(await asyncio.gather(*(self._batched(_Queued(owner, p)) for p in payloads)))
        finally:
            self._set_admitted(self._admitted - len(payloads), -total)
        for result in results:
            if isinstance(result, Failed):
                raise result.error
        return results

    def _set_admitted(self, value: int, tokens: int) -> None:
        self._admitted = value
        self._queued_tokens += tokens
        if self._on_depth is not None:
            self._on_depth(value)

    async def _run(self, payloads: list, owners: list) -> list:
        start = time.perf_counter()
        results = await asyncio.get_running_loop().run_in_executor(
            self._executor, run_per_request, self._run_batch, payloads, owners, self.name)
        seconds = time.perf_counter() - start
        tokens = sum(p.ids.numel() for p in payloads)
        self._recent_tokens_per_s = tokens / seconds if seconds > 0 else 0.0
        if self._observe is not None:
            self._observe(len(payloads), tokens, seconds)
        return list(results)


class ReferenceReplica:
    """One Ray Serve replica: loads the allow-listed models, then serves the shared FastAPI app."""

    def __init__(self, settings: ServeSettings, serve_batch: bool = True):
        self.batcher_cls = RayBatcher if serve_batch else LocalBatcher
        if settings.torch_threads is not None:
            import torch

            torch.set_num_threads(settings.torch_threads)
        from .main import load_all

        self.settings = settings
        self.cache, self.served = load_all(settings)  # the cache keeps its models pinned while serving
        log.info("replica ready: %s", sorted(self.served))

    def __serve_build_asgi_app__(self):
        from .app import create_app

        app = create_app(self.settings, self.served, batcher_cls=self.batcher_cls)
        app.state.refmodel.cache = self.cache
        return app


def _replica_settings(settings: ServeSettings) -> ServeSettings:
    """Settings for the replicas: the token read here, so replicas on other nodes need no token file."""
    token = settings.bearer_token()
    return settings.model_copy(update={"token": None if token is None else SecretStr(token), "token_file": None})


def build_application(settings: ServeSettings, *, replicas: int = 1, num_cpus: float = 1.0,
                      num_gpus: float | None = None, max_ongoing_requests: int | None = None,
                      serve_batch: bool = True):
    """The bound Ray Serve application (pass to ``serve.run``).

    ``serve_batch=False`` merges requests with refmodel's own :class:`LocalBatcher` instead of
    ``@serve.batch`` (same token budget; it closes a batch when the model becomes free rather than
    ``max_wait_ms`` after the batch's first arrival, which gives larger batches under load).

    ``num_cpus``/``num_gpus`` are each replica's Ray resources (``num_gpus`` defaults to 1 when
    ``settings.device`` is CUDA, else 0). ``max_ongoing_requests`` (HTTP requests per replica) defaults
    to ``max_queue`` so that a full queue answers 429 here instead of waiting unseen in Ray's router.
    """
    serve = _require_serve()
    if not settings.models and not settings.reward_models:
        raise ConfigError("nothing to serve: give at least one --model NAME=PATH or --reward-model NAME=PATH")
    if replicas < 1:
        raise ConfigError(f"replicas must be >= 1, got {replicas}")
    if num_gpus is None:
        num_gpus = 1.0 if settings.device.startswith("cuda") else 0.0
    deployment = serve.deployment(
        name="ReferenceService", num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=max_ongoing_requests or settings.max_queue,
        graceful_shutdown_timeout_s=settings.shutdown_timeout_s,
        max_constructor_retry_count=3,
    )(serve.ingress()(ReferenceReplica))
    return deployment.bind(_replica_settings(settings), serve_batch)


def deploy(settings: ServeSettings, *, name: str = APP_NAME, **options):
    """Deploy on the connected Ray cluster (Serve already started); returns the deployment handle.

    Blocks until every replica has loaded its models. ``options`` go to :func:`build_application`.
    """
    serve = require("ray.serve", "ray")
    app = build_application(settings, **options)
    try:
        return serve.run(app, name=name, route_prefix="/")
    except RuntimeError as exc:  # a replica could not start: bad model path, out of memory, ...
        raise ConfigError(f"the Ray Serve deployment {name!r} failed to start: {exc}") from exc


def run_ray_server(settings: ServeSettings, *, replicas: int = 1, address: str | None = None,
                   num_cpus: float = 1.0, num_gpus: float | None = None) -> None:
    """Serve on Ray until SIGINT/SIGTERM (blocking), then shut the deployment down.

    Connects by :func:`refmodel.cluster.connect_ray` (the rule ``precompute --ray`` uses): ``address``
    (``ray://host:10001``, ``host:6379`` or ``auto``), else ``RAY_ADDRESS``, else a new local cluster. On
    a local cluster Serve and Ray are stopped at the end; on a shared one only this application is
    deleted, leaving the cluster's other Serve applications alone. Model paths must exist on every node.
    """
    serve = require("ray.serve", "ray")
    settings.check_exposure()
    if ray_address(address) is None:  # a local cluster: the folders must be here (checked before Ray starts)
        missing = [p for p in {**settings.models, **settings.reward_models}.values() if not Path(p).is_dir()]
        if missing:
            raise ConfigError(f"model folder(s) not found: {missing}; --model takes NAME=LOCAL_FOLDER")
    connection = connect_ray(address)
    try:
        _serve_until_stopped(serve, connection, settings, replicas=replicas, num_cpus=num_cpus, num_gpus=num_gpus)
    finally:
        connection.close()
    log.info("reference service on Ray stopped")


def _serve_until_stopped(serve, connection: RayConnection, settings: ServeSettings, *, replicas: int,
                         num_cpus: float, num_gpus: float | None) -> None:
    if connection.local:
        # a local cluster cannot grow: shrink each replica's CPU share so that all of them get placed
        num_cpus = min(num_cpus, connection.ray.cluster_resources().get("CPU", 1.0) / replicas)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        deploy(settings, replicas=replicas, num_cpus=num_cpus, num_gpus=num_gpus)
        log.info("refmodel serve --ray on http://%s:%d: %d replica(s) of %s (auth %s)", settings.host,
                 settings.port, replicas, sorted({**settings.models, **settings.reward_models}),
                 "on" if settings.bearer_token() else "off")
        stop.wait()
        log.info("stopping: draining in-flight requests")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if connection.local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)


def serve_from_flags(models: tuple[str, ...], reward_models: tuple[str, ...], *, replicas: int = 1,
                     ray_address: str | None = None, **flags) -> None:
    """``refmodel serve --ray``: settings from flags/environment, then :func:`run_ray_server`."""
    from .main import settings_from_flags

    settings = settings_from_flags(models, reward_models, **flags)
    run_ray_server(settings, replicas=replicas, address=ray_address)


__all__ = ["RayBatcher", "ReferenceReplica", "build_application", "deploy", "padded_tokens", "run_ray_server",
           "serve_from_flags"]
