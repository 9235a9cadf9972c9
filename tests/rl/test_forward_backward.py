"""forward_backward: a named reference from the global cache equals the explicit call; bad names refused."""

from __future__ import annotations

import logging

import pytest
import torch
from rl_helpers import make_rollouts

from refmodel import get_global_reference_cache, model_logprobs
from refmodel.errors import ConfigError, InvalidBatch, ModelNotAllowed
from refmodel.losses import PolicyLossConfig, policy_loss
from refmodel.models.cache import load_reference_model
from refmodel.reference import Frozen
from refmodel.rl import forward_backward, group_advantages, kl_monitor
from refmodel.testing import load_tiny
from refmodel.testing.lora import lora_policy


@pytest.fixture(scope="module")
def registered(tiny_model_dirs):
    cache = get_global_reference_cache()
    cache.registry.add("rl-test-base", tiny_model_dirs["llama"])
    yield "rl-test-base"
    cache.remove("rl-test-base", quantize="all")


@pytest.fixture
def setup(tiny_model_dirs):
    base, tok = load_tiny(tiny_model_dirs["llama"])
    policy = lora_policy(base)
    ro = make_rollouts(policy, tok, n_prompts=3, generations=4, max_new_tokens=4)
    adv = group_advantages(torch.arange(ro.batch_size, dtype=torch.float32) % 2, ro.num_generations)
    batch = {"input_ids": ro.input_ids, "attention_mask": ro.attention_mask, "completion_mask": ro.completion_mask,
             "advantages": adv}
    return base, policy, batch


def _grads(policy):
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}


def test_named_reference_equals_the_explicit_call(setup, registered):
    base, policy, batch = setup
    out = forward_backward(policy, batch, loss_fn="grpo",
                           loss_kwargs={"reference_model": registered, "beta": 0.05, "epsilon_high": 0.28})
    got = _grads(policy)
    assert all(g.abs().sum() > 0 for n, g in got.items() if "lora_B" in n)
    policy.zero_grad(set_to_none=True)
    # the explicit call: the same weights loaded by the same safe loader, as a Frozen reference
    loaded = load_reference_model(get_global_reference_cache().registry.resolve(registered))
    ref = Frozen(loaded).logprobs(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    lp = model_logprobs(policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    res = policy_loss(lp, None, batch["advantages"], batch["completion_mask"], loss_type="grpo", ref_logprobs=ref,
                      beta=0.05, epsilon_high=0.28)
    res.loss.backward()
    want = _grads(policy)
    assert abs(out.loss - float(res.loss.detach())) <= 1e-6
    torch.testing.assert_close(out.ref_logprobs, ref, atol=1e-6, rtol=0)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5)
    assert out.metrics["kl_divergence"] == pytest.approx(float(res.kl), abs=1e-6) and out.metrics["kl_divergence"] > 0


def test_unregistered_name_and_bad_input_are_refused(setup, registered):
    _, policy, batch = setup
    with pytest.raises(ModelNotAllowed, match="not registered.*registry.add"):
        forward_backward(policy, batch, loss_kwargs={"reference_model": "nope", "beta": 0.1})
    with pytest.raises(ModelNotAllowed, match="not registered"):
        forward_backward(policy, batch, loss_kwargs={"reference_model": "nope", "beta": 0.0})
    assert all(p.grad is None for p in policy.parameters())  # refused before any work
    with pytest.raises(ConfigError, match="reference_model"):
        forward_backward(policy, batch, loss_kwargs={"beta": 0.1})
    with pytest.raises(ConfigError, match="unknown loss_fn"):
        forward_backward(policy, batch, loss_fn="reinforce++")
    with pytest.raises(ConfigError, match="unknown loss_kwargs"):
        forward_backward(policy, batch, loss_kwargs={"betta": 0.1})
    with pytest.raises(InvalidBatch, match="advantages"):
        forward_backward(policy, {**batch, "advantages": torch.zeros(5)})


def test_kl_monitor_warns_above_the_threshold(setup, registered, caplog):
    _, policy, batch = setup
    with caplog.at_level(logging.WARNING, logger="refmodel"):
        out = forward_backward(policy, batch, loss_kwargs={"reference_model": registered, "beta": 0.01,
                                                           "kl_threshold": 1e-6})
    assert out.metrics["kl_divergence"] > 1e-6
    assert kl_monitor(registered) is not None and kl_monitor(registered).warned
    assert any("exceeds the threshold" in r.getMessage() for r in caplog.records)


def test_named_reference_quantized_through_the_cache(setup, registered):
    _, policy, batch = setup
    cache = get_global_reference_cache()
    fp = forward_backward(policy, batch, loss_kwargs={"reference_model": registered, "beta": 0.05})
    q = forward_backward(policy, batch, loss_kwargs={"reference_model": registered, "beta": 0.05, "quantize": "int8"})
    assert cache.contains(registered, quantize="int8")
    drift = (q.ref_logprobs - fp.ref_logprobs).abs()[batch["completion_mask"]]
    assert 0 < float(drift.max()) < 0.5  # int8 moves the reference a little, never silently to nothing


def test_a_policy_loss_config_passes_through(setup, registered):
    """config=PolicyLossConfig(...) gives the loss and gradients of policy_loss with that config on the same
    inputs, and the same loss as loss_fn + the option keywords; a config with conflicting options is refused."""
    _, policy, batch = setup
    cfg = PolicyLossConfig(loss_type="dr_grpo", beta=0.05, epsilon_high=0.28, kl_estimator="low_var_kl",
                           max_completion_length=9)
    with pytest.raises(ConfigError, match=r"forward_backward: got both config=.*\['beta'\]"):
        forward_backward(policy, batch, config=cfg, loss_kwargs={"reference_model": registered, "beta": 0.1})
    with pytest.raises(ConfigError, match="loss_fn='grpo' but config.loss_type='dr_grpo'"):
        forward_backward(policy, batch, loss_fn="grpo", config=cfg, loss_kwargs={"reference_model": registered})
    assert all(p.grad is None for p in policy.parameters())  # refused before any work
    out = forward_backward(policy, batch, config=cfg, loss_kwargs={"reference_model": registered})
    got = _grads(policy)
    policy.zero_grad(set_to_none=True)
    lp = model_logprobs(policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    res = policy_loss(lp, None, batch["advantages"], batch["completion_mask"], config=cfg, ref_logprobs=out.ref_logprobs)
    res.loss.backward()
    assert out.loss == float(res.loss.detach()) and out.metrics["kl_loss"] == float(res.kl_loss) > 0
    for n, g in _grads(policy).items():
        torch.testing.assert_close(got[n], g, atol=0, rtol=0)
    policy.zero_grad(set_to_none=True)
    kw = forward_backward(policy, batch, loss_fn="dr_grpo",
                          loss_kwargs={"reference_model": registered, "beta": 0.05, "epsilon_high": 0.28,
                                       "kl_estimator": "low_var_kl", "max_completion_length": 9})
    assert kw.loss == out.loss
