"""An in-process LRU cache of frozen reference models (by count and by bytes), with single-flight loads.

Models are named, never given as paths: a :class:`ModelRegistry` (or a plain ``{name: path}`` dict)
is the allow-list, and :func:`load_reference_model` reads only local safetensors weights with
``trust_remote_code=False``. The cache key is ``(name, quantization mode)``.

Concurrency follows the double-checked, per-key "single flight" pattern (as in Ray Serve's
multiplexer, but with one in-flight future per key instead of one global load lock, so different
models load in parallel): the first caller of a missing key loads it outside the lock, later callers
wait on its future; a failed load is not cached and its exception is raised in every waiter.
``cache.use(name)`` pins a model: eviction skips pinned entries and catches up on release.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, RefModelError
from .loading import ModelRegistry, as_registry, load_reference_model
from .quantize import QUANT_MODES, model_nbytes

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    model: nn.Module
    nbytes: int
    last_used: float
    pins: int = 0


@dataclass
class _Stats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    loads: int = 0
    load_failures: int = 0
    inflight: dict = field(default_factory=dict)


Key = tuple[str, str | None]


class ReferenceModelCache:
    """LRU cache of frozen reference models by count and by bytes (see module docstring).

    Args:
        max_models: most models held at once (>= 1).
        max_bytes: most parameter + buffer bytes held (quantized sizes when quantized); ``None``: no limit.
        quantize_by_default: mode used when ``get_or_load(quantize=None)``: ``False``/``None`` (float),
            ``True`` (``"int8"``) or a mode name.
        device: where models are loaded; registry: ``{name: path}`` or a :class:`ModelRegistry`.
        idle_timeout_s: unload a model unused (and unpinned) for this long; ``None``: never.
    """

    def __init__(self, max_models: int = 2, max_bytes: int | None = None, quantize_by_default=False,
                 device: str | torch.device = "cpu", registry=None, idle_timeout_s: float | None = None):
        if not isinstance(max_models, int) or max_models < 1:
            raise ConfigError(f"max_models must be an integer >= 1, got {max_models!r}")
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes <= 0):
            raise ConfigError(f"max_bytes must be a positive integer or None, got {max_bytes!r}")
        if idle_timeout_s is not None and idle_timeout_s <= 0:
            raise ConfigError(f"idle_timeout_s must be > 0 or None, got {idle_timeout_s!r}")
        self.max_models, self.max_bytes, self.idle_timeout_s = max_models, max_bytes, idle_timeout_s
        self.device = torch.device(device)
        self.default_mode = self._mode(quantize_by_default, False, default=None)
        self.registry = as_registry(registry)
        self.loader = load_reference_model  # replaceable, e.g. to count or instrument loads
        self._lock = threading.RLock()
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._stats = _Stats()
        self._stop = threading.Event()
        if idle_timeout_s is not None:
            threading.Thread(target=_idle_sweeper, args=(weakref.ref(self), self._stop, idle_timeout_s),
                             name="refmodel-cache-idle", daemon=True).start()

    # ----------------------------------------------------------------------------------- lookups
    @staticmethod
    def _mode(quantize, load_in_4bit: bool, default) -> str | None:
        if load_in_4bit:
            if quantize not in (None, True, "bnb-nf4"):
                raise ConfigError(f"load_in_4bit=True conflicts with quantize={quantize!r}")
            return "bnb-nf4"
        if quantize is None:
            return default
        if quantize is False:
            return None
        if quantize is True:
            return "int8"
        if quantize not in QUANT_MODES:
            raise ConfigError(f"unknown quantize={quantize!r}; expected None, True, False or one of {QUANT_MODES}")
        return quantize

    def _key(self, name: str, quantize=None, load_in_4bit: bool = False) -> Key:
        self.registry.resolve(name)  # ModelNotAllowed for unknown names, before anything else
        return name, self._mode(quantize, load_in_4bit, self.default_mode)

    def get_or_load(self, name: str, quantize=None, load_in_4bit: bool = False) -> nn.Module:
        """The model registered as ``name`` (loaded once, however many threads ask), in eval mode.

        ``quantize``: ``None`` (the cache's default), ``False``, ``True`` (int8) or a mode name;
        ``load_in_4bit=True`` means bitsandbytes NF4. Raises :class:`ModelNotAllowed` for unknown names.
        """
        return self._acquire(self._key(name, quantize, load_in_4bit), pin=False)

    @contextlib.contextmanager
    def use(self, name: str, quantize=None, load_in_4bit: bool = False) -> Iterator[nn.Module]:
        """``with cache.use(name) as model:`` the model is pinned (never evicted) inside the block."""
        key = self._key(name, quantize, load_in_4bit)
        model = self._acquire(key, pin=True)
        try:
            yield model
        finally:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None and entry.model is model:
                    entry.pins -= 1
                    entry.last_used = time.monotonic()
                evicted = self._enforce_budget()
            del model
            self._release(evicted)

    def _acquire(self, key: Key, pin: bool) -> nn.Module:
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._stats.hits += 1
                    self._entries.move_to_end(key)
                    entry.last_used = time.monotonic()
                    entry.pins += pin
                    return entry.model
                self._stats.misses += 1
                future = self._stats.inflight.get(key)
                owner = future is None
                if future is None:
                    future = self._stats.inflight[key] = Future()
                    evicted = self._make_room(extra=1)  # evict before loading: peak <= max_models
            if owner:
                self._release(evicted)
                return self._load(key, future, pin)
            model = future.result()  # raises the loader's exception in every waiter
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None and entry.model is model:
                    self._entries.move_to_end(key)
                    entry.last_used = time.monotonic()
                    entry.pins += pin
                    return model
            # evicted between the load and this waiter waking up: try again

    def _load(self, key: Key, future: Future, pin: bool) -> nn.Module:
        name, mode = key
        path = self.registry.resolve(name)
        start = time.perf_counter()
        try:
            model = self.loader(path, device=self.device, quantize=mode)
            nbytes = model_nbytes(model)
            if self.max_bytes is not None and nbytes > self.max_bytes:
                raise ConfigError(f"model {name!r} (quantize={mode}) needs {nbytes} bytes, more than the "
                                  f"cache's max_bytes={self.max_bytes}; raise max_bytes or quantize it")
        except BaseException as exc:
            error = exc
            if not isinstance(exc, RefModelError) and isinstance(exc, Exception):
                error = RefModelError(f"could not load reference model {name!r} from {str(path)!r}: "
                                      f"{type(exc).__name__}: {exc}")
                error.__cause__ = exc
            with self._lock:
                self._stats.load_failures += 1
                self._stats.inflight.pop(key, None)
            future.set_exception(error)  # every waiter raises this same exception object
            raise error from error.__cause__
        log.info("loaded reference model %r (quantize=%s, %.1f MiB) in %.2fs", name, mode, nbytes / 2**20,
                 time.perf_counter() - start)
        with self._lock:
            self._stats.loads += 1
            self._entries[key] = _Entry(model, nbytes, time.monotonic(), pins=int(pin))
            self._stats.inflight.pop(key, None)
            evicted = self._enforce_budget(protect=key)
        future.set_result(model)
        self._release(evicted)
        return model

    # ---------------------------------------------------------------------------------- eviction
    def _over_budget(self, extra: int = 0) -> bool:
        too_many = len(self._entries) + extra > self.max_models
        too_big = self.max_bytes is not None and sum(e.nbytes for e in self._entries.values()) > self.max_bytes
        return too_many or too_big

    def _make_room(self, extra: int = 0, protect: Key | None = None) -> list[_Entry]:
        """Pop LRU unpinned entries while over budget (caller holds the lock); return them."""
        evicted = []
        while self._over_budget(extra):
            victim = next((k for k, e in self._entries.items() if e.pins == 0 and k != protect), None)
            if victim is None:  # everything left is pinned (or just loaded): deferred until release
                break
            evicted.append(self._entries.pop(victim))
            self._stats.evictions += 1
            log.info("evicting reference model %r (quantize=%s)", *victim)
        return evicted

    def _enforce_budget(self, protect: Key | None = None) -> list[_Entry]:
        return self._make_room(0, protect)

    def _release(self, evicted: list[_Entry]) -> None:
        """Drop the last references of evicted entries and give their memory back (outside the lock)."""
        if not evicted:
            return
        evicted.clear()
        gc.collect()
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()
        _trim_heap()

    def sweep_idle(self) -> int:
        """Unload unpinned models unused for ``idle_timeout_s``; returns how many were unloaded."""
        if self.idle_timeout_s is None:
            return 0
        now = time.monotonic()
        with self._lock:
            stale = [k for k, e in self._entries.items() if e.pins == 0 and now - e.last_used >= self.idle_timeout_s]
            evicted = [self._entries.pop(k) for k in stale]
            self._stats.evictions += len(evicted)
        count = len(evicted)
        if count:
            log.info("unloaded %d idle reference model(s): %s", count, stale)
        self._release(evicted)
        return count

    # ------------------------------------------------------------------------------- management
    def contains(self, name: str, quantize=None, load_in_4bit: bool = False) -> bool:
        """True when ``name`` (in that quantization mode) is loaded now; never loads."""
        if name not in self.registry.names():
            return False
        with self._lock:
            return (name, self._mode(quantize, load_in_4bit, self.default_mode)) in self._entries

    def remove(self, name: str, quantize=None, load_in_4bit: bool = False) -> bool:
        """Unload ``name`` in that mode (every mode with ``quantize="all"``); True if something was removed.

        A pinned model is not torn down under its user: it is dropped from the cache, and the memory
        goes back when the last caller lets go of it.
        """
        with self._lock:
            if quantize == "all":
                keys = [k for k in self._entries if k[0] == name]
            else:
                keys = [k for k in [(name, self._mode(quantize, load_in_4bit, self.default_mode))]
                        if k in self._entries]
            evicted = [self._entries.pop(k) for k in keys]
        self._release(evicted)
        return bool(keys)

    def clear(self) -> None:
        """Unload every model (pinned ones go when their users release them)."""
        with self._lock:
            evicted = list(self._entries.values())
            self._entries.clear()
        self._release(evicted)

    def preload(self, names: Iterable[str], quantize=None, load_in_4bit: bool = False) -> None:
        """Load ``names`` now (e.g. before training starts); unknown names fail before any load."""
        names = list(names)
        for name in names:
            self.registry.resolve(name)
        for name in names:
            self.get_or_load(name, quantize=quantize, load_in_4bit=load_in_4bit)

    def get_cache_info(self) -> dict:
        """``{num_models, max_models, bytes, max_bytes, models, hits, misses, evictions, loads, ...}``."""
        with self._lock:
            models = [{"name": k[0], "quantize": k[1], "bytes": e.nbytes, "pinned": e.pins > 0}
                      for k, e in self._entries.items()]
            s = self._stats
            return {"num_models": len(models), "max_models": self.max_models,
                    "bytes": sum(m["bytes"] for m in models), "max_bytes": self.max_bytes, "models": models,
                    "hits": s.hits, "misses": s.misses, "evictions": s.evictions, "loads": s.loads,
                    "load_failures": s.load_failures, "loading": [list(k) for k in s.inflight]}

    def close(self) -> None:
        """Stop the idle sweeper and unload everything."""
        self._stop.set()
        self.clear()


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise, so RSS would not drop)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None  # libc's malloc_trim, False where there is none, None until looked up


def _idle_sweeper(cache_ref, stop: threading.Event, timeout_s: float) -> None:
    period = min(max(timeout_s / 4, 0.01), 5.0)
    while not stop.wait(period):
        cache = cache_ref()
        if cache is None:
            return
        try:
            cache.sweep_idle()
        except Exception:  # pragma: no cover - a sweeper must never die silently mid-run
            log.exception("idle sweep failed")
        del cache


_GLOBAL: ReferenceModelCache | None = None
_GLOBAL_LOCK = threading.Lock()


def get_global_reference_cache(**kwargs) -> ReferenceModelCache:
    """The process-wide cache (created on first call with ``kwargs``; later calls must pass none).

    Register models with ``get_global_reference_cache().registry.add(name, path)``.
    """
    global _GLOBAL
    with _GLOBAL_LOCK:
        if _GLOBAL is None:
            _GLOBAL = ReferenceModelCache(**kwargs)
        elif kwargs:
            raise ConfigError("the global reference cache already exists; configure it on the first call only "
                              f"(got {sorted(kwargs)})")
        return _GLOBAL


__all__ = ["ModelRegistry", "ReferenceModelCache", "get_global_reference_cache", "load_reference_model"]
