"""Group-relative, RLOO and GAE advantages against direct per-element computations (float64)."""

from __future__ import annotations

import statistics

import pytest
import torch

from refmodel.errors import InvalidInput
from refmodel.losses import gae_advantages, group_advantages, rloo_advantages

REWARDS = torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0, 3.0, 3.0, 0.0, 1.0], dtype=torch.float64)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages(scale):
    G = 3
    out = group_advantages(REWARDS, G, scale=scale)
    values = REWARDS.tolist()
    for i, r in enumerate(values):
        group = values[i // G * G: i // G * G + G]
        centred = r - statistics.fmean(group)
        std = {"group": statistics.stdev(group), "batch": statistics.stdev(values), "none": None}[scale]
        assert float(out[i]) == pytest.approx(centred if std is None else centred / (std + 1e-4), rel=1e-12)


def test_group_of_one_and_constant_groups_are_finite():
    assert torch.equal(group_advantages(REWARDS, 1), torch.zeros_like(REWARDS))
    same = torch.ones(6, dtype=torch.float64)
    assert torch.equal(group_advantages(same, 3), torch.zeros(6, dtype=torch.float64))


def test_rloo_leave_one_out():
    G = 3
    out = rloo_advantages(REWARDS, G)
    values = REWARDS.tolist()
    for i, r in enumerate(values):
        group = values[i // G * G: i // G * G + G]
        others = [x for j, x in enumerate(group) if j != i % G]
        assert float(out[i]) == pytest.approx(r - statistics.fmean(others), rel=1e-12)


@pytest.mark.parametrize("fn,args,match", [
    (group_advantages, (REWARDS, 4), "multiple"),
    (group_advantages, (REWARDS, 0), "group_size"),
    (rloo_advantages, (REWARDS, 1), "group_size"),
    (group_advantages, (REWARDS.view(3, 3), 3), r"\[B\]"),
])
def test_bad_input(fn, args, match):
    with pytest.raises(InvalidInput, match=match):
        fn(*args)
    with pytest.raises(InvalidInput, match="scale"):
        group_advantages(REWARDS, 3, scale="std")


def _gae_loop(rewards, values, mask, gamma, lam):
    """The textbook recursion over each sequence's *masked* positions only."""
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
        last, next_v = 0.0, 0.0
        for t in reversed(idx):
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            last = delta + gamma * lam * last
            adv[b, t] = last
            next_v = float(values[b, t])
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_gae_matches_the_recursion_with_holes_in_the_mask(gamma, lam):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(3, 7, generator=g, dtype=torch.float64)
    values = torch.randn(3, 7, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, 2] = False  # e.g. a tool-output token inside the completion
    mask[2, :3] = False
    out = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    want = _gae_loop(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(out.advantages, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.returns, torch.where(mask, want + values, 0.0), rtol=1e-12, atol=1e-12)
    white = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam, whiten=True).advantages
    assert float(white[mask].mean()) == pytest.approx(0.0, abs=1e-12)
    assert float(white[mask].std()) == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(InvalidInput, match="gamma"):
        gae_advantages(rewards, values, mask, gamma=1.5)
