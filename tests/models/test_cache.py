"""ReferenceModelCache: single flight, LRU by count and bytes, eviction, failures, pinning, idle timeout."""

from __future__ import annotations

import gc
import shutil
import threading
import time
import weakref

import pytest
import torch

from refmodel import (
    ReferenceModelCache,
    RefModelError,
    fingerprint,
    get_global_reference_cache,
    model_logprobs,
)
from refmodel.errors import ConfigError, ModelNotAllowed
from refmodel.models.cache import ModelRegistry, load_reference_model
from refmodel.models.quantize import model_nbytes
from refmodel.testing import load_tiny, make_tiny_model


class CountingLoader:
    """Wraps the real loader: counts calls per path and can hold each load open for ``delay`` s."""

    def __init__(self, delay: float = 0.0, on_start=None):
        self.calls: list[str] = []
        self.delay, self.on_start = delay, on_start
        self._lock = threading.Lock()

    def __call__(self, path, **kwargs):
        with self._lock:
            self.calls.append(str(path))
        if self.on_start:
            self.on_start(str(path))
        model = load_reference_model(path, **kwargs)
        time.sleep(self.delay)
        return model


@pytest.fixture
def registry(tiny_model_dirs) -> dict:
    return {name: str(path) for name, path in tiny_model_dirs.items()}


def make_cache(registry, loader=None, **kwargs) -> ReferenceModelCache:
    cache = ReferenceModelCache(registry=registry, **kwargs)
    if loader is not None:
        cache.loader = loader
    return cache


def run_threads(n, fn):
    barrier, results, errors = threading.Barrier(n), [None] * n, [None] * n

    def work(i):
        barrier.wait()
        try:
            results[i] = fn()
        except BaseException as exc:
            errors[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results, errors


def test_sixteen_threads_one_missing_name_load_once(registry):
    loader = CountingLoader(delay=0.2)  # keeps the load open so all threads pile onto it
    cache = make_cache(registry, loader)
    results, errors = run_threads(16, lambda: cache.get_or_load("llama"))
    assert errors == [None] * 16
    assert len(loader.calls) == 1
    assert all(m is results[0] for m in results)
    info = cache.get_cache_info()
    assert info["loads"] == 1 and info["num_models"] == 1 and info["hits"] + info["misses"] == 16
    assert not results[0].training and not any(p.requires_grad for p in results[0].parameters())


def test_different_models_load_in_parallel(registry):
    names = ("llama", "gpt2", "gemma2")
    started = {name: threading.Event() for name in names}
    overlapped = {}

    def on_start(path):
        name = next(n for n in names if path.endswith(n))
        started[name].set()
        # true only if every other load has started while this one is still open
        overlapped[name] = all(started[o].wait(timeout=10) for o in names if o != name)

    cache = make_cache(registry, CountingLoader(on_start=on_start), max_models=3)
    results = {}
    threads = [threading.Thread(target=lambda n=n: results.update({n: cache.get_or_load(n)})) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert overlapped == dict.fromkeys(names, True)
    # Regression: concurrent from_pretrained in transformers 5.23 once left tied heads randomly
    # initialized. Loads in parallel must give exactly the weights of a sequential load.
    for name in names:
        model, _ = load_tiny(registry[name])
        head, embed = results[name].get_output_embeddings(), results[name].get_input_embeddings()
        assert (head.weight is embed.weight) == (model.get_output_embeddings().weight is model.get_input_embeddings().weight)
        assert fingerprint(results[name]) == fingerprint(model)


def test_lru_order_by_count(registry):
    cache = make_cache(registry, max_models=2)
    a = cache.get_or_load("llama")
    cache.get_or_load("gpt2")
    assert cache.get_or_load("llama") is a  # hit: llama becomes most recent
    cache.get_or_load("gemma2")  # evicts the least recent: gpt2
    assert cache.contains("llama") and cache.contains("gemma2") and not cache.contains("gpt2")
    info = cache.get_cache_info()
    assert [m["name"] for m in info["models"]] == ["llama", "gemma2"]
    assert (info["hits"], info["misses"], info["evictions"], info["num_models"]) == (1, 3, 1, 2)


def test_quantization_mode_is_part_of_the_key(registry):
    pytest.importorskip("torchao")  # the quant extra
    cache = make_cache(registry, max_models=3)
    full = cache.get_or_load("llama")
    q8 = cache.get_or_load("llama", quantize="int8")
    assert full is not q8 and cache.get_or_load("llama", quantize=True) is q8
    assert cache.contains("llama") and cache.contains("llama", quantize="int8")
    assert not cache.contains("llama", load_in_4bit=True)
    sizes = {m["quantize"]: m["bytes"] for m in cache.get_cache_info()["models"]}
    assert sizes["int8"] < 0.5 * sizes[None]
    with pytest.raises(ConfigError, match="unknown quantize"):
        cache.get_or_load("llama", quantize="int3")


def test_byte_budget(registry):
    sizes = {n: model_nbytes(load_reference_model(p)) for n, p in registry.items()}
    budget = sizes["llama"] + sizes["gemma2"] - 1  # both fp32 models do not fit together
    cache = make_cache(registry, max_models=5, max_bytes=budget)
    cache.get_or_load("llama")
    cache.get_or_load("gemma2")
    info = cache.get_cache_info()
    assert [m["name"] for m in info["models"]] == ["gemma2"] and info["bytes"] == sizes["gemma2"]
    # a model larger than the whole budget is refused, and not cached
    small = make_cache(registry, max_bytes=sizes["gpt2"] // 2)
    with pytest.raises(ConfigError, match="more than the cache's max_bytes"):
        small.get_or_load("gpt2")
    assert small.get_cache_info()["num_models"] == 0


def test_byte_budget_counts_quantized_bytes(registry):
    pytest.importorskip("torchao")  # the quant extra
    sizes = {n: model_nbytes(load_reference_model(registry[n])) for n in ("llama", "gemma2")}
    budget = sizes["llama"] + sizes["gemma2"] - 1  # both fp32 models do not fit together; both int8 ones do
    cache = make_cache(registry, max_models=5, max_bytes=budget)
    cache.get_or_load("llama", quantize="int8")
    cache.get_or_load("gemma2", quantize="int8")
    info = cache.get_cache_info()
    assert info["num_models"] == 2 and info["bytes"] <= budget


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def test_eviction_frees_memory(tmp_path):
    # A model big enough (~50 MB of fp32 weights) that its pages show in RSS. transformers maps the
    # safetensors file, so pages become resident when touched: touch every weight after loading.
    big = make_tiny_model("llama", tmp_path / "big", hidden_size=256, intermediate_size=8192)
    small = make_tiny_model("gpt2", tmp_path / "small")
    cache = make_cache({"big": big, "small": small}, max_models=1)
    cache.get_or_load("small")
    cache.remove("small")  # remove() also trims the heap: a clean baseline
    base = _rss()
    model = cache.get_or_load("big")
    ref = weakref.ref(model)
    assert float(sum(p.double().sum() for p in model.parameters())) != 0.0
    nbytes = cache.get_cache_info()["bytes"]
    assert nbytes > 40e6
    del model
    loaded = _rss()
    cache.get_or_load("small")  # evicts big
    evicted = _rss()
    assert ref() is None, "the evicted model is still referenced somewhere"
    info = cache.get_cache_info()
    assert info["evictions"] == 1 and info["bytes"] < nbytes / 10
    # Measured: +52 MB on load, -50 MB on eviction for 50.9 MB of weights; half is a safe floor.
    assert loaded - base > nbytes / 2, f"loading only grew RSS by {(loaded - base) / 1e6:.1f} MB"
    assert loaded - evicted > nbytes / 2, f"eviction only shrank RSS by {(loaded - evicted) / 1e6:.1f} MB"


def test_failed_load_not_cached_and_error_reaches_all_waiters(tmp_path, tiny_model_dirs):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dirs["llama"], broken)
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    loader = CountingLoader(delay=0.0, on_start=lambda path: time.sleep(0.2))
    cache = make_cache({"broken": broken}, loader)
    _, errors = run_threads(8, lambda: cache.get_or_load("broken"))
    assert len(loader.calls) == 1
    assert all(isinstance(e, RefModelError) for e in errors)
    assert all(e is errors[0] for e in errors), "every waiter must see the loader's exception"
    assert "could not load reference model 'broken'" in str(errors[0])
    assert not cache.contains("broken") and cache.get_cache_info()["load_failures"] == 1
    # not cached: after the file is repaired the next call loads it
    shutil.copy(tiny_model_dirs["llama"] / "model.safetensors", broken / "model.safetensors")
    assert cache.get_or_load("broken") is not None and len(loader.calls) == 2


def test_unknown_names_and_paths_refused(registry, tiny_model_dirs):
    loader = CountingLoader()
    cache = make_cache(registry, loader)
    for name in ("nope", str(tiny_model_dirs["llama"]), "meta-llama/Llama-3-8B"):
        with pytest.raises(ModelNotAllowed, match=r"not in the registry; known models: \['gemma2', 'gpt2', 'llama'\]"):
            cache.get_or_load(name)
    with pytest.raises(ModelNotAllowed):
        cache.preload(["llama", "nope"])  # fails before loading anything
    assert loader.calls == [] and not cache.contains("nope")


def test_pickle_weights_refused(tmp_path, tiny_model_dirs):
    only_bin = tmp_path / "bin"
    shutil.copytree(tiny_model_dirs["gpt2"], only_bin)
    (only_bin / "model.safetensors").rename(only_bin / "pytorch_model.bin")
    with pytest.raises(ModelNotAllowed, match=r"no \*.safetensors weights.*pytorch_model.bin"):
        load_reference_model(only_bin)


def test_pinned_model_not_evicted_while_in_use(registry):
    cache = make_cache(registry, max_models=1)
    ids = torch.randint(4, 60, (2, 9))
    with cache.use("llama") as model:
        ref = weakref.ref(model)
        before = model_logprobs(model, ids)
        cache.get_or_load("gpt2")  # would evict llama, but it is pinned: deferred
        assert cache.contains("llama") and cache.get_cache_info()["models"][0]["pinned"]
        cache.remove("llama")  # even an explicit remove only drops the cache's reference
        torch.testing.assert_close(model_logprobs(model, ids), before, rtol=0, atol=0)
        del model
    gc.collect()
    assert ref() is None and not cache.contains("llama")
    with cache.use("llama"):
        cache.get_or_load("gpt2")
        assert cache.contains("llama")
    assert not cache.contains("llama") and cache.contains("gpt2")  # the deferred eviction ran on release


def test_idle_timeout_unloads_unused_models(registry):
    cache = make_cache(registry, idle_timeout_s=0.3)
    cache.get_or_load("gpt2")
    with cache.use("llama"):
        deadline = time.monotonic() + 10
        while cache.contains("gpt2") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not cache.contains("gpt2")
        assert cache.contains("llama")  # in use: never idle-unloaded
    deadline = time.monotonic() + 10
    while cache.contains("llama") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not cache.contains("llama") and cache.get_cache_info()["evictions"] == 2
    cache.close()


def test_preload_and_registry_objects(registry):
    reg = ModelRegistry.from_pairs([f"{k}={v}" for k, v in registry.items()])
    cache = ReferenceModelCache(registry=reg, max_models=3)
    cache.preload(["llama", "gpt2"])
    assert cache.get_cache_info()["num_models"] == 2 and cache.contains("gpt2")
    with pytest.raises(ConfigError, match="NAME=PATH"):
        ModelRegistry.from_pairs(["no-equals-sign"])
    with pytest.raises(ConfigError, match="max_models"):
        ReferenceModelCache(max_models=0)


def test_global_cache_is_a_singleton():
    cache = get_global_reference_cache()
    assert get_global_reference_cache() is cache
    with pytest.raises(ConfigError, match="already exists"):
        get_global_reference_cache(max_models=3)
