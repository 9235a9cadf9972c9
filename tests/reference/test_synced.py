"""TR-DPO: ``ref <- alpha * policy + (1 - alpha) * ref`` every N steps, for full and LoRA policies.

Tolerances: the full update is one fp32 ``mul_``/``add_`` per element, checked against the formula
written independently (rtol 1e-6, i.e. a few fp32 ulps). The LoRA reference is compared with a
full (merged) model updated by the same rule: 1e-5 nats for hard sync and for unbounded rank
(same math, different summation order); with ``max_rank`` the delta of each layer must be the best
rank-k approximation of the exact rule's delta (Eckart-Young, checked to 0.1% relative); that relative
Frobenius error is what ``max_truncation_error`` reports. How far log-probs move for a given error
depends on the model, so no log-prob bound is promised for truncated syncs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from ref_helpers import make_batch

from refmodel import model_logprobs
from refmodel.errors import ConfigError
from refmodel.reference import Synced
from refmodel.reference.peft_policy import lora_layers
from refmodel.testing.lora import lora_policy, perturb_adapter


@pytest.fixture
def batch(tiny):
    """4 right-padded prompt+chosen rows of the built-in data; completion scored (see ref_helpers)."""
    return make_batch(tiny[1])



def _move(policy, seed):
    """Stand-in for an optimizer step: every trainable parameter moves by random noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("alpha", [0.6, 1.0])
def test_full_update_equals_formula_on_every_parameter(tiny, alpha):
    model, _ = tiny
    policy = copy.deepcopy(model)
    ref = Synced(policy, ref_model_sync_steps=2, ref_model_mixup_alpha=alpha)
    _move(policy, 1)
    start = {n: p.detach().clone() for n, p in ref.frozen.model.named_parameters()}
    fp0 = ref.fingerprint
    ref.on_step(1, policy)  # not a sync step
    assert all(torch.equal(p, start[n]) for n, p in ref.frozen.model.named_parameters())
    ref.on_step(2, policy)
    ref.on_step(2, policy)  # the same step twice syncs once
    pol = dict(policy.named_parameters())
    for n, p in ref.frozen.model.named_parameters():
        want = alpha * pol[n].detach() + (1 - alpha) * start[n]
        if alpha == 1.0:
            assert torch.equal(p, pol[n].detach()), n
        else:
            torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-7, msg=n)
        assert not p.requires_grad and p.grad is None
    assert ref.syncs == 1 and ref.fingerprint != fp0


def _twins(model, alpha, max_rank=None):
    """A LoRA policy with its Synced reference, and a merged full copy with its own Synced reference."""
    policy = lora_policy(model, modules_to_save=["lm_head"] if hasattr(model, "lm_head") else None)
    lora_ref = Synced(policy, ref_model_sync_steps=1, ref_model_mixup_alpha=alpha, max_rank=max_rank)
    full_ref = Synced(copy.deepcopy(policy).merge_and_unload(), ref_model_sync_steps=1, ref_model_mixup_alpha=alpha)
    return policy, lora_ref, full_ref


def _sync_both(policy, lora_ref, full_ref, steps):
    for step in range(1, steps + 1):
        _move(policy, step)
        lora_ref.on_step(step, policy)
        full_ref.on_step(step, copy.deepcopy(policy).merge_and_unload())


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_lora_sync_matches_full_model_rule(family, tiny, batch, alpha):
    model, _ = tiny
    # float64 weights: merging W0 + s*B@A into fp32 rounds every weight (~6e-8 relative), which on
    # llama's ~6-nat log-probs is ~1e-5 by itself; in float64 any gap left is the update rule's own.
    policy, lora_ref, full_ref = _twins(model.double(), alpha)
    _sync_both(policy, lora_ref, full_ref, 3)
    torch.testing.assert_close(lora_ref.logprobs(*batch), full_ref.logprobs(*batch), atol=1e-5, rtol=0)
    r = policy.peft_config["default"].r
    assert lora_ref.lora.rank == (r if alpha == 1.0 else 4 * r)  # concatenation: r per soft sync
    assert lora_ref.max_truncation_error == 0.0
    assert policy.active_adapter == "default"
    assert not any(p.requires_grad for n, p in policy.named_parameters() if ".ref." in n)
    with torch.no_grad():  # right after a hard sync the reference *is* the policy; a soft one lags behind
        gap = (model_logprobs(policy.eval(), *batch) - lora_ref.logprobs(*batch)).abs().max()
    assert gap == 0 if alpha == 1.0 else gap > 1e-3


def test_lora_hard_sync_copies_bit_for_bit(tiny):
    policy, lora_ref, _ = _twins(tiny[0], 1.0)
    _move(policy, 5)
    lora_ref.on_step(1, policy)
    for _, layer in lora_layers(policy):
        assert torch.equal(layer.lora_A["ref"].weight, layer.lora_A["default"].weight)
        assert torch.equal(layer.lora_B["ref"].weight, layer.lora_B["default"].weight)
        assert layer.scaling["ref"] == layer.scaling["default"]


def test_lora_max_rank_is_best_rank_k(tiny, batch):
    model, _ = tiny
    if not hasattr(model, "lm_head") or model.config.model_type != "llama":
        pytest.skip("weight-level check on llama only (the rule is family-independent; gpt2 Conv1D is transposed)")
    k = 6
    policy, bounded, full_ref = _twins(model, 0.6, max_rank=k)
    # One soft sync (rank 4 + 4 -> 6): after several, each truncation builds on the last, so only the
    # first is comparable with the exact rule's optimum.
    _sync_both(policy, bounded, full_ref, 1)
    assert bounded.lora.rank == k
    base = {n: m for n, m in model.named_modules()}
    full_params = dict(full_ref.frozen.model.named_modules())
    worst = 0.0
    for name, layer in lora_layers(policy):
        if "ref" not in layer.lora_A:
            continue
        plain = name.removeprefix("model.") if name.startswith("model.model") else name
        want = full_params[plain].weight - base[plain].weight  # exact rule on the full model
        got = layer.scaling["ref"] * layer.lora_B["ref"].weight @ layer.lora_A["ref"].weight
        s = torch.linalg.svdvals(want.detach().double())
        best = float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())  # Eckart-Young optimum
        err = float((got.double() - want.double()).norm() / want.double().norm())
        assert err == pytest.approx(best, rel=1e-3, abs=1e-5), name
        worst = max(worst, err)
    assert bounded.max_truncation_error == pytest.approx(worst, rel=1e-3, abs=1e-5)
    assert worst > 1e-3  # the bound really truncated something
    gap = (bounded.logprobs(*batch) - full_ref.logprobs(*batch)).abs().max()
    print(f"max_rank={k}: relative delta error {worst:.4f}, log-prob gap {float(gap):.4f} nats")


def test_lora_max_rank_not_reached_is_exact(tiny, batch):
    model = tiny[0].double()  # float64 for the same reason as above
    policy, bounded, full_ref = _twins(model, 0.6, max_rank=8)  # rank 4 + 4 fits: no truncation
    _sync_both(policy, bounded, full_ref, 1)
    assert bounded.lora.rank == 8 and bounded.max_truncation_error == 0.0
    torch.testing.assert_close(bounded.logprobs(*batch), full_ref.logprobs(*batch), atol=1e-5, rtol=0)


def test_lora_sync_refusals(tiny):
    model, _ = tiny
    with pytest.raises(ConfigError, match="DoRA"):
        Synced(lora_policy(model, use_dora=True))
    policy = lora_policy(model)
    Synced(policy)
    with pytest.raises(ConfigError, match="already has an adapter named 'ref'.*AdapterDisabled"):
        Synced(policy)
    with pytest.raises(ConfigError, match="max_rank bounds a LoRA"):
        Synced(copy.deepcopy(model), max_rank=4)
    with pytest.raises(ConfigError, match="same policy object"):
        Synced(lora_policy(model), ref_model_sync_steps=1).on_step(1, lora_policy(model))
    for bad in (dict(ref_model_mixup_alpha=0.0), dict(ref_model_mixup_alpha=1.5), dict(ref_model_sync_steps=0)):
        with pytest.raises(ConfigError, match="must be"):
            Synced(copy.deepcopy(model), **bad)


def test_lora_reference_memory_grows_with_rank(tiny):
    policy = lora_policy(tiny[0])
    ref = Synced(policy, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5)
    first = ref.memory_bytes
    perturb_adapter(policy, seed=3)
    ref.on_step(1, policy)
    assert ref.memory_bytes == 2 * first > 0
