"""``refmodel store export-trl`` writes what refmodel's DPOTrainer / KTOTrainer read directly."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("trl")

import trl
import trl.trainer.dpo_trainer as trl_dpo
from datasets import Dataset
from trl_helpers import (
    COMMON,
    count_model_loads,
    first_log,
    load,
    make_models,
    pairs,
    precompute_records,
    unpaired,
)

from refmodel.errors import ConfigError
from refmodel.integrations.trl import DPOTrainer, KTOTrainer
from refmodel.testing import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("export-models"))


def export(models, records, tmp_path, max_length=1024):
    store = precompute_records(records, models[1], tmp_path / "store", max_length)
    out = tmp_path / "with_ref.jsonl"
    run_cli("store", "export-trl", store, "--data", store.with_suffix(".jsonl"), "--model", models[1], "--out", out,
            "--max-length", max_length)
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_exported_dpo_columns_train_like_trls_precompute(models, tmp_path, monkeypatch):
    rows = export(models, pairs(8), tmp_path)
    assert len(rows) == 8 and all("ref_chosen_logps" in r and "ref_rejected_logps" in r for r in rows)
    policy, tok = load(models[0])
    ref, _ = load(models[1])
    base = trl.DPOTrainer(policy, ref_model=ref, train_dataset=Dataset.from_list(pairs(8)), processing_class=tok,
                          args=trl.DPOConfig(str(tmp_path / "a"), precompute_ref_log_probs=True, **COMMON))
    base.train()
    assert base.train_dataset["ref_chosen_logps"] == pytest.approx([r["ref_chosen_logps"] for r in rows], abs=1e-5)

    policy, tok = load(models[0])
    with count_model_loads(monkeypatch, trl_dpo) as loads:
        ours = DPOTrainer(policy, train_dataset=Dataset.from_list(rows), processing_class=tok,
                          args=trl.DPOConfig(str(tmp_path / "b"), **COMMON))
        ours.train()
    assert loads == [] and ours.ref_model is None
    assert abs(first_log(ours)["loss"] - first_log(base)["loss"]) <= 1e-5


def test_export_of_unpaired_data_feeds_kto_without_a_kl_term(models, tmp_path):
    rows = export(models, unpaired(8), tmp_path)
    assert len(rows) == 8 and all("ref_logps" in r and "ref_chosen_logps" not in r for r in rows)
    kto = dict(train_sampling_strategy="sequential", **COMMON)
    policy, tok = load(models[0])
    ref, _ = load(models[1])
    base = trl.KTOTrainer(policy, ref_model=ref, train_dataset=Dataset.from_list(unpaired(8)), processing_class=tok,
                          args=trl.KTOConfig(str(tmp_path / "a"), precompute_ref_log_probs=True,
                                             loss_type="apo_zero_unpaired", **kto))
    base.train()
    policy, tok = load(models[0])
    ours = KTOTrainer(policy, train_dataset=Dataset.from_list(rows), processing_class=tok,
                      args=trl.KTOConfig(str(tmp_path / "b"), loss_type="apo_zero_unpaired", **kto))
    ours.train()
    assert abs(first_log(ours)["loss"] - first_log(base)["loss"]) <= 1e-5
    # KTO's own loss needs the KL completions' reference too, which depends on the batches: refused
    policy, tok = load(models[0])
    with pytest.raises(ConfigError, match="KL completions"):
        KTOTrainer(policy, train_dataset=Dataset.from_list(rows), processing_class=tok,
                   args=trl.KTOConfig(str(tmp_path / "c"), **kto))
