"""The TRL trainers against a live ``refmodel serve`` (a subprocess on 127.0.0.1) through ``Remote``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

import torch  # noqa: E402
import trl  # noqa: E402
import trl.trainer.dpo_trainer as trl_dpo  # noqa: E402
import trl.trainer.grpo_trainer as trl_grpo  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl_helpers import (  # noqa: E402
    COMMON,
    GRPO_COMMON,
    ForwardCounter,
    capture_generations,
    count_model_loads,
    first_log,
    generation_batch,
    length_reward,
    load,
    make_models,
    pairs,
    prompts,
)

from refmodel import Frozen  # noqa: E402
from refmodel.errors import ConfigError  # noqa: E402
from refmodel.integrations.trl import DPOTrainer, GRPOTrainer  # noqa: E402
from refmodel.integrations.trl.grpo import completion_score_mask  # noqa: E402
from refmodel.reference import Remote  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
from serve_helpers import ServerProcess  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TEMPERATURE = GRPO_COMMON["temperature"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("service-models"))


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    proc = ServerProcess(["--model", f"policy={models[0]}", "--model", f"reference={models[1]}"],
                         tmp_path_factory.mktemp("service") / "server.log")
    yield proc
    proc.stop()


def test_dpo_against_the_service_matches_trls_precompute(models, server, tmp_path, monkeypatch):
    data = Dataset.from_list(pairs(8))
    policy, tok = load(models[0])
    ref, _ = load(models[1])
    base = trl.DPOTrainer(policy, ref_model=ref, train_dataset=data, processing_class=tok,
                          args=trl.DPOConfig(output_dir=str(tmp_path / "a"), precompute_ref_log_probs=True, **COMMON))
    base.train()

    policy, tok = load(models[0])
    counter = ForwardCounter(policy)
    remote = Remote(server.url, "reference")
    with count_model_loads(monkeypatch, trl_dpo) as loads:
        ours = DPOTrainer(policy, train_dataset=data, processing_class=tok, reference=remote,
                          args=trl.DPOConfig(output_dir=str(tmp_path / "b"), **COMMON))
        ours.train()
    assert loads == [] and ours.ref_model is None and counter.calls == 1
    assert remote.fingerprint == Frozen(load(models[1])[0]).fingerprint
    assert abs(first_log(ours)["loss"] - first_log(base)["loss"]) <= 1e-5
    assert first_log(ours)["refmodel/ref_rows"] == 8


def test_grpo_with_a_remote_reference_at_the_sampling_temperature(models, server, tmp_path, monkeypatch):
    remote = Remote(server.url, "policy", temperature=TEMPERATURE)
    # the temperature is part of the identity, on the service as locally
    assert remote.fingerprint == Frozen(load(models[0])[0], temperature=TEMPERATURE).fingerprint
    assert remote.fingerprint != Remote(server.url, "policy").fingerprint
    args = dict(train_dataset=Dataset.from_list(prompts(8)), reward_funcs=length_reward)

    policy, tok = load(models[0])
    base = trl.GRPOTrainer(policy, processing_class=tok, args=trl.GRPOConfig(str(tmp_path / "a"), **GRPO_COMMON),
                           **args)
    theirs = capture_generations(base)
    base.train()

    policy, tok = load(models[0])
    with count_model_loads(monkeypatch, trl_grpo) as loads:
        ours = GRPOTrainer(policy, processing_class=tok, reference=remote,
                           args=trl.GRPOConfig(str(tmp_path / "b"), **GRPO_COMMON), **args)
        mine = capture_generations(ours)
        ours.train()
    assert loads == []
    mask = theirs[0]["completion_mask"].bool()
    diff = (mine[0]["ref_per_token_logps"] - theirs[0]["ref_per_token_logps"])[mask]
    assert diff.abs().max() <= 1e-5
    assert abs(first_log(ours)["kl"]) <= 1e-6
    # per-token, on TRL's batch directly
    ids, attn, keep = generation_batch(theirs[0])
    score = completion_score_mask(attn, keep)
    direct = remote.logprobs(ids, attn, score)[:, -keep:]
    assert (direct - theirs[0]["ref_per_token_logps"])[mask].abs().max() <= 1e-5
    # the JSON route takes the same temperature and names the same fingerprint
    body = httpx.post(server.url + "/v1/logprobs", timeout=30, json={
        "model": "policy", "input_ids": ids.tolist(), "attention_mask": attn.tolist(),
        "score_mask": score.long().tolist(), "temperature": TEMPERATURE}).json()
    assert body["fingerprint"] == remote.fingerprint
    assert (torch.tensor(body["logprobs"])[:, -keep:] - direct).abs().max() <= 1e-6


def test_a_bare_url_needs_a_service_with_one_model(models, server, tmp_path):
    policy, tok = load(models[0])
    with pytest.raises(ConfigError, match="serves 2 log-prob models"):
        DPOTrainer(policy, train_dataset=Dataset.from_list(pairs(4)), processing_class=tok, reference=server.url,
                   args=trl.DPOConfig(output_dir=str(tmp_path / "c"), **COMMON))
