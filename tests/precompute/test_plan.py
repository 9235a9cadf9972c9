"""plan_precompute: the one planning step of the local and the Ray driver.

The local driver is checked here (the Ray one in test_ray.py, same helper): the store it writes is exactly
the plan (job, fingerprint, dtype, the keys of each shard), and the plan the Ray driver makes from a model
folder equals the one the local driver makes from the loaded model and its tokenizer.
"""

from __future__ import annotations

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
