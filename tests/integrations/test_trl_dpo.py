"""refmodel's DPOTrainer against TRL's own: same first-step loss, no TRL reference model or forward."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("trl")

import trl
import trl.trainer.dpo_trainer as trl_dpo
from datasets import Dataset
from trl_helpers import (
    COMMON,
    ForwardCounter,
    count_model_loads,
    first_log,
    load,
    make_models,
    pairs,
    precompute_records,
    precompute_store,
    trl_sequences,
)

from refmodel import Frozen, LogprobStore, Precomputed
from refmodel.errors import ConfigError, StoreMiss
from refmodel.integrations.trl import DPOTrainer

TOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("dpo-models"))


def config(tmp_path, **kw):
    return trl.DPOConfig(output_dir=str(tmp_path / "out"), **{**COMMON, **kw})


def trl_baseline(models, data, tmp_path, **kw):
    """TRL's own run: ``precompute_ref_log_probs=True`` with the reference model."""
    policy, tok = load(models[0])
    ref, _ = load(models[1])
    trainer = trl.DPOTrainer(policy, ref_model=ref, args=config(tmp_path, precompute_ref_log_probs=True, **kw),
                             train_dataset=data, processing_class=tok)
    trainer.train()
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("conversational,max_length", [(False, None), (True, None), (False, 12)],
                         ids=["text", "conversational", "text-truncated"])
def test_store_from_precompute_matches_trls_precompute(models, tmp_path, monkeypatch, conversational, max_length):
    data = Dataset.from_list(pairs(8, conversational))
    base = trl_baseline(models, data, tmp_path, max_length=max_length)
    # `refmodel precompute` over the same records with the trainer's TRL settings writes TRL's keys.
    store = precompute_records(pairs(8, conversational), models[1], tmp_path / "store", max_length)

    policy, tok = load(models[0])
    counter = ForwardCounter(policy)
    with count_model_loads(monkeypatch, trl_dpo) as loads:
        ours = DPOTrainer(policy, args=config(tmp_path, max_length=max_length), train_dataset=data,
                          processing_class=tok, reference=str(store))
        ours.train()
    assert loads == [] and ours.ref_model is None  # TRL built no reference model...
    assert counter.calls == 1  # ...and ran no reference forward: the one forward is the policy's training pass
    got, want = first_log(ours), first_log(base)
    assert abs(got["loss"] - want["loss"]) <= TOL, (got["loss"], want["loss"])
    assert abs(got["loss"] - 0.6931471805599453) > 1e-3  # the reference differs from the policy
    for key in ("rewards/chosen", "rewards/rejected", "grad_norm"):
        assert abs(got[key] - want[key]) <= TOL * max(1.0, abs(want[key])), key
    assert got["refmodel/store_hits"] == 8 and got["refmodel/store_misses"] == 0
    assert ours.reference_runner.store_hits == 8


def test_frozen_reference_equals_trls_reference_model(models, tmp_path, monkeypatch):
    data = Dataset.from_list(pairs(8))
    base = trl_baseline(models, data, tmp_path)
    policy, tok = load(models[0])
    ref, _ = load(models[1])
    ref_calls = ForwardCounter(ref.model)  # refmodel runs the backbone, then its own fused head
    with count_model_loads(monkeypatch, trl_dpo) as loads:
        ours = DPOTrainer(policy, args=config(tmp_path), train_dataset=data, processing_class=tok,
                          reference=Frozen(ref))
        ours.train()
    assert loads == [] and ref_calls.calls == 1  # one reference call (the backbone) for the [2B, T] batch
    assert abs(first_log(ours)["loss"] - first_log(base)["loss"]) <= TOL


@pytest.mark.slow
def test_a_store_miss_names_the_sequence_and_a_fallback_is_counted(models, tmp_path, caplog):
    data = Dataset.from_list(pairs(8))
    base = trl_baseline(models, data, tmp_path)
    seqs = trl_sequences(base.train_dataset, ("chosen_ids", "rejected_ids"), None)
    store_dir = precompute_store(seqs[2:], models[1], tmp_path / "partial")  # pair 0 is missing

    policy, tok = load(models[0])
    ours = DPOTrainer(policy, args=config(tmp_path), train_dataset=data, processing_class=tok,
                      reference=str(store_dir))
    with pytest.raises(StoreMiss, match=r"2 of 8 sequences of this TRL batch .* \(first: (chosen|rejected) of pair \d, \d+ tokens: '<s> "):
        ours.train()

    policy, tok = load(models[0])
    ref, _ = load(models[1])
    store = LogprobStore.open(store_dir)
    ours = DPOTrainer(policy, args=config(tmp_path), train_dataset=data, processing_class=tok,
                      reference=Precomputed(store, fallback=Frozen(ref)))
    with caplog.at_level(logging.WARNING, logger="refmodel.reference.precomputed"):
        ours.train()
    assert "2 of 8 rows of this batch missed the store" in caplog.text
    log = first_log(ours)
    assert log["refmodel/store_misses"] == 2 and log["refmodel/store_hits"] == 6
    assert abs(log["loss"] - first_log(base)["loss"]) <= TOL  # the fallback is the same model


def test_bad_combinations_are_refused(models, tmp_path):
    policy, tok = load(models[0])
    ref, _ = load(models[1])
    data = Dataset.from_list(pairs(4))
    with pytest.raises(ConfigError, match="not both"):
        DPOTrainer(policy, ref_model=ref, args=config(tmp_path), train_dataset=data, processing_class=tok,
                   reference=Frozen(ref))
    with pytest.raises(ConfigError, match="precompute_ref_log_probs=True has nothing to precompute"):
        DPOTrainer(policy, args=config(tmp_path, precompute_ref_log_probs=True), train_dataset=data,
                   processing_class=tok, reference=Frozen(ref))
    with pytest.raises(ConfigError, match="neither a log-prob store folder"):
        DPOTrainer(policy, args=config(tmp_path), train_dataset=data, processing_class=tok,
                   reference=str(tmp_path / "nothing-here"))
    with pytest.raises(ConfigError, match="sync_ref_model=True moves the reference"):
        DPOTrainer(policy, args=config(tmp_path, sync_ref_model=True), train_dataset=data, processing_class=tok,
                   reference=Frozen(ref))
