"""Preference losses: the DPO family, KTO, ORPO and SimPO, on sequence log-probs.

Every function takes per-sequence log-probs (``[B]`` float tensors, nats; sums over the completion
tokens unless the docstring says otherwise) and returns a :class:`PreferenceLoss`. The formulas follow
the papers cited in each docstring; where TRL (1.16) made a choice the paper leaves open (IPO's length
normalization, ORPO's token-weighted NLL term) we make the same one so the numbers agree with TRL's.

Rewards are the implicit rewards (``beta`` times the policy/reference log-ratio, or ``beta`` times the
length-normalized policy log-prob for the reference-free losses), detached from the graph.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import InvalidInput
from ..validation import positive_finite

DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge", "robust")


@dataclass(frozen=True)
class PreferenceLoss:
    """The output of every loss here.

    Attributes:
        loss: scalar, the mean over the batch (the value to ``backward()``).
        losses: ``[B]`` per-example loss terms (for KTO: chosen then rejected examples).
        chosen_rewards, rejected_rewards: ``[B]`` implicit rewards, detached.
        margin: scalar, mean of ``chosen_rewards - rejected_rewards`` (KTO: difference of the means).
        accuracy: scalar, fraction of pairs with ``chosen_reward > rejected_reward`` (KTO: over all
            chosen x rejected combinations).
        metrics: extra detached scalars of the loss (``nll_loss``, ``kl``, ``log_odds``, ...).
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margin: torch.Tensor
    accuracy: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def _check_vectors(**tensors: torch.Tensor | None) -> None:
    shape = None
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InvalidInput(f"{name} must be a 1-D [B] tensor of sequence log-probs, got {got}")
        if shape is None:
            shape = t.shape
        elif t.shape != shape:
            names = ", ".join(k for k, v in tensors.items() if v is not None)
            raise InvalidInput(f"{names} must all have the same shape [B]; {name} has {tuple(t.shape)}, "
                               f"expected {tuple(shape)}")


def _check_positive(name: str, value: float) -> None:
    positive_finite(value, name)


def _per_token(logps: torch.Tensor, lengths: torch.Tensor, name: str) -> torch.Tensor:
    if (lengths <= 0).any():
        raise InvalidInput(f"{name} must be > 0 for every sequence (number of completion tokens), "
                           f"got {lengths.tolist()}")
    return logps / lengths.to(logps.dtype)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 and for very negative ``x`` (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _pairwise(losses, chosen_rewards, rejected_rewards, **metrics) -> PreferenceLoss:
    return PreferenceLoss(
        loss=losses.mean(), losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
        margin=(chosen_rewards - rejected_rewards).mean(),
        accuracy=(chosen_rewards > rejected_rewards).float().mean(), metrics=metrics,
    )


def dpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PreferenceLoss:
    """The DPO family on ``[B]`` summed sequence log-probs. With ``h = (log pi(y_w) - log ref(y_w))
    - (log pi(y_l) - log ref(y_l))`` and ``eps = label_smoothing``:

    - ``sigmoid``: DPO, Rafailov et al. 2023, Eq. 7: ``-log sigmoid(beta h)``. With ``eps > 0`` it is
      conservative DPO (cDPO, Mitchell 2023): ``-(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
    - ``ipo``: Azar et al. 2023, Eq. 17: ``(h - 1/(2 beta))^2`` (``beta`` is the paper's tau). When
      ``chosen_lengths``/``rejected_lengths`` (``[B]`` completion token counts) are given, each log-ratio
      is divided by its length first, as TRL does (confirmed with the IPO authors, per TRL).
    - ``hinge``: SLiC-HF, Zhao et al. 2023, Eq. 2 with ``delta = 1/beta``: ``max(0, 1 - beta h)``.
    - ``robust``: rDPO, Chowdhury et al. 2024, Eq. 8: ``[-(1-eps) log sigmoid(beta h) + eps log
      sigmoid(-beta h)] / (1 - 2 eps)``, an unbiased loss under label-flip rate ``eps < 0.5``.

    Rewards are ``beta * (policy - ref)`` per sequence (detached).
    """
    _check_vectors(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                   ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                   chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    _check_positive("beta", beta)
    if loss_type not in DPO_LOSS_TYPES:
        raise InvalidInput(f"unknown DPO loss_type {loss_type!r}; expected one of {list(DPO_LOSS_TYPES)}")
    limit = 0.5 if loss_type == "robust" else 1.0
    if not (0.0 <= label_smoothing < limit) or (label_smoothing and loss_type not in ("sigmoid", "robust")):
        raise InvalidInput(f"label_smoothing={label_smoothing!r} is not valid for loss_type={loss_type!r}: "
                           "it must be in [0, 0.5) for 'robust', in [0, 1) for 'sigmoid' (cDPO), "
                           "and 0 for 'ipo' and 'hinge'")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise InvalidInput("give both chosen_lengths and rejected_lengths, or neither")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if chosen_lengths is not None and rejected_lengths is not None:  # both or neither, checked above
            h = (_per_token(chosen_logratios, chosen_lengths, "chosen_lengths")
                 - _per_token(rejected_logratios, rejected_lengths, "rejected_lengths"))
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # robust
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return _pairwise(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def kto(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    kl: torch.Tensor | float | None = None,
    policy_kl_logps: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PreferenceLoss:
    """KTO, Ethayarajh et al. 2024, Eq. 7 (unpaired: ``[Nc]`` desirable, ``[Nr]`` undesirable sums).

    ``z0`` is the reference point: ``kl`` if given, else ``mean(policy_kl_logps - ref_kl_logps)`` over
    mismatched (prompt, completion) pairs, else 0; it is detached and clamped at 0 as in the paper.
    With ``r = log pi - log ref``: desirable ``lambda_D (1 - sigmoid(beta (r - z0)))``, undesirable
    ``lambda_U (1 - sigmoid(beta (z0 - r)))``; ``loss`` is the mean over all ``Nc + Nr`` examples.
    """
    _check_vectors(policy_chosen_logps=policy_chosen_logps, ref_chosen_logps=ref_chosen_logps)
    _check_vectors(policy_rejected_logps=policy_rejected_logps, ref_rejected_logps=ref_rejected_logps)
    _check_vectors(policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
    _check_positive("beta", beta)
    for name, w in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if not (isinstance(w, (int, float)) and w >= 0):
            raise InvalidInput(f"{name} must be >= 0, got {w!r}")
    if policy_chosen_logps.numel() + policy_rejected_logps.numel() == 0:
        raise InvalidInput("kto needs at least one desirable or undesirable example, got none")
    if (policy_kl_logps is None) != (ref_kl_logps is None):
        raise InvalidInput("give both policy_kl_logps and ref_kl_logps, or neither")
    ref = policy_chosen_logps if policy_chosen_logps.numel() else policy_rejected_logps
    if kl is not None:
        z0 = torch.as_tensor(kl, dtype=ref.dtype, device=ref.device).detach()
    elif policy_kl_logps is not None and ref_kl_logps is not None:  # both or neither, checked above
        z0 = (policy_kl_logps - ref_kl_logps).mean().detach()
    else:
        z0 = ref.new_zeros(())
    z0 = z0.clamp(min=0)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = torch.cat([desirable_weight * (1 - torch.sigmoid(beta * (chosen_logratios - z0))),
                        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - rejected_logratios)))])
    chosen_rewards, rejected_rewards = beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
    if chosen_rewards.numel() and rejected_rewards.numel():
        margin = chosen_rewards.mean() - rejected_rewards.mean()
        accuracy = (chosen_rewards[:, None] > rejected_rewards[None, :]).float().mean()
    else:
        margin = accuracy = ref.new_tensor(float("nan"))
    return PreferenceLoss(losses.mean(), losses, chosen_rewards, rejected_rewards, margin, accuracy,
                          {"kl": z0})


def orpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 0.1,
) -> PreferenceLoss:
    """ORPO, Hong et al. 2024, Eqs. 6-7 (reference-free), on ``[B]`` *summed* log-probs and lengths.

    ``P(y|x)`` is the length-normalized likelihood ``exp(logps / length)``; the odds ratio term is
    ``-log sigmoid(log odds(y_w) - log odds(y_l))`` with ``log odds(y) = log P - log(1 - P)``, and
    ``loss = L_SFT + beta * mean(odds ratio term)`` (``beta`` is the paper's lambda). ``L_SFT`` is the
    chosen NLL averaged over all chosen tokens of the batch (token-weighted, as TRL computes it).
    Rewards are ``beta`` times the length-normalized log-probs.
    """
    _check_vectors(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                   chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    _check_positive("beta", beta)
    chosen_avg = _per_token(policy_chosen_logps, chosen_lengths, "chosen_lengths")
    rejected_avg = _per_token(policy_rejected_logps, rejected_lengths, "rejected_lengths")
    if (chosen_avg >= 0).any() or (rejected_avg >= 0).any():
        raise InvalidInput("orpo needs log-probs < 0 (P(y|x) < 1) to form odds; got a sequence with log-prob >= 0")
    log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
    losses = -beta * F.logsigmoid(log_odds)
    nll = -policy_chosen_logps.sum() / chosen_lengths.sum().to(policy_chosen_logps.dtype)
    chosen_rewards, rejected_rewards = beta * chosen_avg.detach(), beta * rejected_avg.detach()
    out = _pairwise(losses, chosen_rewards, rejected_rewards, nll_loss=nll.detach(),
                    log_odds=log_odds.detach().mean())
    return dataclasses.replace(out, loss=nll + losses.mean())


def simpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """SimPO, Meng et al. 2024, Eq. 6 (reference-free), on ``[B]`` *summed* log-probs and lengths:

    ``-log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)``; with ``label_smoothing``
    the conservative form as in TRL's CPO trainer. ``gamma`` is the target reward margin (TRL's
    ``simpo_gamma``); the paper's recommended ``beta`` is 2.0-2.5. Rewards are ``beta * logps/length``.
    """
    _check_vectors(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                   chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    _check_positive("beta", beta)
    if not (0.0 <= label_smoothing < 0.5):
        raise InvalidInput(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if not math.isfinite(gamma):
        raise InvalidInput(f"gamma must be finite, got {gamma!r}")
    chosen_rewards = beta * _per_token(policy_chosen_logps, chosen_lengths, "chosen_lengths")
    rejected_rewards = beta * _per_token(policy_rejected_logps, rejected_lengths, "rejected_lengths")
    z = chosen_rewards - rejected_rewards - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return _pairwise(losses, chosen_rewards.detach(), rejected_rewards.detach())


__all__ = ["DPO_LOSS_TYPES", "PreferenceLoss", "dpo", "kto", "orpo", "simpo"]
