"""Losses against hand-derived values (plain Python floats) and against TRL's own loss functions."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from refmodel.errors import InvalidInput
from refmodel.losses.preference import dpo, kto, orpo, simpo


def sig(x):
    return 1 / (1 + math.exp(-x))


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# One pair worked by hand: h = (-1 - -2) - (-3 - -2) = 2; beta = 0.5 -> beta h = 1.
PC, PR, RC, RR = t(-1.0), t(-3.0), t(-2.0), t(-2.0)


@pytest.mark.parametrize("loss_type,eps,expected", [
    ("sigmoid", 0.0, math.log(1 + math.exp(-1))),                        # -log sig(1) = 0.313262
    ("sigmoid", 0.2, 0.8 * math.log(1 + math.exp(-1)) + 0.2 * math.log(1 + math.exp(1))),
    ("hinge", 0.0, 0.0),                                                  # max(0, 1 - 1)
    ("ipo", 0.0, (2 - 1 / (2 * 0.5)) ** 2),                               # (2 - 1)^2 = 1
    ("robust", 0.2, (-0.8 * math.log(sig(1)) + 0.2 * math.log(sig(-1))) / 0.6),
])
def test_dpo_hand_derived(loss_type, eps, expected):
    out = dpo(PC, PR, RC, RR, beta=0.5, loss_type=loss_type, label_smoothing=eps)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.5)      # beta * (-1 - -2)
    assert out.rejected_rewards.item() == pytest.approx(-0.5)   # beta * (-3 - -2)
    assert out.margin.item() == pytest.approx(1.0)
    assert out.accuracy.item() == 1.0


def test_ipo_length_normalised():
    # chosen ratio 1 over 4 tokens, rejected ratio -1 over 2 tokens: h = 0.25 + 0.5 = 0.75
    out = dpo(PC, PR, RC, RR, beta=0.5, loss_type="ipo", chosen_lengths=t(4), rejected_lengths=t(2))
    assert out.loss.item() == pytest.approx((0.75 - 1) ** 2)


def test_dpo_gradient_sign_and_mean():
    pc = torch.tensor([-5.0, -2.0, -7.0], requires_grad=True)
    out = dpo(pc, t(-4.0, -6.0, -1.0).float(), t(-5.0, -3.0, -6.0).float(), t(-4.0, -5.0, -2.0).float())
    out.loss.backward()
    assert (pc.grad < 0).all()  # raising the chosen log-prob lowers the loss
    assert out.loss.item() == pytest.approx(out.losses.mean().item())
    assert out.accuracy.item() == pytest.approx(1 / 3)  # ratios (0 vs 0), (1 vs -1), (-1 vs 1)


def _trl_stub(**kw):
    return SimpleNamespace(accelerator=SimpleNamespace(device="cpu"), **kw)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0), ("ipo", 0.0)])
def test_dpo_matches_trl_cpo_loss_with_zero_reference(loss_type, eps):
    """TRL's CPO loss is DPO's formula with the reference log-probs at 0: call it directly."""
    cpo = pytest.importorskip("trl.experimental.cpo").CPOTrainer
    g = torch.Generator().manual_seed(1)
    pc, pr = -10 * torch.rand(7, generator=g), -10 * torch.rand(7, generator=g)
    stub = _trl_stub(alpha=0.0, loss_type=loss_type, beta=0.3, label_smoothing=eps, simpo_gamma=0.5)
    losses, chosen_rewards, rejected_rewards = cpo.cpo_loss(stub, pc, pr)
    zero = torch.zeros(7)
    ours = dpo(pc, pr, zero, zero, beta=0.3, loss_type=loss_type, label_smoothing=eps)
    torch.testing.assert_close(ours.losses, losses)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards)


def test_simpo_matches_trl_and_hand():
    cpo = pytest.importorskip("trl.experimental.cpo").CPOTrainer
    pc, pr, lc, lr = t(-6.0, -3.0), t(-4.0, -9.0), t(3, 2), t(2, 3)
    out = simpo(pc, pr, chosen_lengths=lc, rejected_lengths=lr, beta=2.0, gamma=0.5)
    # pair 1: 2*(-2) - 2*(-2) - 0.5 = -0.5 ; pair 2: 2*(-1.5) - 2*(-3) - 0.5 = 2.5
    hand = [-math.log(sig(-0.5)), -math.log(sig(2.5))]
    torch.testing.assert_close(out.losses, t(*hand))
    stub = _trl_stub(alpha=0.0, loss_type="simpo", beta=2.0, label_smoothing=0.0, simpo_gamma=0.5)
    losses, cr, rr = cpo.cpo_loss(stub, pc / lc, pr / lr)  # TRL averages log-probs before the loss
    torch.testing.assert_close(out.losses, losses)
    torch.testing.assert_close(out.chosen_rewards, cr)
    assert out.accuracy.item() == 0.5


def test_orpo_matches_trl_and_hand():
    orpo_trainer = pytest.importorskip("trl.experimental.orpo").ORPOTrainer
    pc, pr, lc, lr = t(-2.0, -9.0), t(-6.0, -1.0), t(4, 3), t(3, 2)
    out = orpo(pc, pr, chosen_lengths=lc, rejected_lengths=lr, beta=0.25)
    a, b = -0.5, -2.0  # pair 1 averages
    log_odds = (a - b) - (math.log(1 - math.exp(a)) - math.log(1 - math.exp(b)))
    assert out.losses[0].item() == pytest.approx(-0.25 * math.log(sig(log_odds)), rel=1e-12)
    nll = (2 + 9) / 7  # token-weighted chosen NLL
    assert out.metrics["nll_loss"].item() == pytest.approx(nll)
    assert out.loss.item() == pytest.approx(nll + out.losses.mean().item())
    trl_losses, cr, rr, _, _ = orpo_trainer.odds_ratio_loss(_trl_stub(beta=0.25), pc / lc, pr / lr)
    torch.testing.assert_close(out.losses.float(), -trl_losses)  # TRL returns beta*logsigmoid, subtracted later
    torch.testing.assert_close(out.chosen_rewards.float(), cr)
    torch.testing.assert_close(out.rejected_rewards.float(), rr)


def test_kto_hand_derived():
    # z0 from mismatched pairs: mean([-1 - -2, -3 - -3]) = 0.5
    out = kto(t(-1.0), t(-4.0, -2.0), t(-2.0), t(-3.0, -3.0), policy_kl_logps=t(-1.0, -3.0),
              ref_kl_logps=t(-2.0, -3.0), beta=1.0, desirable_weight=2.0)
    expected = [2 * (1 - sig(1 - 0.5)), 1 - sig(0.5 - (-1)), 1 - sig(0.5 - 1)]
    torch.testing.assert_close(out.losses, t(*expected))
    assert out.metrics["kl"].item() == pytest.approx(0.5)
    assert out.accuracy.item() == pytest.approx(0.5)  # 1 > -1 but not 1 > 1
    assert out.margin.item() == pytest.approx(1.0 - 0.0)


def test_kto_kl_clamped_and_detached():
    pk = torch.tensor([-5.0], requires_grad=True)
    out = kto(t(-1.0).float(), t(-1.0).float(), t(-1.0).float(), t(-1.0).float(), policy_kl_logps=pk,
              ref_kl_logps=torch.tensor([0.0]))
    assert out.metrics["kl"].item() == 0.0
    assert not out.loss.requires_grad


@pytest.mark.parametrize("kwargs,match", [
    (dict(beta=0.0), "beta must be a finite number > 0"),
    (dict(beta=float("nan")), "beta must be"),
    (dict(loss_type="dpo"), r"expected one of \['sigmoid', 'ipo', 'hinge', 'robust'\]"),
    (dict(loss_type="robust", label_smoothing=0.5), r"\[0, 0.5\) for 'robust'"),
    (dict(loss_type="hinge", label_smoothing=0.1), "0 for 'ipo' and 'hinge'"),
])
def test_dpo_rejects_bad_arguments(kwargs, match):
    with pytest.raises(InvalidInput, match=match):
        dpo(PC, PR, RC, RR, **kwargs)


def test_shape_checks():
    with pytest.raises(InvalidInput, match="same shape"):
        dpo(t(-1.0, -2.0), PR, RC, RR)
    with pytest.raises(InvalidInput, match="1-D"):
        dpo(torch.zeros(2, 3), PR, RC, RR)
    with pytest.raises(InvalidInput, match="chosen_lengths must be > 0"):
        simpo(PC, PR, chosen_lengths=t(0), rejected_lengths=t(1))
    with pytest.raises(InvalidInput, match="log-probs < 0"):
        orpo(t(0.0), PR, chosen_lengths=t(1), rejected_lengths=t(1))
    with pytest.raises(InvalidInput, match="at least one"):
        kto(t(), t(), t(), t())
