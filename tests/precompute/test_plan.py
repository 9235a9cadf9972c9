"""plan_precompute: the one planning step of the local and the Ray driver.

The local driver is checked here (the Ray one in test_ray.py, same helper): the store it writes is exactly
the plan (job, fingerprint, dtype, the keys of each shard), and the plan the Ray driver makes from a model
folder equals the one the local driver makes from the loaded model and its tokenizer.
"""

from __future__ import annotations

import numpy as np
import pytest
from precompute_helpers import assert_store_follows_plan

from refmodel import PrecomputeConfig, fingerprint
from refmodel.errors import ConfigError
from refmodel.precompute.job import precompute
from refmodel.precompute.plan import PrecomputePlan, load_scoring_model, plan_precompute
from refmodel.testing import load_tiny, preference_pairs

SETTINGS = {"dtype": "float32", "shard_examples": 7, "max_tokens_per_batch": 200, "max_length": 40}


def test_the_local_store_is_its_plan(tiny_model_dirs, tmp_path):
    model, tok = load_tiny(tiny_model_dirs["llama"])
    pairs = preference_pairs(30, seed=1)
    cfg = PrecomputeConfig(**SETTINGS, progress=False)
    plan = plan_precompute(model, tok, pairs, cfg)
    assert isinstance(plan, PrecomputePlan) and plan.n_shards == 5 and plan.job["shards"] == 5
    assert plan.job["tokenization"] == {"max_length": 40, "truncation_mode": cfg.truncation_mode}
    assert plan.total_tokens == sum(plan.shard_tokens(i) for i in range(plan.n_shards)) > 0
    precompute(model, pairs, tmp_path / "s", cfg, tokenizer=tok).close()
    assert_store_follows_plan(tmp_path / "s", plan)


def test_a_folder_and_a_loaded_model_plan_the_same(tiny_model_dirs):
    """What the Ray driver plans from the folder path == what the local driver plans from loaded objects."""
    folder = tiny_model_dirs["llama"]
    pairs = preference_pairs(20, seed=2)
    cfg = PrecomputeConfig(**SETTINGS, temperature=0.7)
    from_folder = plan_precompute(*load_scoring_model(str(folder)), pairs, cfg)
    from_loaded = plan_precompute(*load_tiny(folder), pairs, cfg)
    assert from_folder == from_loaded
    assert from_folder.fingerprint == fingerprint(load_tiny(folder)[0], temperature=0.7) != fingerprint(load_tiny(folder)[0])
    other = plan_precompute(*load_tiny(folder), pairs, cfg.with_overrides(shard_examples=3))
    assert other.job["plan_blake2b"] != from_folder.job["plan_blake2b"]


def test_open_store_resumes_only_its_own_job(tiny_model_dirs, tmp_path):
    model, tok = load_tiny(tiny_model_dirs["llama"])
    pairs = preference_pairs(16, seed=3)
    cfg = PrecomputeConfig(**SETTINGS, progress=False)
    precompute(model, pairs, tmp_path / "s", cfg, tokenizer=tok).close()
    store, todo = plan_precompute(model, tok, pairs, cfg.with_overrides(resume=True)).open_store(tmp_path / "s")
    store.close()
    assert todo == []
    with pytest.raises(ConfigError, match="pass resume=True"):
        plan_precompute(model, tok, pairs, cfg).open_store(tmp_path / "s")
    with pytest.raises(ConfigError, match="another job"):
        plan_precompute(model, tok, pairs[:8], cfg.with_overrides(resume=True)).open_store(tmp_path / "s")


# ---------------------------------------------------------------- streaming in windows (issue 27)
WINDOW = 6


class GeneratedPairs:
    """A dataset of ``n`` pre-tokenized records made on the fly each time it is iterated (nothing held); it and
    the test's tokenizer hook note the most tokenized examples alive at once (``alive``: a WeakSet)."""

    def __init__(self, n: int, alive):
        self.n, self.alive, self.most_alive = n, alive, 0

    def __iter__(self):
        for i in range(self.n):
            self.most_alive = max(self.most_alive, len(self.alive))
            yield _record(i)


def _record(i: int) -> dict:
    if i % 17 == 5:  # a repeat of an earlier record (in an earlier window, or in the same one)
        return _record(i - 5 if i % 2 else i - 1)
    if i == 9:  # chosen and rejected differ at their first token: no shared prompt, one unit per completion
        return {"prompt_ids": [], "chosen_ids": [5, 6, 7], "rejected_ids": [8, 9]}
    if i == 13:  # the prompt alone fills max_length: dropped, as TRL drops it
        return {"prompt_ids": list(range(4, 40)), "chosen_ids": [5], "rejected_ids": [6]}
    n = 3 + (i * 7) % 11
    return {"prompt_ids": [4 + (i + j) % 50 for j in range(n)], "chosen_ids": [10 + i % 40] * (1 + i % 5),
            "rejected_ids": [11 + i % 30, 12] + [13] * (i % 4)}


def _reference_shards(examples, settings: dict, *, windowed: bool):
    """The plan by the book, holding everything: every distinct sequence once (first occurrence, in record
    order), grouped by prompt, sorted by (completions, length, key). Version 2 (``windowed``) sorts and cuts
    per window of ``shard_examples`` records; version 1 sorted the whole data and cut every
    ``shard_examples`` units."""
    from refmodel.precompute.windows import Unit
    from refmodel.store.format import key_bytes

    size = settings["shard_examples"]
    seen, groups = set(), {}
    for index, ex in examples:
        rows = list(zip(ex.completions, ex.completion_masks, strict=True))
        split = [(ex.prompt_ids, rows)] if ex.prompt_ids else [(c[:1], [(c[1:], m[1:])]) for c, m in rows]
        for prompt, group in split:
            kept = [(c, m, key_bytes(np.asarray(prompt + c))) for c, m in group if c]
            kept = [(c, m, k) for c, m, k in kept if not (k in seen or seen.add(k))]
            if kept:
                groups.setdefault(index // size if windowed else 0, []).append(
                    Unit(prompt, tuple(c for c, _, _ in kept), tuple(m for _, m, _ in kept), tuple(k for *_, k in kept)))
    order = lambda u: (len(u.completions), len(u.prompt) + max(map(len, u.completions)), u.keys[0])  # noqa: E731
    if windowed:
        return [sorted(groups[w], key=order) for w in sorted(groups)]
    units = sorted(groups.get(0, []), key=order)
    return [units[i:i + size] for i in range(0, len(units), size)]


def _write_reference(model, tok, shards, job, out, settings) -> None:
    from refmodel.data import pad_id_of
    from refmodel.precompute.job import score_units
    from refmodel.precompute.windows import plan_batches
    from refmodel.store import LogprobStore
    from refmodel.store.manifest import shard_name

    store = LogprobStore.create(out, fingerprint(model), dtype=settings["dtype"])
    store.set_job(job)
    for i, units in enumerate(shards):
        entries = [e for batch in plan_batches(units, settings["max_tokens_per_batch"])
                   for e in score_units(model, batch, pad_id=pad_id_of(tok))]
        store.write_shard(shard_name(i), entries)
    store.close()


def _files(path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != "writer.lock"}


def test_the_planner_holds_one_window_of_examples_and_writes_the_reference_store(tiny_model_dirs, tmp_path,
                                                                                  monkeypatch):
    """A generated dataset of 60 records in windows of 6: at no point are more than a window's tokenized
    examples alive (the plan's pass and the scoring pass), and the store is byte for byte the one the
    plan-by-the-book reference writes from everything held in memory (repeats across and inside windows,
    a prompt-less record and a dropped one included)."""
    import weakref

    from refmodel.data import iter_examples
    from refmodel.data import tokenize as tokenize_module

    alive = weakref.WeakSet()
    real = tokenize_module.tokenize_record

    def counted(*args, **kwargs):  # the real rule; each example it makes is noted while it lives
        ex = real(*args, **kwargs)
        if ex is not None:
            alive.add(ex)
            data.most_alive = max(data.most_alive, len(alive))
        return ex

    monkeypatch.setattr(tokenize_module, "tokenize_record", counted)
    model, tok = load_tiny(tiny_model_dirs["llama"])
    settings = {"dtype": "float32", "shard_examples": WINDOW, "max_tokens_per_batch": 64, "max_length": 30}
    data = GeneratedPairs(60, alive)
    store = precompute(model, data, tmp_path / "s", tokenizer=tok, progress=False, **settings)
    store.close()
    assert 0 < data.most_alive <= WINDOW + 1, data.most_alive  # the window being planned + the record just read
    plan = plan_precompute(model, tok, data, PrecomputeConfig(**settings))
    assert plan.job["plan_version"] == 2 and plan.n_shards == 10
    assert_store_follows_plan(tmp_path / "s", plan)

    monkeypatch.setattr(tokenize_module, "tokenize_record", real)
    examples = list(iter_examples([_record(i) for i in range(60)], max_length=30))
    assert len(examples) == 59  # record 13 dropped
    _write_reference(model, tok, _reference_shards(examples, settings, windowed=True), plan.job, tmp_path / "ref",
                     settings)
    assert _files(tmp_path / "s") == _files(tmp_path / "ref")


def test_one_window_writes_the_version_1_shards(tiny_model_dirs, tmp_path):
    """Data within one window: the shard bytes of version 1's whole-data sort (the manifest's job differs
    only by its plan_version)."""
    import json

    from refmodel.data import iter_examples

    model, tok = load_tiny(tiny_model_dirs["llama"])
    settings = {"dtype": "float32", "shard_examples": 64, "max_tokens_per_batch": 64, "max_length": 30}
    records = [_record(i) for i in range(40)]
    precompute(model, records, tmp_path / "s", tokenizer=tok, progress=False, **settings).close()
    job = json.loads((tmp_path / "s" / "manifest.json").read_text())["job"]
    v1_job = {k: v for k, v in job.items() if k != "plan_version"}
    examples = list(iter_examples(records, max_length=30))
    _write_reference(model, tok, _reference_shards(examples, settings, windowed=False), v1_job, tmp_path / "v1",
                     settings)
    new, old = _files(tmp_path / "s"), _files(tmp_path / "v1")
    assert new.keys() == old.keys() == {"manifest.json", "shard-00000.safetensors"}
    assert new["shard-00000.safetensors"] == old["shard-00000.safetensors"]
    manifest = json.loads(old["manifest.json"])
    manifest["job"]["plan_version"] = 2
    assert json.loads(new["manifest.json"]) == manifest


def test_a_version_1_store_is_not_resumed_and_changed_data_is_caught(tiny_model_dirs, tmp_path):
    import json

    from refmodel.errors import DataFormatError

    model, tok = load_tiny(tiny_model_dirs["llama"])
    pairs = preference_pairs(16, seed=3)
    cfg = PrecomputeConfig(**SETTINGS, progress=False)
    precompute(model, pairs, tmp_path / "s", cfg, tokenizer=tok).close()
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    del manifest["job"]["plan_version"]  # as refmodel before issue 27 wrote it
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    with pytest.raises(ConfigError, match="shard layout version 1 .* cannot be resumed"):
        precompute(model, pairs, tmp_path / "s", cfg, tokenizer=tok, resume=True)

    plan = plan_precompute(model, tok, pairs, cfg)
    pairs[9] = dict(pairs[9], chosen=pairs[9]["chosen"] + " again")  # the data changes after the plan read it
    assert len(plan.shard(0)) == 7
    with pytest.raises(DataFormatError, match=r"records 7\.\.13 \(shard 1\) read back other sequences"):
        list(plan.iter_shards([0, 1, 2]))
    del pairs[14:]  # ... or loses its last window
    with pytest.raises(DataFormatError, match=r"no records left for shard\(s\) \[2\]"):
        list(plan.iter_shards([2]))


def test_a_one_shot_generator_is_read_once_into_records(tiny_model_dirs, tmp_path):
    model, tok = load_tiny(tiny_model_dirs["llama"])
    pairs = preference_pairs(10, seed=5)
    store = precompute(model, (p for p in pairs), tmp_path / "g", tokenizer=tok, progress=False, **SETTINGS)
    assert len(store) == len(precompute(model, pairs, tmp_path / "l", tokenizer=tok, progress=False, **SETTINGS))
