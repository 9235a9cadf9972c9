"""Advantage estimators: group-relative (GRPO, Dr. GRPO), RLOO leave-one-out, and GAE (with a critic).

Rewards of a group are contiguous: rows ``[g * G, (g + 1) * G)`` are the ``G = group_size`` completions
of prompt ``g`` (TRL's ``num_generations`` layout, ``rewards.view(-1, G)``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import InvalidInput

SCALES: tuple[str, ...] = ("group", "batch", "none")


def _check_groups(rewards: torch.Tensor, group_size: int, minimum: int) -> None:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or not rewards.dtype.is_floating_point:
        got = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise InvalidInput(f"rewards must be a float [B] tensor (one scalar reward per completion), got {got}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < minimum:
        raise InvalidInput(f"group_size must be an int >= {minimum}, got {group_size!r}")
    if rewards.shape[0] % group_size:
        raise InvalidInput(f"rewards has {rewards.shape[0]} rows, not a multiple of group_size={group_size}; "
                           "each prompt's completions must be contiguous and complete")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages ``(r - mean_group(r)) / (std + eps)`` (DeepSeekMath, arXiv 2402.03300; TRL ``scale_rewards``).

    Args:
        rewards: ``[B]`` scalar rewards, ``B = n_prompts * group_size``.
        scale: ``group`` (std within each group, GRPO), ``batch`` (std over the batch, TRL's "batch", as
            in "Tricks or Traps", arXiv 2508.08221), ``none`` (no division: Dr. GRPO, arXiv 2503.20783).
            The std is the unbiased one (``torch.std``, as TRL); ``eps`` = 1e-4 as TRL.
    Returns:
        ``[B]`` advantages (same dtype), detached.
    """
    _check_groups(rewards, group_size, 1)
    if scale not in SCALES:
        raise InvalidInput(f"unknown scale {scale!r}; expected one of {list(SCALES)}")
    r = rewards.detach()
    grouped = r.view(-1, group_size)
    adv = (grouped - grouped.mean(1, keepdim=True)).reshape(-1)
    if scale == "none":
        return adv
    if scale == "group":
        # A group of one has no spread: its std is 0 (TRL's nanstd gives nan there, which would poison the loss).
        std = grouped.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped)
        std = std.expand_as(grouped).reshape(-1)
    else:
        std = (r.std() if r.numel() > 1 else r.new_zeros(())).expand_as(r)
    return adv / (std + eps)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024, arXiv 2402.14740; TRL ``RLOOTrainer``).

    ``A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean_group(r))`` over the ``G`` completions of
    the prompt. Needs ``group_size >= 2``. Returns ``[B]``, detached.
    """
    _check_groups(rewards, group_size, 2)
    grouped = rewards.detach().view(-1, group_size)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)


class GAE(NamedTuple):
    """``advantages`` and ``returns`` (``advantages + values``), ``[B, T]``, 0 outside the mask, detached."""

    advantages: torch.Tensor
    returns: torch.Tensor


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                   lam: float = 0.95, whiten: bool = False) -> GAE:
    """Generalized advantage estimation (Schulman et al. 2016, arXiv 1506.02438) over the completion tokens.

    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``, where ``t + 1`` is the next
    *masked* position (unmasked positions are skipped, as verl's ``compute_gae_advantage_return``; the value
    after the last token is 0).

    Args:
        rewards: ``[B, T]`` per-token rewards (e.g. the score at the last token minus a per-token KL penalty,
            :func:`refmodel.losses.kl_penalized_rewards`). values: ``[B, T]`` critic values. mask: ``[B, T]``.
        gamma, lam: discount and GAE lambda (verl/TRL PPO defaults 1.0 and 0.95).
        whiten: normalize the advantages to zero mean / unit variance over the masked tokens (verl
            ``masked_whiten``, TRL PPO ``whiten_rewards``-style).
    """
    for name, given in (("rewards", rewards), ("values", values), ("mask", mask)):
        if not isinstance(given, torch.Tensor) or given.dim() != 2 or given.shape != rewards.shape:
            raise InvalidInput(f"{name} must be a [B, T] tensor of the shape of rewards "
                               f"{tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else '?'}")
    for name, value in (("gamma", gamma), ("lam", lam)):
        if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
            raise InvalidInput(f"{name} must be a number in [0, 1], got {value!r}")
    with torch.no_grad():
        m = mask.to(rewards.dtype)
        r, v = rewards * m, values.to(rewards.dtype) * m
        next_value = torch.zeros_like(r[:, 0])
        last = torch.zeros_like(r[:, 0])
        adv = torch.zeros_like(r)
        for t in reversed(range(r.shape[1])):
            delta = r[:, t] + gamma * next_value - v[:, t]
            gae = delta + gamma * lam * last
            # a skipped (unmasked) position passes the next masked position's value and advantage through
            next_value = torch.where(mask[:, t].bool(), v[:, t], next_value)
            last = torch.where(mask[:, t].bool(), gae, last)
            adv[:, t] = gae * m[:, t]
        returns = (adv + v) * m
        if whiten:
            n = m.sum().clamp(min=1)
            mean = adv.sum() / n
            var = (((adv - mean) * m) ** 2).sum() / (n - 1).clamp(min=1)
            adv = (adv - mean) * torch.rsqrt(var + 1e-8) * m
    return GAE(adv, returns)


__all__ = ["GAE", "SCALES", "gae_advantages", "group_advantages", "rloo_advantages"]
