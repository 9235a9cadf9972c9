"""Precomputed: exact float32 sequence sums from a bf16 store, and misses that are never silent."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from refmodel import Frozen, Precomputed, fingerprint, model_logprobs
from refmodel.data import collate, load_examples
from refmodel.precompute.job import precompute
from refmodel.recipes.train import TrainConfig, train
from refmodel.store import LogprobStore
from refmodel.testing import load_tiny, preference_pairs


@pytest.fixture(scope="module")
def setup(tiny_model_dirs, tmp_path_factory):
    model, tok = load_tiny(tiny_model_dirs["llama"])
    rows = preference_pairs(8, seed=11)
    out = tmp_path_factory.mktemp("pre") / "store"
    precompute(model, rows[:4], out, tokenizer=tok, dtype="bfloat16", progress=False)
    seqs = [s for ex in load_examples(rows, tok) for s in ex.sequences()]
    return model, tok, rows, LogprobStore.open(out, fingerprint(model)), collate(seqs, tok.pad_token_id)


def test_sequence_sums_are_the_stored_float32_sums(setup):
    """Tolerance 1e-4 nats: the store's sums come from float32 values (KV-cache scoring vs the full
    forward differ only in summation order); the bf16 token values alone are off by more."""
    model, _, _, store, batch = setup
    stored = {k: v[:8] for k, v in batch.items()}  # rows 0..7: chosen+rejected of the first 4 pairs
    ref = Precomputed(store)
    out = ref.sequence_logps(stored["input_ids"], stored["attention_mask"], stored["score_mask"])
    with torch.no_grad():
        want = model_logprobs(model, **stored).sum(1)
    torch.testing.assert_close(out.sequence_logps, want, atol=1e-4, rtol=0)
    assert (out.token_logprobs.sum(1) - want).abs().max() > 1e-3  # bf16 storage: the test could fail
    torch.testing.assert_close(out.token_logprobs, ref.logprobs(**stored))
    # a score mask that is not the stored one (first scored token left out) gets the token sum instead
    narrower = stored["score_mask"].clone()
    narrower[torch.arange(8), narrower.int().argmax(1)] = False
    out2 = ref.sequence_logps(stored["input_ids"], stored["attention_mask"], narrower)
    torch.testing.assert_close(out2.sequence_logps, out2.token_logprobs.sum(1))
    assert ref.metrics() == {"hits": 24, "misses": 0, "miss_rate": 0.0}


def test_misses_warn_with_the_running_count_and_are_counted(setup, caplog):
    model, _, _, store, batch = setup
    ref = Precomputed(store, fallback=Frozen.from_policy(model), warn_every_s=3600)
    with caplog.at_level(logging.WARNING, logger="refmodel.reference.precomputed"):
        out = ref.sequence_logps(**batch)
        ref.logprobs(**batch)  # within warn_every_s: counted, not logged again
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "8 of 16 rows" in warnings[0].getMessage() and "8 misses, 8 hits so far" in warnings[0].getMessage()
    assert ref.metrics() == {"hits": 16, "misses": 16, "miss_rate": 0.5}
    with torch.no_grad():
        want = model_logprobs(model, **batch).sum(1)
    torch.testing.assert_close(out.sequence_logps, want, atol=1e-4, rtol=0)  # fallback rows: live float32
    caplog.clear()
    eager = Precomputed(store, fallback=Frozen.from_policy(model), warn_every_s=0)
    with caplog.at_level(logging.WARNING, logger="refmodel.reference.precomputed"):
        eager.logprobs(**batch)
        eager.logprobs(**batch)
    assert [r.getMessage().split("(")[-1][:18] for r in caplog.records] == ["8 misses, 8 hits s", "16 misses, 16 hits"]


def test_training_loop_reports_reference_misses(setup, caplog):
    model, tok, rows, store, _ = setup
    ref = Precomputed(store, fallback=Frozen.from_policy(model))
    cfg = TrainConfig(batch_size=8, max_steps=1, progress=False)
    with caplog.at_level(logging.WARNING, logger="refmodel.recipes.train"):
        result = train(copy.deepcopy(model), tok, rows, cfg, reference=ref)
    assert result.reference_metrics == {"hits": 8, "misses": 8, "miss_rate": 0.5}
    assert any("reference log-probs during training: hits 8 (sequences read from the store), misses 8 (sequences "
               "not in the store, scored by the fallback)" in r.getMessage() for r in caplog.records)
