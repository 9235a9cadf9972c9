"""Synced for RL: a hard reset every N steps (ProRL) and a per-epoch copy (AgileRL), full and PEFT;
every sync makes the reference equal the policy and changes the fingerprint."""

from __future__ import annotations

import copy

import pytest
import torch
from ref_helpers import make_batch

from refmodel import model_logprobs
from refmodel.reference import Synced
from refmodel.testing.lora import lora_policy, perturb_adapter


def _nudge_full(policy, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def _policy_lp(policy, batch):
    policy.eval()
    with torch.no_grad():
        return model_logprobs(policy, *batch)


@pytest.mark.parametrize("peft", [False, True])
def test_hard_reset_every_n_steps(tiny_model_dirs, peft):
    from refmodel.testing import load_tiny

    base, tok = load_tiny(tiny_model_dirs["llama"])
    policy = lora_policy(base) if peft else copy.deepcopy(base)
    ref = Synced.hard_reset(policy, ref_reset_steps=2)
    batch = make_batch(tok, n=3)
    fp0, lp0 = ref.fingerprint, ref.logprobs(*batch)
    (perturb_adapter(policy, seed=5) if peft else _nudge_full(policy, 5))
    ref.on_step(1, policy)  # not yet
    assert ref.fingerprint == fp0 and torch.equal(ref.logprobs(*batch), lp0)
    ref.on_step(2, policy)  # reset: ref <- policy
    assert ref.syncs == 1 and ref.fingerprint != fp0
    torch.testing.assert_close(ref.logprobs(*batch), _policy_lp(policy, batch), atol=1e-6, rtol=0)


@pytest.mark.parametrize("peft", [False, True])
def test_per_epoch_copy(tiny_model_dirs, peft):
    from refmodel.testing import load_tiny

    base, tok = load_tiny(tiny_model_dirs["llama"])
    policy = lora_policy(base) if peft else copy.deepcopy(base)
    ref = Synced.per_epoch(policy)
    batch = make_batch(tok, n=3)
    fp0 = ref.fingerprint
    (perturb_adapter(policy, seed=6) if peft else _nudge_full(policy, 6))
    for step in range(1, 5):
        ref.on_step(step, policy)  # steps never sync a per-epoch reference
    assert ref.syncs == 0 and ref.fingerprint == fp0
    ref.on_epoch_end(1, policy)
    assert ref.syncs == 1 and ref.fingerprint != fp0
    torch.testing.assert_close(ref.logprobs(*batch), _policy_lp(policy, batch), atol=1e-6, rtol=0)
