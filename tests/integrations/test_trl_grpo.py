"""refmodel's GRPOTrainer: the reference at the sampling temperature, TRL's reference model never built."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

import torch
import trl
import trl.trainer.grpo_trainer as trl_grpo
from datasets import Dataset
from trl_helpers import (
    GRPO_COMMON,
    capture_generations,
    count_model_loads,
    first_log,
    generation_batch,
    length_reward,
    load,
    make_models,
    prompts,
)

from refmodel import Frozen
from refmodel.errors import ConfigError
from refmodel.integrations.trl import GRPOTrainer
from refmodel.integrations.trl.grpo import completion_score_mask

TEMPERATURE = GRPO_COMMON["temperature"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("grpo-models"))


def config(tmp_path, **kw):
    return trl.GRPOConfig(output_dir=str(tmp_path / "out"), **{**GRPO_COMMON, **kw})


@pytest.fixture(scope="module")
def trl_generation(models, tmp_path_factory):
    """One step of TRL's own GRPO (its own reference copy): the generation batch it scored."""
    policy, tok = load(models[0])
    trainer = trl.GRPOTrainer(policy, reward_funcs=length_reward, train_dataset=Dataset.from_list(prompts(8)),
                              args=config(tmp_path_factory.mktemp("grpo-trl")), processing_class=tok)
    seen = capture_generations(trainer)
    trainer.train()
    return seen[0], first_log(trainer)


def reference_tokens(reference, out) -> tuple[torch.Tensor, torch.Tensor]:
    ids, attn, keep = generation_batch(out)
    ours = reference.logprobs(ids, attn, completion_score_mask(attn, keep))[:, -keep:]
    return ours, out["completion_mask"].bool()


def test_frozen_at_the_sampling_temperature_equals_trls_reference(models, trl_generation, monkeypatch):
    import refmodel.logprobs.model as logprobs_model

    out, _ = trl_generation
    assert out["prompt_mask"].sum(1).unique().numel() > 1  # prompts of different lengths: left padding
    ref, _ = load(models[0])
    head_rows = []
    real_head = logprobs_model.token_logprobs

    def spy(hidden, weight, targets, **kwargs):  # the fused head: which positions reach the vocabulary matmul
        head_rows.append(int((targets != -100).sum()))
        return real_head(hidden, weight, targets, **kwargs)

    monkeypatch.setattr(logprobs_model, "token_logprobs", spy)
    ours, mask = reference_tokens(Frozen(ref, temperature=TEMPERATURE), out)
    monkeypatch.undo()
    assert head_rows == [int(out["completion_mask"].sum())]  # completion tokens only: no prompt token
    theirs = out["ref_per_token_logps"]
    assert (ours - theirs)[mask].abs().max() <= 1e-5
    assert (ours[~mask] == 0).all()  # padding after EOS is not scored
    # at temperature 1 the same tokens are off by far more: the temperature is what makes them agree
    plain, _ = reference_tokens(Frozen(load(models[0])[0]), out)
    assert (plain - theirs)[mask].abs().max() > 0.05


def test_trainer_builds_no_reference_model_and_logs_zero_kl(models, tmp_path, monkeypatch, trl_generation):
    policy, tok = load(models[0])
    ref, _ = load(models[0])
    with count_model_loads(monkeypatch, trl_grpo) as loads:
        trainer = GRPOTrainer(policy, reward_funcs=length_reward, train_dataset=Dataset.from_list(prompts(8)),
                              args=config(tmp_path), processing_class=tok,
                              reference=Frozen(ref, temperature=TEMPERATURE))
        seen = capture_generations(trainer)
        trainer.train()
    assert loads == []  # TRL's own reference model was never built
    log = first_log(trainer)
    assert abs(log["kl"]) <= 1e-6 and log["refmodel/ref_rows"] == 8
    # the same generation as TRL's own run (same seed), and the same reference log-probs
    out, trl_log = trl_generation
    assert torch.equal(seen[0]["completion_ids"], out["completion_ids"])
    mask = out["completion_mask"].bool()
    assert (seen[0]["ref_per_token_logps"] - out["ref_per_token_logps"])[mask].abs().max() <= 1e-5
    assert abs(log["loss"] - trl_log["loss"]) <= 1e-5


def test_reference_at_another_temperature_or_beta_zero_is_refused(models, tmp_path):
    policy, tok = load(models[0])
    ref, _ = load(models[0])
    data = Dataset.from_list(prompts(4))
    with pytest.raises(ConfigError, match="samples at temperature=0.7"):
        GRPOTrainer(policy, reward_funcs=length_reward, train_dataset=data, args=config(tmp_path),
                    processing_class=tok, reference=Frozen(ref))
    with pytest.raises(ConfigError, match="beta=0.0 means no KL term"):
        GRPOTrainer(policy, reward_funcs=length_reward, train_dataset=data, args=config(tmp_path, beta=0.0),
                    processing_class=tok, reference=Frozen(ref, temperature=TEMPERATURE))


@pytest.mark.slow
def test_peft_policy_with_a_reference_config_is_the_base_model_like_trls(models, tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig

    from refmodel import AdapterDisabled, ReferenceConfig

    lora = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    data = Dataset.from_list(prompts(8))
    policy, tok = load(models[0])
    base = trl.GRPOTrainer(policy, reward_funcs=length_reward, train_dataset=data, args=config(tmp_path / "a"),
                           processing_class=tok, peft_config=LoraConfig(**lora))
    theirs = capture_generations(base)
    base.train()
    policy, tok = load(models[0])
    ours = GRPOTrainer(policy, reward_funcs=length_reward, train_dataset=data, args=config(tmp_path / "b"),
                       processing_class=tok, peft_config=LoraConfig(**lora), reference=ReferenceConfig())
    mine = capture_generations(ours)
    ours.train()
    # the temperature comes from the trainer's config; the reference is the base model, adapters off
    assert isinstance(ours.reference, AdapterDisabled) and ours.reference.temperature == TEMPERATURE
    mask = theirs[0]["completion_mask"].bool()
    assert torch.equal(mine[0]["completion_ids"], theirs[0]["completion_ids"])
    assert (mine[0]["ref_per_token_logps"] - theirs[0]["ref_per_token_logps"])[mask].abs().max() <= 1e-5
    assert abs(first_log(ours)["kl"]) <= 1e-6
