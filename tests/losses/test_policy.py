"""policy_loss against per-token formulas written out from TRL's GRPO docs / the papers, in float64.

The reference below is written element by element (a Python loop over tokens) and differs in structure
from the vectorized implementation; values and autograd gradients must agree to 1e-12 (float64).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from refmodel.errors import ConfigError, InvalidInput
from refmodel.losses import AdaptiveKLController, FixedKLController, kl_penalized_rewards, policy_loss
from refmodel.losses.policy import LOSS_AGG_MODES, LOSS_TYPES

B, T = 4, 6
TOL = dict(rtol=1e-11, atol=1e-12)


def _batch(seed=0, spread=0.3, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    logprobs = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logprobs.detach() + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logprobs.detach() + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    rollout = old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) if per_token_adv else \
        torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 1:] = False
    mask[3, :2] = False
    # padding far outside the mask: a mask applied after exp would give inf * 0 = nan
    old = torch.where(mask, old, torch.full_like(old, -1e4))
    ref = torch.where(mask, ref, torch.full_like(ref, 1e4))
    return logprobs, old, ref, rollout, adv, mask


def _kl_ref(lp, rf, est):
    """Schulman's estimators of KL(pi || ref) per token; d = ref - logp (k3 = e^d - d - 1)."""
    d = rf - lp
    k2 = 0.5 * d * d
    base = est.rstrip("+")
    value = {"k1": -d, "k2": k2, "k3": torch.exp(d) - d - 1, "abs": torch.abs(d)}[base]
    return value.detach() + k2 - k2.detach() if est.endswith("+") else value


def _reference(logprobs, old, ref, adv, mask, *, loss_type, level, agg, beta=0.0, est="k3", eps=0.2, eps_high=None,
               delta=None, dual_clip=None, bias_kl=False, rho=None, num_items=None, max_len=None):
    eps_high = eps if eps_high is None else eps_high
    old = logprobs.detach() if old is None else old
    terms = [[None] * T for _ in range(B)]
    for i in range(B):
        toks = [t for t in range(T) if mask[i, t]]
        seq = sum(logprobs[i, t] - old[i, t] for t in toks) / max(len(toks), 1) if toks else logprobs.new_zeros(())
        for t in toks:
            a = adv[i, t] if adv.dim() == 2 else adv[i]
            if level == "token":
                log_w = logprobs[i, t] - old[i, t]
            elif level == "sequence":
                log_w = seq
            else:
                log_w = logprobs[i, t] - logprobs[i, t].detach() + seq.detach()
            r = torch.exp(log_w)
            if loss_type == "cispo":
                pg = -torch.clamp(r, max=eps_high).detach() * a * logprobs[i, t]
            else:
                r1 = r if delta is None else torch.clamp(r, max=delta)
                pg = -torch.min(r1 * a, torch.clamp(r, 1 - eps, 1 + eps_high) * a)
                if dual_clip is not None and a < 0:
                    pg = torch.min(pg, -dual_clip * a)
            if rho is not None:
                pg = pg * (rho[i, t] if rho.shape[1] == T else rho[i, 0])
            loss_t = pg
            if beta:
                k = _kl_ref(logprobs[i, t], ref[i, t], est)
                loss_t = loss_t + beta * (k * r if bias_kl else k)
            terms[i][t] = loss_t
    seq_sums = [sum(terms[i][t] for t in range(T) if mask[i, t]) if mask[i].any() else logprobs.new_zeros(())
                for i in range(B)]
    n_tok = int(mask.sum())
    if agg == "token-mean":
        return sum(seq_sums) / (num_items if num_items is not None else n_tok)
    if agg == "token-sum":
        return sum(seq_sums)
    if agg == "seq-mean-token-sum":
        return sum(seq_sums) / B
    if agg == "seq-mean-token-mean":
        return sum(s / max(int(mask[i].sum()), 1) for i, s in enumerate(seq_sums)) / B
    return sum(seq_sums) / (B * (T if max_len is None else max_len))


TRL_AGG = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
           "dapo": "token-mean", "cispo": "token-mean", "ppo": "token-mean"}


def _check(ours, ref, logprobs):
    torch.testing.assert_close(ours.loss, ref, **TOL)
    (g_ours,) = torch.autograd.grad(ours.loss, logprobs, retain_graph=True)
    (g_ref,) = torch.autograd.grad(ref, logprobs)
    torch.testing.assert_close(g_ours, g_ref, **TOL)
    assert torch.isfinite(g_ours).all()


ESTIMATORS = ["k1", "k2", "k3", "abs", "k1+", "k3+", "abs+"]


@pytest.mark.parametrize("agg", [None, *LOSS_AGG_MODES])
@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_type_x_aggregation_x_estimator_x_level(loss_type, level, agg):
    """The full product; the 7 KL estimators run inside each case to keep the test count readable."""
    logprobs, old, ref, _, adv, mask = _batch(seed=LOSS_TYPES.index(loss_type), per_token_adv=level == "token")
    eps_high = 5.0 if loss_type == "cispo" else 0.28
    for est in ESTIMATORS:
        ours = policy_loss(logprobs, old, adv, mask, loss_type=loss_type, importance_sampling_level=level,
                           loss_agg_mode=agg, ref_logprobs=ref, beta=0.05, kl_estimator=est, epsilon_high=eps_high)
        expected = _reference(logprobs, old, ref, adv, mask, loss_type=loss_type, level=level,
                              agg=agg or TRL_AGG[loss_type], beta=0.05, est=est, eps_high=eps_high)
        _check(ours, expected, logprobs)


@pytest.mark.parametrize("alias,canon", [("kl", "k1"), ("mse", "k2"), ("low_var_kl", "k3"), ("low_var_kl+", "k3+"),
                                         ("k2+", "k2")])
def test_verl_and_openrlhf_aliases(alias, canon):
    logprobs, old, ref, _, adv, mask = _batch(seed=4)
    a = policy_loss(logprobs, old, adv, mask, ref_logprobs=ref, beta=0.2, kl_estimator=alias)
    b = policy_loss(logprobs, old, adv, mask, ref_logprobs=ref, beta=0.2, kl_estimator=canon)
    _check(a, b.loss, logprobs)


def test_k3_orientation_is_pinned():
    """k3 = exp(ref - logp) - (ref - logp) - 1 (AgileRL's d99c1c3b swapped the arguments)."""
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-3.0, -0.5]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    out = policy_loss(logp, None, torch.zeros(1, dtype=torch.float64), mask, ref_logprobs=ref, beta=1.0,
                      loss_type="bnpo")
    d = ref - logp.detach()
    want = (torch.exp(d) - d - 1).mean()
    swapped = (torch.exp(-d) + d - 1).mean()
    torch.testing.assert_close(out.kl, want, **TOL)
    assert abs(float(out.kl) - float(swapped)) > 0.5
    (g,) = torch.autograd.grad(out.loss, logp)  # d/dlogp k3 = 1 - exp(ref - logp), halved by the mean
    torch.testing.assert_close(g, (1 - torch.exp(d)) / 2, **TOL)


def test_on_policy_grpo_gradient_is_the_reinforce_gradient():
    """old_logps=None: ratio 1, d loss / d logp_t = -A_i / (|o_i| B) (GRPO's seq-mean-token-mean)."""
    logprobs, _, _, _, adv, mask = _batch(seed=5)
    out = policy_loss(logprobs, None, adv, mask, loss_type="grpo")
    (g,) = torch.autograd.grad(out.loss, logprobs)
    want = -adv[:, None] / mask.sum(1, keepdim=True) / B * mask
    torch.testing.assert_close(g, want.to(g.dtype), **TOL)
    assert float(out.ratio_min) == float(out.ratio_max) == 1.0 and float(out.clip_fraction) == 0.0


@pytest.mark.parametrize("opts", [dict(delta=1.5), dict(dual_clip=3.0), dict(use_bias_correction_kl=True),
                                  dict(epsilon=0.1, epsilon_high=0.4, dual_clip=1.1, delta=1.2)])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_delta_dual_clip_and_bias_corrected_kl(opts, level):
    logprobs, old, ref, _, adv, mask = _batch(seed=6, spread=0.8, per_token_adv=True)
    ours = policy_loss(logprobs, old, adv, mask, loss_type="ppo", importance_sampling_level=level, ref_logprobs=ref,
                       beta=0.1, **opts)
    expected = _reference(logprobs, old, ref, adv, mask, loss_type="ppo", level=level, agg="token-mean", beta=0.1,
                          eps=opts.get("epsilon", 0.2), eps_high=opts.get("epsilon_high"), delta=opts.get("delta"),
                          dual_clip=opts.get("dual_clip"), bias_kl=opts.get("use_bias_correction_kl", False))
    _check(ours, expected, logprobs)
    if "dual_clip" in opts:  # active where A < 0 and |A| max(min(r, delta), clip(r)) > c |A|
        r = torch.exp(logprobs.detach() - old) if level == "token" else \
            torch.exp(torch.where(mask, logprobs.detach() - old, 0.0).sum(1, keepdim=True) / mask.sum(1, keepdim=True))
        r = r.expand(B, T)
        worst = torch.maximum(r.clamp(max=opts.get("delta", math.inf)),
                              r.clamp(1 - opts.get("epsilon", 0.2), 1 + opts.get("epsilon_high", 0.2)))
        want = ((adv < 0) & (worst > opts["dual_clip"]))[mask].double().mean()
        assert float(ours.dual_clip_fraction) == pytest.approx(float(want))
        assert level == "sequence" or opts["dual_clip"] > 2 or float(want) > 0  # the case is exercised


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_rollout_importance_sampling(mode, level):
    logprobs, old, ref, rollout, adv, mask = _batch(seed=7)
    lo, hi = 0.8, 1.25
    ours = policy_loss(logprobs, old, adv, mask, importance_sampling_level=level, ref_logprobs=ref, beta=0.1,
                       rollout_logprobs=rollout, vllm_importance_sampling_mode=mode,
                       vllm_importance_sampling_clip_min=lo, vllm_importance_sampling_clip_max=hi)
    diff = torch.where(mask, old - rollout, 0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(1, keepdim=True)
    rho = torch.exp(diff)
    rho = rho.clamp(lo, hi) if mode.endswith("truncate") else torch.where((rho < lo) | (rho > hi), 0.0, rho)
    expected = _reference(logprobs, old, ref, adv, mask, loss_type="dapo", level=level, agg="token-mean", beta=0.1,
                          rho=rho)
    _check(ours, expected, logprobs)
    assert ours.is_weight_min is not None and lo - 1e-12 <= float(ours.is_weight_max) <= hi + 1e-12 or \
        mode.endswith("mask")
    torch.testing.assert_close(ours.rollout_logp_diff_max, (old - rollout).abs()[mask].max())


def test_normalizers_num_items_and_max_completion_length():
    logprobs, old, ref, _, adv, mask = _batch(seed=8)
    a = policy_loss(logprobs, old, adv, mask, loss_type="dapo", num_items_in_batch=50)
    _check(a, _reference(logprobs, old, ref, adv, mask, loss_type="dapo", level="token", agg="token-mean",
                         num_items=50), logprobs)
    b = policy_loss(logprobs, old, adv, mask, loss_type="dr_grpo", max_completion_length=16)
    _check(b, _reference(logprobs, old, ref, adv, mask, loss_type="dr_grpo", level="token",
                         agg="seq-mean-token-sum-norm", max_len=16), logprobs)


def test_clamps_have_verl_semantics_and_padding_never_makes_nan():
    logprobs, old, ref, _, adv, mask = _batch(seed=9)
    far = ref.clone()
    far[mask] = far[mask] + 40.0  # exp(40) in k3 without the clamp
    out = policy_loss(logprobs, old, adv, mask, ref_logprobs=far, beta=0.1, kl_log_ratio_clamp=20.0, kl_clamp=10.0,
                      log_ratio_clamp=20.0)
    assert torch.isfinite(out.loss) and float(out.kl) == pytest.approx(10.0)
    (g,) = torch.autograd.grad(out.loss, logprobs)
    assert torch.isfinite(g).all()


def test_statistics_against_direct_counts():
    logprobs, old, ref, rollout, adv, mask = _batch(seed=10, spread=0.5)
    out = policy_loss(logprobs, old, adv, mask, epsilon_high=0.28, ref_logprobs=ref, beta=0.0)
    r = torch.exp(logprobs.detach() - old)
    a = adv[:, None].expand(B, T)
    low = ((r < 0.8) & (a < 0))[mask].double().mean()
    high = ((r > 1.28) & (a > 0))[mask].double().mean()
    assert float(out.clip_fraction_low) == pytest.approx(float(low)) and float(out.clip_fraction_high) == \
        pytest.approx(float(high))
    assert float(out.ratio_max) == pytest.approx(float(r[mask].max()))
    d = ref - logprobs.detach()
    assert float(out.kl) == pytest.approx(float((torch.exp(d) - d - 1)[mask].mean()))  # reported at beta=0 too
    assert float(out.kl_loss) == 0.0 and not out.per_token_loss[~mask].any()
    assert set(out.metrics()) >= {"loss" if False else "pg_loss", "kl", "clip_fraction", "ratio_mean"}


def test_beta_without_reference_is_a_clear_error_and_beta_zero_needs_none():
    logprobs, old, _, _, adv, mask = _batch()
    with pytest.raises(ConfigError, match="ref_logprobs is None.*beta=0.0") as err:
        policy_loss(logprobs, old, adv, mask, beta=0.04)
    # the method the message names must exist on the Reference protocol (it once said Reference.logps)
    from refmodel.reference import Reference

    named = re.search(r"reference\.(\w+)\(", str(err.value), flags=re.IGNORECASE)
    assert named is not None and callable(getattr(Reference, named.group(1), None)), str(err.value)
    out = policy_loss(logprobs, old, adv, mask, beta=0.0)
    assert out.kl is None and out.seq_kl is None
    with pytest.raises(ConfigError, match="full_kl"):
        policy_loss(logprobs, old, adv, mask, beta=0.04, kl_estimator="full")


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_type="gspo"), "unknown loss_type"),
    (dict(loss_type="cispo"), "absolute"),
    (dict(loss_type="cispo", epsilon_high=5.0, dual_clip=3.0), "cispo"),
    (dict(importance_sampling_level="trajectory"), "importance_sampling_level"),
    (dict(loss_agg_mode="mean"), "loss_agg_mode"),
    (dict(dual_clip=0.9), "dual_clip"),
    (dict(delta=1.0), "delta"),
    (dict(epsilon=-0.1), "epsilon"),
    (dict(kl_estimator="k4"), "unknown KL estimator"),
    (dict(vllm_importance_sampling_mode="tis"), "vllm_importance_sampling_mode"),
    (dict(kl_estimator="full", use_bias_correction_kl=True), "full"),
])
def test_bad_options(kwargs, match):
    logprobs, old, ref, _, adv, mask = _batch()
    with pytest.raises(InvalidInput, match=match):
        policy_loss(logprobs, old, adv, mask, ref_logprobs=ref, **kwargs)


def test_bad_shapes():
    logprobs, old, ref, _, adv, mask = _batch()
    with pytest.raises(InvalidInput, match="old_logprobs"):
        policy_loss(logprobs, old[:, :3], adv, mask)
    with pytest.raises(InvalidInput, match="advantages"):
        policy_loss(logprobs, old, adv[:2], mask)
    with pytest.raises(InvalidInput, match="mask"):
        policy_loss(logprobs, old, adv, mask[:, 1:])


def test_full_kl_enters_with_its_gradient():
    logprobs, old, _, _, adv, mask = _batch(seed=11)
    full = (logprobs * 0.5).exp()  # any differentiable [B, T] stands in for kl.exact here
    out = policy_loss(logprobs, old, adv, mask, beta=0.2, kl_estimator="full", full_kl=full)
    base = policy_loss(logprobs, old, adv, mask)
    extra = 0.2 * (full * mask).sum() / mask.sum()
    torch.testing.assert_close(out.loss, base.loss + extra, **TOL)


def test_controllers_as_beta_in_both_placements():
    logprobs, old, ref, _, adv, mask = _batch(seed=12)
    fixed = FixedKLController(0.1)
    a = policy_loss(logprobs, old, adv, mask, ref_logprobs=ref, beta=fixed)
    b = policy_loss(logprobs, old, adv, mask, ref_logprobs=ref, beta=0.1)
    torch.testing.assert_close(a.loss, b.loss, **TOL)
    assert fixed.update(a.kl, n_steps=4) == 0.1
    ctl = AdaptiveKLController(0.1, target=1e-6, horizon=10)
    c = policy_loss(logprobs, old, adv, mask, ref_logprobs=ref, beta=ctl)
    new = ctl.update(c.kl, n_steps=1)  # KL far above target: +20 % / horizon
    assert new == pytest.approx(0.1 * (1 + 0.2 / 10))
    r = kl_penalized_rewards(torch.ones(B, dtype=torch.float64), old, ref, mask, ctl, "k1")
    assert r.kl_coef == new
    with pytest.raises(InvalidInput, match="non-finite"):
        ctl.update(float("nan"), 1)


def test_kl_penalized_rewards_sequence_and_token():
    _, old, ref, _, _, mask = _batch(seed=13)
    scores = torch.tensor([1.0, 0.0, 2.0, -1.0], dtype=torch.float64)
    out = kl_penalized_rewards(scores, old, ref, mask, 0.05, "k1")
    k1 = torch.where(mask, old - ref, 0.0)
    torch.testing.assert_close(out.rewards, scores - 0.05 * k1.sum(1), **TOL)
    torch.testing.assert_close(out.kl, k1.sum(1) / mask.sum(1), **TOL)
    tok = torch.zeros(B, T, dtype=torch.float64)
    tok[:, -1] = scores
    out_t = kl_penalized_rewards(tok, old, ref, mask, 0.05, "low_var_kl")
    d = torch.where(mask, ref - old, 0.0)
    torch.testing.assert_close(out_t.rewards, torch.where(mask, tok - 0.05 * (torch.exp(d) - d - 1), 0.0), **TOL)
    assert all(math.isfinite(x) for x in out_t.rewards.flatten().tolist())
    with pytest.raises(InvalidInput, match="rewards"):
        kl_penalized_rewards(scores[:2], old, ref, mask, 0.05)
