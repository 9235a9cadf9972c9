"""PolicyLossConfig: the one owner of the policy loss's options.

A config and the option keywords give the same loss and gradients (bit for bit: the keywords build the very
same config) for every loss type, in policy_loss and fused_policy_loss; the config is frozen, hashable and
normalized; every invalid value or combination is refused when the config is built, with its message; a
config together with option keywords is refused naming them. float64, so "identical" is ``==``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from refmodel.errors import ConfigError, InvalidInput
from refmodel.losses import (
    AdaptiveKLController,
    FixedKLController,
    PolicyLossConfig,
    fused_policy_loss,
    policy_loss,
)
from refmodel.losses.policy_config import LOSS_TYPES, OPTION_NAMES, build_config

B, T, H, V = 3, 7, 8, 29


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logprobs = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logprobs.detach() + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logprobs.detach() + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    rollout = old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    return logprobs, old, ref, rollout, adv, mask


def _options(loss_type):
    """Non-default values for every option that applies to ``loss_type``."""
    opts = dict(loss_type=loss_type, epsilon=0.15, epsilon_high=5.0 if loss_type == "cispo" else 0.28, beta=0.07,
                kl_estimator="low_var_kl", use_bias_correction_kl=True, log_ratio_clamp=20.0,
                kl_log_ratio_clamp=20.0, kl_clamp=10.0, vllm_importance_sampling_mode="token_truncate",
                vllm_importance_sampling_clip_max=2.0, vllm_importance_sampling_clip_min=0.5,
                max_completion_length=11)
    if loss_type != "cispo":
        opts.update(delta=1.8, dual_clip=3.0)
    return opts


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_config_and_keywords_give_identical_losses_and_gradients(loss_type):
    logprobs, old, ref, rollout, adv, mask = _batch(seed=LOSS_TYPES.index(loss_type))
    opts = _options(loss_type)
    a = policy_loss(logprobs, old, adv, mask, ref_logprobs=ref, rollout_logprobs=rollout, **opts)
    b = policy_loss(logprobs, old, adv, mask, config=PolicyLossConfig(**opts), ref_logprobs=ref, rollout_logprobs=rollout)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.per_token_loss, b.per_token_loss)
    assert a.metrics() == b.metrics()
    (ga,) = torch.autograd.grad(a.loss, logprobs)
    (gb,) = torch.autograd.grad(b.loss, logprobs)
    assert torch.equal(ga, gb) and ga.abs().sum() > 0
    # every option matters here: the defaults give another loss
    assert not torch.equal(policy_loss(logprobs, old, adv, mask, loss_type=loss_type, ref_logprobs=ref,
                                       epsilon_high=opts["epsilon_high"]).loss, a.loss)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fused_config_and_keywords_give_identical_losses_and_gradients(loss_type):
    g = torch.Generator().manual_seed(10 + LOSS_TYPES.index(loss_type))
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (B, T), generator=g)
    _, old, ref, rollout, adv, mask = _batch(seed=LOSS_TYPES.index(loss_type))
    opts = _options(loss_type)
    a = fused_policy_loss(h, w, y, old, adv, mask, ref_logprobs=ref, rollout_logprobs=rollout, **opts)
    b = fused_policy_loss(h, w, y, old, adv, mask, config=PolicyLossConfig(**opts), ref_logprobs=ref,
                          rollout_logprobs=rollout)
    assert torch.equal(a.loss, b.loss) and a.metrics() == b.metrics()
    for ga, gb in zip(torch.autograd.grad(a.loss, (h, w)), torch.autograd.grad(b.loss, (h, w)), strict=True):
        assert torch.equal(ga, gb)
    # and the sequence-level fallback (token_logprobs + policy_loss) passes the same config through
    seq = dict(opts, importance_sampling_level="sequence")
    c = fused_policy_loss(h, w, y, old, adv, mask, config=PolicyLossConfig(**seq), ref_logprobs=ref)
    d = fused_policy_loss(h, w, y, old, adv, mask, ref_logprobs=ref, **seq)
    assert torch.equal(c.loss, d.loss)


def test_frozen_hashable_and_normalized():
    cfg = PolicyLossConfig(loss_type="grpo", epsilon_high=0.28, beta=0.04)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.beta = 0.0  # type: ignore[misc]
    assert hash(cfg) == hash(PolicyLossConfig(loss_type="grpo", epsilon_high=0.28, beta=0.04))
    assert {cfg: 1}[PolicyLossConfig(loss_type="grpo", epsilon_high=0.28, beta=0.04)] == 1
    # verl/OpenRLHF names and ints are normalized, so equal options are equal configs
    assert PolicyLossConfig(kl_estimator="low_var_kl", beta=1, epsilon=1) == \
        PolicyLossConfig(kl_estimator="k3", beta=1.0, epsilon=1.0)
    assert PolicyLossConfig(kl_estimator="mse+").kl_estimator == "k2"
    assert isinstance(PolicyLossConfig(beta=1).beta, float)
    # None keeps its meaning; the resolved values are properties
    assert cfg.epsilon_high == 0.28 and PolicyLossConfig().epsilon_high is None and PolicyLossConfig().clip_high == 0.2
    assert cfg.agg_mode == "seq-mean-token-mean" and PolicyLossConfig(loss_agg_mode="token-sum").agg_mode == "token-sum"
    # replace builds a new, re-checked config
    assert dataclasses.replace(cfg, epsilon=0.1).clip_high == 0.28
    with pytest.raises(ConfigError, match="absolute"):
        dataclasses.replace(cfg, loss_type="cispo", epsilon_high=None)
    assert set(OPTION_NAMES) == {f.name for f in dataclasses.fields(PolicyLossConfig)}
    assert not {"ref_logps", "rollout_logps", "full_kl", "num_items_in_batch"} & set(OPTION_NAMES)


def test_a_controller_as_beta_is_read_at_each_call():
    logprobs, old, ref, _, adv, mask = _batch(seed=3)
    ctl = AdaptiveKLController(0.1, target=1e-6, horizon=10)
    cfg = PolicyLossConfig(beta=ctl)
    assert cfg.beta is ctl and cfg.beta_value == 0.1 and hash(cfg) == hash(PolicyLossConfig(beta=ctl))
    first = policy_loss(logprobs, old, adv, mask, config=cfg, ref_logprobs=ref)
    ctl.update(first.kl, n_steps=1)  # the same config, a larger coefficient
    second = policy_loss(logprobs, old, adv, mask, config=cfg, ref_logprobs=ref)
    want = policy_loss(logprobs, old, adv, mask, beta=ctl.value, ref_logprobs=ref)
    assert float(second.kl_loss) > float(first.kl_loss) and torch.equal(second.loss, want.loss)
    assert PolicyLossConfig(beta=FixedKLController(0.3)).beta_value == 0.3


@pytest.mark.parametrize("options,match", [
    (dict(loss_type="gspo"), r"unknown loss_type 'gspo'; expected one of \['grpo', 'bnpo', 'dr_grpo', 'dapo'"),
    (dict(loss_type="cispo"), "absolute.*epsilon_high=5.0"),
    (dict(loss_type="cispo", epsilon_high=5.0, dual_clip=3.0), "delta and dual_clip.*cispo"),
    (dict(loss_type="cispo", epsilon_high=5.0, delta=2.0), "delta and dual_clip.*cispo"),
    (dict(importance_sampling_level="trajectory"), r"importance_sampling_level.*\['token', 'sequence'"),
    (dict(loss_agg_mode="mean"), r"loss_agg_mode 'mean'; expected None .* or one of \['token-mean'"),
    (dict(vllm_importance_sampling_mode="tis"), r"vllm_importance_sampling_mode 'tis'.*'token_truncate'"),
    (dict(kl_estimator="k4"), r"unknown KL estimator 'k4'; expected one of \['k1'.*also takes 'full'"),
    (dict(kl_estimator="full", use_bias_correction_kl=True), "use_bias_correction_kl.*full"),
    (dict(use_bias_correction_kl="yes"), "use_bias_correction_kl must be True or False"),
    (dict(epsilon=-0.1), r"epsilon must be a finite number > 0, got -0.1"),
    (dict(epsilon=None), "epsilon must be a finite number > 0, got None"),
    (dict(epsilon_high=float("inf")), "epsilon_high must be a finite number > 0, got inf; None turns it off"),
    (dict(delta=1.0), "delta must be a finite number > 1"),
    (dict(dual_clip=0.9), "dual_clip must be a finite number > 1"),
    (dict(kl_clamp=0.0), "kl_clamp must be"),
    (dict(vllm_importance_sampling_clip_max=-1.0), "vllm_importance_sampling_clip_max must be"),
    (dict(max_completion_length=0), "max_completion_length must be a finite number > 0"),
    (dict(beta=-0.1), r"beta must be >= 0"),
    (dict(beta=True), "beta must be a number"),
    (dict(beta=float("nan")), "beta must be a finite number"),
    (dict(beta="0.1"), "beta must be a finite number"),
])
def test_each_invalid_option_is_refused_when_the_config_is_built(options, match):
    with pytest.raises(InvalidInput, match=match):
        PolicyLossConfig(**options)
    logprobs, old, ref, _, adv, mask = _batch()
    with pytest.raises(InvalidInput, match=match):  # the same message through the keyword convenience
        policy_loss(logprobs, old, adv, mask, ref_logprobs=ref, **options)


def test_beta_without_a_reference_is_refused_at_the_call():
    cfg = PolicyLossConfig(beta=0.04)  # valid: the reference is an input of the call, not an option
    logprobs, old, _, _, adv, mask = _batch()
    with pytest.raises(ConfigError, match="ref_logprobs is None"):
        policy_loss(logprobs, old, adv, mask, config=cfg)
    with pytest.raises(ConfigError, match="full_kl"):
        policy_loss(logprobs, old, adv, mask, config=dataclasses.replace(cfg, kl_estimator="full"))


def test_config_and_option_keywords_together_is_an_error_naming_them():
    logprobs, old, ref, _, adv, mask = _batch()
    cfg = PolicyLossConfig(beta=0.04)
    with pytest.raises(ConfigError, match=r"policy_loss: got both config= and the option keyword\(s\) "
                                          r"\['beta', 'epsilon'\]"):
        policy_loss(logprobs, old, adv, mask, config=cfg, ref_logprobs=ref, beta=0.04, epsilon=0.1)
    h, w, y = torch.randn(B, T, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64), \
        torch.zeros(B, T, dtype=torch.long)
    with pytest.raises(ConfigError, match=r"fused_policy_loss: got both config=.*\['loss_type'\]"):
        fused_policy_loss(h, w, y, old, adv, mask, config=cfg, ref_logprobs=ref, loss_type="grpo")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['loss_typ'\].*'loss_type'"):
        policy_loss(logprobs, old, adv, mask, loss_typ="grpo")
    with pytest.raises(ConfigError, match="config must be a refmodel.losses.PolicyLossConfig, got dict"):
        policy_loss(logprobs, old, adv, mask, config={"beta": 0.04})
    assert build_config(cfg, {}) is cfg and build_config(None, {}) == PolicyLossConfig()
