"""KL estimators between the policy and the reference, a KL monitor and an adaptive KL controller.

With tokens sampled from the policy ``q`` and ``log r = log p_ref - log q`` per token, Schulman's
"Approximating KL Divergence" (2020) estimators of ``KL(q || p_ref)`` are:

- ``k1 = -log r``: unbiased, high variance, can be negative.
- ``k2 = (log r)^2 / 2``: biased (low bias when q and p_ref are close), low variance, >= 0.
- ``k3 = (r - 1) - log r``: unbiased, low variance, >= 0 (the GRPO/verl ``low_var_kl``).

Used as a *loss*, the gradient of k3 (and of k1, whose expected gradient is 0) is not the gradient of
the KL; the gradient of k2 is (on-policy). The ``k1+`` and ``k3+`` variants report the value of k1/k3
but carry k2's gradient (straight-through: ``value + k2 - k2.detach()``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from ..errors import InvalidInput

log = logging.getLogger(__name__)

ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3", "k1+", "k3+")
REDUCTIONS: tuple[str, ...] = ("token", "sequence", "batch")


def _per_token(log_ratio: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate from ``log_ratio = log q - log p_ref`` (the policy's log-ratio)."""
    k2 = 0.5 * log_ratio**2
    if estimator == "k2":
        return k2
    if estimator.startswith("k1"):
        value = log_ratio
    else:  # k3 = (r - 1) - log r with log r = -log_ratio; expm1 keeps it exact near 0
        value = torch.expm1(-log_ratio) + log_ratio
    if estimator.endswith("+"):
        return value.detach() + (k2 - k2.detach())
    return value


def estimate(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    estimator: str = "k3",
    mask: torch.Tensor | None = None,
    reduction: str = "token",
) -> torch.Tensor:
    """Estimate ``KL(policy || reference)`` from log-probs of tokens sampled from the policy.

    Args:
        logps, ref_logps: ``[B, T]`` (or any equal shape) per-token log-probs (nats) of the policy and
            the reference at the same tokens.
        estimator: one of ``k1, k2, k3, k1+, k3+`` (see module docstring).
        mask: bool/0-1 tensor of the same shape; positions outside it count as 0 and are left out of
            the ``batch`` mean. ``None`` counts every position.
        reduction: ``token`` -> per-token ``[B, T]`` (zeros outside the mask); ``sequence`` -> ``[B]``,
            the sum over each sequence's tokens (the KL of the whole completion); ``batch`` -> scalar,
            the mean over all masked tokens of the batch (per-token KL).
    Returns:
        float tensor in nats with the gradient w.r.t. ``logps`` that the estimator implies.
    """
    if estimator not in ESTIMATORS:
        raise InvalidInput(f"unknown KL estimator {estimator!r}; expected one of {list(ESTIMATORS)}")
    if reduction not in REDUCTIONS:
        raise InvalidInput(f"unknown reduction {reduction!r}; expected one of {list(REDUCTIONS)}")
    if not isinstance(logps, torch.Tensor) or not isinstance(ref_logps, torch.Tensor):
        raise InvalidInput("logps and ref_logps must be tensors")
    if logps.shape != ref_logps.shape:
        raise InvalidInput(f"logps {tuple(logps.shape)} and ref_logps {tuple(ref_logps.shape)} must have the "
                           "same shape")
    if reduction == "sequence" and logps.dim() < 1:
        raise InvalidInput("reduction='sequence' needs at least a [B, T] (or [T]) tensor")
    log_ratio = logps.float() - ref_logps.float()
    kl = _per_token(log_ratio, estimator)
    if mask is not None:
        if mask.shape != logps.shape:
            raise InvalidInput(f"mask must have the shape of logps {tuple(logps.shape)}, got {tuple(mask.shape)}")
        mask = mask.bool()
        kl = torch.where(mask, kl, kl.new_zeros(()))
    if reduction == "token":
        return kl
    if reduction == "sequence":
        return kl.sum(-1)
    count = mask.sum() if mask is not None else torch.tensor(kl.numel(), device=kl.device)
    return kl.sum() / count.clamp(min=1)


@dataclass
class KLMonitor:
    """Running statistics of a KL time series, with a one-time warning above ``threshold`` (nats).

    Call :meth:`update` once per step with the step's KL (a float or a scalar tensor). ``history``
    holds ``(step, kl)`` pairs for plots; ``mean``/``std`` are Welford running statistics.
    """

    threshold: float | None = None
    name: str = "kl"
    history: list[tuple[int, float]] = field(default_factory=list)
    count: int = 0
    mean: float = 0.0
    _m2: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    warned: bool = False

    def __post_init__(self):
        if self.threshold is not None and not (self.threshold > 0):
            raise InvalidInput(f"KLMonitor threshold must be > 0 nats or None, got {self.threshold!r}")

    def update(self, kl: float | torch.Tensor, step: int | None = None) -> None:
        value = float(kl.detach().double().mean()) if isinstance(kl, torch.Tensor) else float(kl)
        step = self.count if step is None else int(step)
        self.history.append((step, value))
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self._m2 += delta * (value - self.mean)
        self.min, self.max = min(self.min, value), max(self.max, value)
        if self.threshold is not None and value > self.threshold and not self.warned:
            self.warned = True
            log.warning("%s = %.4g nats at step %d exceeds the threshold %.4g: the policy is drifting far from "
                        "the reference. Remedies: raise beta (stronger KL penalty), lower the learning rate, "
                        "or check that the reference is the model the policy started from.",
                        self.name, value, step, self.threshold)

    @property
    def std(self) -> float:
        return math.sqrt(self._m2 / (self.count - 1)) if self.count > 1 else 0.0

    @property
    def last(self) -> float | None:
        return self.history[-1][1] if self.history else None

    def summary(self) -> dict[str, float]:
        """``{count, mean, std, min, max, last}`` of the series so far."""
        return {"count": self.count, "mean": self.mean, "std": self.std, "min": self.min, "max": self.max,
                "last": self.last}


class AdaptiveKLController:
    """Proportional controller of the KL coefficient, Ziegler et al. 2019 ("Fine-Tuning Language Models
    from Human Preferences"), Sec. 2.2: with ``e = clip(KL / target - 1, -0.2, 0.2)``, each update
    multiplies the coefficient by ``1 + e * n_steps / horizon``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        for name, value in (("init_kl_coef", init_kl_coef), ("target", target), ("horizon", horizon)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise InvalidInput(f"AdaptiveKLController {name} must be a finite number > 0, got {value!r}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        """Update with the KL measured over the last ``n_steps`` samples/steps; return the new coefficient."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


__all__ = ["ESTIMATORS", "REDUCTIONS", "AdaptiveKLController", "KLMonitor", "estimate"]
