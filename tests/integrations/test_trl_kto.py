"""refmodel's KTOTrainer against TRL's own reference: completions and TRL's KL completions, store or live."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

import trl
import trl.trainer.kto_trainer as trl_kto
from datasets import Dataset
from trl_helpers import (
    COMMON,
    ForwardCounter,
    count_model_loads,
    first_log,
    load,
    make_models,
    precompute_store,
    trl_sequences,
    unpaired,
)

from refmodel import Frozen
from refmodel.integrations.trl import KTOTrainer
from refmodel.testing import run_cli, write_jsonl

TOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("kto-models"))


def config(tmp_path, **kw):
    # KTO's KL term pairs each prompt with the previous example's completion inside a batch, so the
    # batches must be the dataset's order (TRL requires it too)
    return trl.KTOConfig(output_dir=str(tmp_path / "out"), train_sampling_strategy="sequential", **{**COMMON, **kw})


@pytest.fixture(scope="module")
def baseline(models, tmp_path_factory):
    """TRL's own run (``precompute_ref_log_probs=True`` with the reference model), text and conversational."""
    out = {}
    for conversational in (False, True):
        policy, tok = load(models[0])
        ref, _ = load(models[1])
        data = Dataset.from_list(unpaired(8, conversational))
        trainer = trl.KTOTrainer(policy, ref_model=ref, train_dataset=data, processing_class=tok,
                                 args=config(tmp_path_factory.mktemp("kto"), precompute_ref_log_probs=True,
                                             max_length=16))
        trainer.train()
        out[conversational] = trainer
    return out


@pytest.mark.slow
@pytest.mark.parametrize("conversational", [False, True], ids=["text", "conversational"])
@pytest.mark.parametrize("source", ["store", "live"])
def test_kto_matches_trls_reference(models, baseline, tmp_path, monkeypatch, conversational, source):
    base = baseline[conversational]
    assert base.calculate_KL and "KL_completion_ids" in base.train_dataset.column_names
    if source == "store":  # completions and KL completions, as TRL's collator truncates them
        seqs = trl_sequences(base.train_dataset, ("completion_ids", "KL_completion_ids"), 16)
        reference = str(precompute_store(seqs, models[1], tmp_path / "store"))
    else:
        reference = Frozen(load(models[1])[0])
    policy, tok = load(models[0])
    counter = ForwardCounter(policy)
    with count_model_loads(monkeypatch, trl_kto) as loads:
        ours = KTOTrainer(policy, train_dataset=Dataset.from_list(unpaired(8, conversational)), processing_class=tok,
                          reference=reference, args=config(tmp_path, max_length=16))
        ours.train()
    # TRL built no reference; the policy ran twice: its completions and its KL completions
    assert loads == [] and ours.ref_model is None and counter.calls == 2
    got, want = first_log(ours), first_log(base)
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected"):
        assert abs(got[key] - want[key]) <= TOL * max(1.0, abs(want[key])), (key, got[key], want[key])
    assert got["kl"] > 0.1  # the reference differs from the policy: the KL term is exercised
    assert got["refmodel/ref_rows"] == 8  # 4 completions + 4 KL completions
    if source == "store":
        assert got["refmodel/store_hits"] == 8 and got["refmodel/store_misses"] == 0


@pytest.mark.slow
def test_kto_trains_from_a_store_precomputed_with_its_kl_completions(models, tmp_path):
    # `refmodel precompute --kto-kl-batch-size 4` scores the KL completions TRL builds from the same data
    # and batch size (before, training from such a store raised StoreMiss at step 1). 10 rows in batches
    # of 4: the last KL rotation is inside a batch of 2. Windows of 3 records: the records and the KL
    # completions each span several shards. The store is float32, so every step equals a live Frozen
    # reference's.
    records = unpaired(10)
    data = write_jsonl(records, tmp_path / "kto.jsonl")
    store = tmp_path / "store"
    run_cli("precompute", "--model", models[1], "--data", data, "--out", store, "--dtype", "float32",
            "--max-length", 16, "--kto-kl-batch-size", 4, "--shard-examples", 3)
    logs = {}
    for name, reference in (("store", str(store)), ("frozen", Frozen(load(models[1])[0]))):
        policy, tok = load(models[0])
        trainer = KTOTrainer(policy, train_dataset=Dataset.from_list(records), processing_class=tok,
                             reference=reference, args=config(tmp_path / name, max_length=16, max_steps=3))
        trainer.train()
        logs[name] = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs["store"]) == len(logs["frozen"]) == 3
    for got, want in zip(logs["store"], logs["frozen"], strict=True):
        for key in ("loss", "kl", "rewards/chosen", "rewards/rejected"):
            if key in want:
                assert abs(got[key] - want[key]) <= 1e-6 * max(1.0, abs(want[key])), (key, got[key], want[key])
        assert got["refmodel/store_misses"] == 0
    assert logs["store"][0]["kl"] > 0.1  # the KL term is exercised
