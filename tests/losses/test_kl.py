"""KL estimators against the exact KL of small categoricals, their gradients, masks, monitor, controller."""

from __future__ import annotations

import logging

import pytest
import torch

from refmodel.errors import InvalidInput
from refmodel.losses.kl import AdaptiveKLController, KLMonitor, estimate

N = 200_000


def _categoricals(seed, spread):
    g = torch.Generator().manual_seed(seed)
    q = torch.softmax(spread * torch.randn(6, generator=g, dtype=torch.float64), 0)
    p = torch.softmax(spread * torch.randn(6, generator=g, dtype=torch.float64), 0)
    x = torch.multinomial(q, N, replacement=True, generator=g)
    return q, p, q.log()[x], p.log()[x]


@pytest.mark.parametrize("seed,spread", [(0, 0.5), (1, 1.0), (2, 1.5)])
@pytest.mark.parametrize("estimator", ["k1", "k3", "k1+", "k3+"])
def test_unbiased_estimators_match_exact_kl(seed, spread, estimator):
    q, p, logq, logp = _categoricals(seed, spread)
    exact = (q * (q / p).log()).sum().item()
    samples = estimate(logq, logp, estimator)
    # Tolerance: 5 standard errors of the Monte Carlo mean (sample std / sqrt(N)); a false failure
    # has probability ~6e-7.
    tol = 5 * samples.std().item() / N**0.5
    assert abs(samples.mean().item() - exact) < tol, (samples.mean().item(), exact, tol)


@pytest.mark.parametrize("seed,spread", [(0, 0.5), (1, 1.0)])
def test_k2_matches_its_expectation_and_is_close_for_near_distributions(seed, spread):
    q, p, logq, logp = _categoricals(seed, spread)
    log_ratio = (q / p).log()
    expected_k2 = (q * 0.5 * log_ratio**2).sum().item()
    samples = estimate(logq, logp, "k2")
    assert abs(samples.mean().item() - expected_k2) < 5 * samples.std().item() / N**0.5
    assert (samples >= 0).all() and (estimate(logq, logp, "k3") >= 0).all()
    exact = (q * log_ratio).sum().item()
    if spread == 0.5:  # k2's bias is third order in the log-ratio: small when q ~ p
        assert abs(expected_k2 - exact) / exact < 0.15


def test_k3_has_lower_variance_than_k1():
    _, _, logq, logp = _categoricals(1, 1.0)
    assert estimate(logq, logp, "k3").std() < estimate(logq, logp, "k1").std()


@pytest.mark.parametrize("estimator", ["k1+", "k3+"])
def test_plus_variants_have_k2_gradient_and_own_value(estimator):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 9, 11, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (4, 9), generator=g)
    ref = torch.log_softmax(torch.randn(4, 9, 11, generator=g, dtype=torch.float64), -1).gather(-1, ids[..., None])[..., 0]

    def grad_of(name):
        logprobs = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
        value = estimate(logprobs, ref, name, reduction="sequence")
        (grad,) = torch.autograd.grad(value.sum(), logits)
        return value.detach(), grad

    value_plus, grad_plus = grad_of(estimator)
    value_base, grad_base = grad_of(estimator[:2])
    _, grad_k2 = grad_of("k2")
    torch.testing.assert_close(value_plus, value_base)
    torch.testing.assert_close(grad_plus, grad_k2, rtol=0, atol=1e-12)
    assert not torch.allclose(grad_base, grad_k2)


def test_masks_and_reductions():
    logprobs = torch.tensor([[0.0, -1.0, -2.0, -0.5], [0.0, -0.3, -4.0, -1.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, 9.0], [0.0, -0.3, -3.0, -2.0]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    naive = logprobs - ref  # k1 by hand
    tok = estimate(logprobs, ref, "k1", mask=mask)
    torch.testing.assert_close(tok, naive * mask)
    torch.testing.assert_close(estimate(logprobs, ref, "k1", mask=mask, reduction="sequence"), (naive * mask).sum(1))
    assert estimate(logprobs, ref, "k1", mask=mask, reduction="batch").item() == pytest.approx(
        (naive * mask).sum().item() / 5)
    # an extreme value outside the mask (ref 9.0 -> k3 = e^9.5) must not leak into any reduction
    assert estimate(logprobs, ref, "k3", mask=mask, reduction="batch").item() < 2
    assert estimate(logprobs, ref, "k2", reduction="batch").item() == pytest.approx(
        (0.5 * naive**2).mean().item())


def test_estimate_rejects_bad_input():
    x = torch.zeros(2, 3)
    with pytest.raises(InvalidInput, match=r"expected one of \['k1', 'k2', 'k3', 'abs', 'k1\+', 'k3\+', 'abs\+'\]"):
        estimate(x, x, "k4")
    with pytest.raises(InvalidInput, match="reduction"):
        estimate(x, x, reduction="mean")
    with pytest.raises(InvalidInput, match="same shape"):
        estimate(x, torch.zeros(2, 4))
    with pytest.raises(InvalidInput, match="mask must have the shape"):
        estimate(x, x, mask=torch.ones(3, 2))


def test_monitor_statistics_and_single_warning(caplog):
    mon = KLMonitor(threshold=1.0)
    values = [0.1, 0.5, 2.0, 3.0, 0.2]
    with caplog.at_level(logging.WARNING, logger="refmodel.losses.kl"):
        for step, v in enumerate(values):
            mon.update(torch.tensor(v, dtype=torch.float64) if step % 2 else v, step=10 * step)
    warnings = [r for r in caplog.records if "exceeds the threshold" in r.getMessage()]
    assert len(warnings) == 1
    assert "raise beta" in warnings[0].getMessage() and "lower the learning rate" in warnings[0].getMessage()
    assert "step 20" in warnings[0].getMessage()
    reference = torch.tensor(values, dtype=torch.float64)
    assert mon.mean == pytest.approx(reference.mean().item())
    assert mon.std == pytest.approx(reference.std().item())
    assert (mon.min, mon.max, mon.last) == (0.1, 3.0, 0.2)
    assert mon.history[2] == (20, 2.0)
    with pytest.raises(InvalidInput, match="threshold"):
        KLMonitor(threshold=-1)


def test_adaptive_controller():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    ctl.update(current_kl=12.0, n_steps=256)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10_000))
    before = ctl.value
    ctl.update(current_kl=4.5, n_steps=100)  # error -0.25 -> clipped to -0.2
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 100 / 10_000))
    ctl.update(current_kl=6.0, n_steps=100)  # at target: unchanged
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 100 / 10_000))
    with pytest.raises(InvalidInput, match="target"):
        AdaptiveKLController(0.1, target=0, horizon=10)
