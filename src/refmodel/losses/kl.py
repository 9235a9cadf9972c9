"""KL estimators between the policy and the reference, a KL monitor and an adaptive KL controller.

With tokens sampled from the policy ``q`` and ``log r = log p_ref - log q`` per token, Schulman's
"Approximating KL Divergence" (2020) estimators of ``KL(q || p_ref)`` are:

- ``k1 = -log r``: unbiased, high variance, can be negative.
- ``k2 = (log r)^2 / 2``: biased (low bias when q and p_ref are close), low variance, >= 0.
- ``k3 = (r - 1) - log r``: unbiased, low variance, >= 0 (the GRPO/verl ``low_var_kl``).

Used as a *loss*, the gradient of k3 (and of k1, whose expected gradient is 0) is not the gradient of
the KL; the gradient of k2 is (on-policy). The ``k1+`` and ``k3+`` variants report the value of k1/k3
but carry k2's gradient (straight-through: ``value + k2 - k2.detach()``).

verl's and OpenRLHF's names are accepted as aliases (:data:`ESTIMATOR_ALIASES`): ``kl`` = ``k1``,
``mse`` = ``k2``, ``low_var_kl`` = ``k3``, and ``abs`` (``|log q - log p_ref|``, verl); any of them may
carry the ``+`` suffix (verl PR #2953: the value of the estimator, the gradient of k2). The log-ratio is
masked *before* any ``exp`` so padding can never produce ``inf * 0 = nan`` (ms-swift PR #9767).

KL controllers (:class:`FixedKLController`, :class:`AdaptiveKLController`) hold the coefficient for
either placement: pass one as ``beta`` to :func:`refmodel.losses.policy_loss` (KL in the loss) or as
``kl_coef`` to :func:`kl_penalized_rewards` (KL in the reward), and feed the measured KL to
``update``. :func:`exact` is the full-vocabulary KL computed from hidden states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .._deprecation import renamed_keywords
from ..cluster import get_logger, reduce_over_ranks
from ..errors import InvalidInput
from ..validation import positive_finite

log = get_logger(__name__)  # shared warnings: main process only (refmodel.cluster)

ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3", "abs", "k1+", "k3+", "abs+")
REDUCTIONS: tuple[str, ...] = ("token", "sequence", "batch")
# verl (kl_penalty) and OpenRLHF (--algo.kl.estimator) names -> ours.
ESTIMATOR_ALIASES: dict[str, str] = {"kl": "k1", "mse": "k2", "low_var_kl": "k3", "k2+": "k2", "mse+": "k2"}


def canonical_estimator(name: str) -> str:
    """Our name for a KL estimator given by its refmodel, verl or OpenRLHF name (``low_var_kl+`` -> ``k3+``)."""
    if not isinstance(name, str):
        raise InvalidInput(f"KL estimator must be a string, got {type(name).__name__}")
    if name in ESTIMATOR_ALIASES:
        return ESTIMATOR_ALIASES[name]
    base, plus = (name[:-1], "+") if name.endswith("+") else (name, "")
    canon = ESTIMATOR_ALIASES.get(base, base) + plus
    canon = "k2" if canon == "k2+" else canon
    if canon not in ESTIMATORS:
        raise InvalidInput(f"unknown KL estimator {name!r}; expected one of {list(ESTIMATORS)} or the aliases "
                           f"{sorted(ESTIMATOR_ALIASES)} (verl/OpenRLHF names, '+' = straight-through k2 gradient)")
    return canon


def _per_token(log_ratio: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate from ``log_ratio = log q - log p_ref`` (the policy's log-ratio)."""
    k2 = 0.5 * log_ratio**2
    if estimator == "k2":
        return k2
    if estimator.startswith("k1"):
        value = log_ratio
    elif estimator.startswith("abs"):
        value = log_ratio.abs()
    else:  # k3 = (r - 1) - log r with log r = -log_ratio; expm1 keeps it exact near 0
        value = torch.expm1(-log_ratio) + log_ratio
    if estimator.endswith("+"):
        return value.detach() + (k2 - k2.detach())
    return value


@renamed_keywords(logps="logprobs", ref_logps="ref_logprobs")
def per_token_kl(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    estimator: str = "k3",
    *,
    log_ratio_clamp: float | None = None,
    kl_clamp: float | None = None,
) -> torch.Tensor:
    """Per-token KL estimate ``[B, T]`` (nats), 0 outside ``mask``, with verl's optional clamps.

    The log-ratio ``logprobs - ref_logprobs`` is zeroed outside the mask *before* the estimator (so no ``exp``
    ever sees padding), then clamped to ``[-log_ratio_clamp, log_ratio_clamp]`` (verl: 20 for k3) and the
    estimate to ``[-kl_clamp, kl_clamp]`` (verl: 10 for k3, OpenRLHF: 10 for every estimator). ``None``
    disables a clamp (TRL's behaviour). A clamp that is active stops the gradient at that token.
    """
    estimator = canonical_estimator(estimator)
    log_ratio = logprobs - ref_logprobs.to(logprobs.dtype)
    if mask is not None:
        log_ratio = torch.where(mask.bool(), log_ratio, log_ratio.new_zeros(()))
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    kl = _per_token(log_ratio, estimator)
    if kl_clamp is not None:
        kl = kl.clamp(-kl_clamp, kl_clamp)
    if mask is not None:
        kl = torch.where(mask.bool(), kl, kl.new_zeros(()))
    return kl


@renamed_keywords(logps="logprobs", ref_logps="ref_logprobs")
def estimate(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str = "k3",
    mask: torch.Tensor | None = None,
    reduction: str = "token",
) -> torch.Tensor:
    """Estimate ``KL(policy || reference)`` from log-probs of tokens sampled from the policy.

    Args:
        logprobs, ref_logprobs: ``[B, T]`` (or any equal shape) per-token log-probs (nats) of the policy and
            the reference at the same tokens.
        estimator: one of ``k1, k2, k3, abs, k1+, k3+, abs+`` or an alias (see module docstring).
        mask: bool/0-1 tensor of the same shape; positions outside it count as 0 and are left out of
            the ``batch`` mean. ``None`` counts every position.
        reduction: ``token`` -> per-token ``[B, T]`` (zeros outside the mask); ``sequence`` -> ``[B]``,
            the sum over each sequence's tokens (the KL of the whole completion); ``batch`` -> scalar,
            the mean over all masked tokens of the batch (per-token KL).
    Returns:
        float tensor in nats with the gradient w.r.t. ``logprobs`` that the estimator implies.
    """
    estimator = canonical_estimator(estimator)
    if reduction not in REDUCTIONS:
        raise InvalidInput(f"unknown reduction {reduction!r}; expected one of {list(REDUCTIONS)}")
    if not isinstance(logprobs, torch.Tensor) or not isinstance(ref_logprobs, torch.Tensor):
        raise InvalidInput("logprobs and ref_logprobs must be tensors")
    if logprobs.shape != ref_logprobs.shape:
        raise InvalidInput(f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} must have the "
                           "same shape")
    if reduction == "sequence" and logprobs.dim() < 1:
        raise InvalidInput("reduction='sequence' needs at least a [B, T] (or [T]) tensor")
    if mask is not None:
        if mask.shape != logprobs.shape:
            raise InvalidInput(f"mask must have the shape of logprobs {tuple(logprobs.shape)}, got {tuple(mask.shape)}")
        mask = mask.bool()
    kl = per_token_kl(logprobs.float(), ref_logprobs.float(), mask, estimator)
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

    Under torch.distributed (``over_ranks=True``, the default) each update first averages the KL over
    the ranks (:func:`refmodel.cluster.reduce_over_ranks`, ``mean``: each rank's KL is a mean over its
    own equal-sized batch), so every rank keeps the same statistics of the global batch; ``update`` is
    then a collective that every rank calls. The threshold warning shows on the main process only.
    ``over_ranks=False`` for a value that is already global (TRL's logged ``kl``) or a rank-local monitor.
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
    over_ranks: bool = True

    def __post_init__(self):
        if self.threshold is not None and not (self.threshold > 0):
            raise InvalidInput(f"KLMonitor threshold must be > 0 nats or None, got {self.threshold!r}")

    def update(self, kl: float | torch.Tensor, step: int | None = None) -> None:
        value = float(kl.detach().double().mean()) if isinstance(kl, torch.Tensor) else float(kl)
        if self.over_ranks:
            value = reduce_over_ranks({"kl": value}, "mean")["kl"]
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

    def summary(self) -> dict[str, float | None]:
        """``{count, mean, std, min, max, last}`` of the series so far."""
        return {"count": self.count, "mean": self.mean, "std": self.std, "min": self.min, "max": self.max,
                "last": self.last}


class FixedKLController:
    """A constant KL coefficient (verl ``kl_ctrl.type: fixed``, OpenRLHF without ``--algo.kl.target``).

    ``value`` is the coefficient; :meth:`update` accepts the measured KL and changes nothing, so code
    written for :class:`AdaptiveKLController` runs unchanged. Usable in both placements (``beta`` of
    :func:`refmodel.losses.policy_loss`, ``kl_coef`` of :func:`kl_penalized_rewards`).
    """

    def __init__(self, kl_coef: float):
        if not (isinstance(kl_coef, (int, float)) and math.isfinite(kl_coef) and kl_coef >= 0):
            raise InvalidInput(f"FixedKLController kl_coef must be a finite number >= 0, got {kl_coef!r}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """No-op; returns the (constant) coefficient."""
        return self.value

    def __repr__(self) -> str:
        return f"FixedKLController(kl_coef={self.value})"


class AdaptiveKLController:
    """Proportional controller of the KL coefficient, Ziegler et al. 2019 ("Fine-Tuning Language Models
    from Human Preferences"), Sec. 2.2: with ``e = clip(KL / target - 1, -0.2, 0.2)``, each update
    multiplies the coefficient by ``1 + e * n_steps / horizon`` (verl ``kl_ctrl.type: adaptive``,
    ``target_kl``, ``horizon``; OpenRLHF ``--algo.kl.target``, ``--algo.kl.horizon``).

    Usable for *both* placements, unlike verl's (in-reward only) and OpenRLHF's (a TODO for the loss):
    the coefficient is ``value``; pass the controller itself as ``beta`` of :func:`refmodel.losses.policy_loss`
    and feed ``PolicyLoss.kl`` to :meth:`update`, or as ``kl_coef`` of :func:`kl_penalized_rewards` and
    feed the batch mean of its per-sequence ``kl``. ``n_steps`` is the number of samples (verl passes the
    batch size) or steps the KL was measured over, in the unit ``horizon`` counts.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        for name, value in (("init_kl_coef", init_kl_coef), ("target", target), ("horizon", horizon)):
            positive_finite(value, f"AdaptiveKLController {name}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """Update with the KL measured over the last ``n_steps`` samples/steps; return the new coefficient."""
        current_kl = float(current_kl.detach().double().mean()) if isinstance(current_kl, torch.Tensor) \
            else float(current_kl)
        if not math.isfinite(current_kl):
            raise InvalidInput(f"AdaptiveKLController.update got a non-finite KL {current_kl!r}; check the "
                               "log-probs (a NaN here would poison the coefficient for the rest of training)")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value}, target={self.target}, horizon={self.horizon})"


KLController = FixedKLController | AdaptiveKLController


def coefficient(coef: float | FixedKLController | AdaptiveKLController, name: str) -> float:
    """The current value of a KL coefficient given as a number or a controller."""
    value = coef.value if isinstance(coef, (FixedKLController, AdaptiveKLController)) else coef
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"{name} must be a finite number or a FixedKLController/AdaptiveKLController, "
                           f"got {coef!r}")
    return float(value)


class KLPenalizedRewards(NamedTuple):
    """Result of :func:`kl_penalized_rewards`.

    ``rewards``: the penalized rewards, ``[B]`` for sequence rewards or ``[B, T]`` for token rewards
    (0 outside the mask), float, detached. ``kl``: ``[B]`` per-sequence masked *mean* of the per-token
    estimate (nats/token), detached; its batch mean is verl's ``current_kl`` for the controller.
    ``kl_coef``: the coefficient used (float).
    """

    rewards: torch.Tensor
    kl: torch.Tensor
    kl_coef: float


@renamed_keywords(logps="logprobs", ref_logps="ref_logprobs")
def kl_penalized_rewards(
    rewards: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | FixedKLController | AdaptiveKLController,
    estimator: str = "k1",
    *,
    log_ratio_clamp: float | None = None,
    kl_clamp: float | None = None,
) -> KLPenalizedRewards:
    """KL in the reward (PPO, RLOO, REINFORCE++): ``r <- score - kl_coef * KL``, the KL detached.

    Args:
        rewards: ``[B]`` sequence scores or ``[B, T]`` per-token scores (e.g. the score at the last token).
        logprobs: ``[B, T]`` log-probs of the sampled tokens under the policy that sampled them (the old
            policy; verl uses ``old_log_probs``), nats. ref_logprobs: ``[B, T]`` the reference's.
        mask: ``[B, T]`` completion mask.
        kl_coef: a number or a :class:`FixedKLController` / :class:`AdaptiveKLController` (its ``value``).
        estimator: ``k1`` by default (TRL RLOO/PPO, OpenRLHF, AgileRL REINFORCE; "A Comedy of Estimators",
            arXiv 2512.21852, argues k1 is the unbiased choice in the reward); any name of :func:`estimate`.

    Returns:
        :class:`KLPenalizedRewards`. For ``[B]`` rewards: ``score - coef * sum_t KL_t`` (TRL RLOO); for
        ``[B, T]``: ``score_t - coef * KL_t`` per token (verl ``apply_kl_penalty``, OpenRLHF ``compute_reward``).
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() not in (1, 2):
        raise InvalidInput("rewards must be a [B] (sequence) or [B, T] (per-token) tensor, got "
                           f"{tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__}")
    for name, t in (("logprobs", logprobs), ("ref_logprobs", ref_logprobs), ("mask", mask)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape != logprobs.shape:
            raise InvalidInput(f"{name} must be a [B, T] tensor of the shape of logprobs {tuple(logprobs.shape)}")
    if rewards.shape[0] != logprobs.shape[0] or (rewards.dim() == 2 and rewards.shape != logprobs.shape):
        raise InvalidInput(f"rewards {tuple(rewards.shape)} must be [B] or [B, T] with B, T of logprobs "
                           f"{tuple(logprobs.shape)}")
    coef = coefficient(kl_coef, "kl_coef")
    dtype = torch.promote_types(torch.promote_types(logprobs.dtype, rewards.dtype), torch.float32)
    with torch.no_grad():
        m = mask.bool()
        kl_t = per_token_kl(logprobs.detach().to(dtype), ref_logprobs.detach().to(dtype), m, estimator,
                            log_ratio_clamp=log_ratio_clamp, kl_clamp=kl_clamp)
        seq_kl = kl_t.sum(-1) / m.sum(-1).clamp(min=1)
        if rewards.dim() == 1:
            out = rewards.to(dtype) - coef * kl_t.sum(-1)
        else:
            out = torch.where(m, rewards.to(dtype) - coef * kl_t, 0.0)
    return KLPenalizedRewards(out, seq_kl, coef)


from .kl_exact import LMHead, exact, naive_exact  # noqa: E402  (kl_exact needs nothing from this module)

__all__ = ["ESTIMATORS", "ESTIMATOR_ALIASES", "REDUCTIONS", "AdaptiveKLController", "FixedKLController",
           "KLController", "KLMonitor", "KLPenalizedRewards", "LMHead", "canonical_estimator", "coefficient",
           "estimate", "exact", "kl_penalized_rewards", "naive_exact", "per_token_kl"]
