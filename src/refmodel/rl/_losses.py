"""Private stand-ins for issue 17's ``refmodel.losses.policy`` until that branch lands.

Only what the RL loop needs: GRPO group advantages and the token-level clipped surrogate with the
k3 reference KL, DAPO/GRPO/Dr. GRPO/BNPO aggregation (TRL's ``loss_type`` meanings). The formulas
follow TRL's ``GRPOTrainer._compute_loss`` (trl/trainer/grpo_trainer.py at f2cd577):

    r_t   = exp(logp_t - old_t)                       (old = logp.detach() when on-policy)
    L_t   = -min(r_t * A, clip(r_t, 1 - eps, 1 + eps_high) * A) + beta * k3_t
    k3_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1  (log-ratio masked *before* the exp)
    grpo: mean_b (sum_t L_t m_t / sum_t m_t);  dapo/bnpo: sum L m / sum m;  dr_grpo: sum L m / (B * T_max)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import ConfigError

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "ppo")


class PolicyLossResult(NamedTuple):
    """Scalars are 0-dim tensors (``loss`` carries the gradient); ``kl`` is the mean per-token KL term."""

    loss: torch.Tensor
    pg_loss: torch.Tensor
    kl: torch.Tensor
    clip_fraction: torch.Tensor
    ratio_mean: torch.Tensor


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """``[B]`` GRPO advantages: reward minus its group's mean, over the group's std (``scale="group"``)."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ConfigError(f"rewards must be [B] with B a multiple of group_size={group_size}, got "
                          f"{tuple(rewards.shape)}")
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(1, keepdim=True)
    if scale == "group":
        adv = adv / (r.std(1, keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / (rewards.float().std() + eps)
    elif scale != "none":
        raise ConfigError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    return adv.view(-1)


def policy_loss(logps, old_logps, advantages, mask, *, loss_type: str = "dapo", epsilon: float = 0.2,
                epsilon_high: float | None = None, ref_logps=None, beta: float = 0.0,
                max_completion_length: int | None = None, rollout_logps=None,
                vllm_importance_sampling_cap: float = 2.0) -> PolicyLossResult:
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"unknown loss_type {loss_type!r}; expected one of {list(LOSS_TYPES)}")
    if beta != 0 and ref_logps is None:
        raise ConfigError(f"beta={beta} needs ref_logps (the reference's per-token log-probs)")
    m = mask.bool()
    mf = m.float()
    old = logps.detach() if old_logps is None else old_logps
    log_ratio = torch.where(m, logps - old, torch.zeros_like(logps))
    ratio = torch.exp(log_ratio)
    adv = advantages if advantages.dim() == 2 else advantages[:, None]
    hi = epsilon if epsilon_high is None else epsilon_high
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + hi)
    per_tok = -torch.min(ratio * adv, clipped * adv)
    if rollout_logps is not None:  # truncated IS against the sampler (TIS, token level)
        is_w = torch.exp(torch.where(m, old - rollout_logps, torch.zeros_like(old))).clamp(max=vllm_importance_sampling_cap)
        per_tok = per_tok * is_w.detach()
    pg = per_tok
    kl = torch.zeros_like(logps)
    if beta != 0:
        delta = torch.where(m, ref_logps - logps, torch.zeros_like(logps))
        kl = torch.expm1(delta) - delta
        per_tok = per_tok + beta * kl

    def agg(x):
        if loss_type == "grpo":
            return ((x * mf).sum(1) / mf.sum(1).clamp(min=1)).mean()
        if loss_type == "dr_grpo":
            return (x * mf).sum() / (x.shape[0] * (max_completion_length or x.shape[1]))
        return (x * mf).sum() / mf.sum().clamp(min=1)

    n = mf.sum().clamp(min=1)
    clip = (((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + hi) & (adv > 0))) & m
    return PolicyLossResult(agg(per_tok), agg(pg).detach(), ((kl * mf).sum() / n).detach(),
                            (clip.float().sum() / n).detach(), ((ratio * mf).sum() / n).detach())


__all__ = ["LOSS_TYPES", "PolicyLossResult", "group_advantages", "policy_loss"]
