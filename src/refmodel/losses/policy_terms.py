"""The per-token math shared by :func:`refmodel.losses.policy_loss` and :func:`refmodel.losses.fused_policy_loss`.

Options are validated once (:class:`~refmodel.losses.policy_config.PolicyLossConfig`, which every function here
reads); :func:`token_losses` is the only place the per-token policy/KL formulas live (see
:mod:`refmodel.losses.policy` for them and their sources), so the fused head, which differentiates it on
``[rows]`` log-probs inside its forward, cannot drift from the unfused loss.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError, InvalidInput
from . import kl as kl_mod
from .policy_config import PolicyLossConfig


def check_inputs(logprobs, old_logprobs, advantages, mask, ref_logprobs=None, rollout_logprobs=None, full_kl=None):
    """Shapes and dtypes at the boundary; returns ``(mask as bool, advantages as [B, 1] or [B, T])``."""
    if not isinstance(logprobs, torch.Tensor) or logprobs.dim() != 2 or not logprobs.dtype.is_floating_point:
        raise InvalidInput("logprobs must be a float [B, T] tensor of per-token log-probs, got "
                           f"{tuple(logprobs.shape) if isinstance(logprobs, torch.Tensor) else type(logprobs).__name__}")
    shape = tuple(logprobs.shape)
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs), ("rollout_logprobs", rollout_logprobs),
                    ("full_kl", full_kl), ("mask", mask)):
        if t is None and name != "mask":
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InvalidInput(f"{name} must be a [B, T] tensor of the shape of logprobs {shape}, got {got}")
    if not isinstance(advantages, torch.Tensor) or advantages.dim() not in (1, 2) or \
            advantages.shape[0] != shape[0] or (advantages.dim() == 2 and advantages.shape[1] not in (1, shape[1])):
        got = tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else type(advantages).__name__
        raise InvalidInput(f"advantages must be [B] (one per sequence) or [B, T] (per token) with B, T = {shape}, "
                           f"got {got}")
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    return mask.bool(), adv.to(logprobs.dtype)


def check_kl_inputs(opts: PolicyLossConfig, ref_logprobs, full_kl) -> None:
    """``beta != 0`` needs the KL's input at the call: ``ref_logprobs``, or ``full_kl`` for ``kl_estimator="full"``."""
    beta = opts.beta_value
    if opts.kl_estimator == "full":
        if full_kl is None and beta != 0:
            raise ConfigError("kl_estimator='full' needs full_kl=refmodel.kl.exact(policy_hidden, policy_head, "
                              "ref_hidden, ref_head, mask) (the [B, T] exact KL with its gradient)")
    elif beta != 0 and ref_logprobs is None:
        raise ConfigError(f"beta={beta} puts beta * KL(policy || reference) in the loss, but ref_logprobs is None. "
                          "Pass ref_logprobs ([B, T] reference log-probs of the same tokens, e.g. "
                          "reference.logprobs(input_ids, attention_mask, completion_mask)), or set beta=0.0 to "
                          "train without a KL term (no reference needed).")


def aggregation_weights(mask: torch.Tensor, agg: str, dtype: torch.dtype, num_items_in_batch=None,
                        max_completion_length: int | None = None) -> torch.Tensor:
    """``w [B, T]`` with ``loss = sum(w * L)`` for ``agg`` (0 outside the mask); depends on the mask only."""
    m = mask.to(dtype)
    batch = max(mask.shape[0], 1)
    if agg == "token-mean":
        count = m.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=dtype,
                                                                              device=m.device)
        return m / count.clamp(min=1.0)
    if agg == "token-sum":
        return m
    if agg == "seq-mean-token-sum":
        return m / batch
    if agg == "seq-mean-token-mean":
        return m / (batch * m.sum(-1, keepdim=True).clamp(min=1.0))
    # max_completion_length was checked (> 0) by PolicyLossConfig
    length = mask.shape[1] if max_completion_length is None else max_completion_length
    return m / (batch * length)


def log_importance_weights(logprobs, old_logprobs, mask, level, clamp=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_w, log_ratio)``: ``log_w`` is ``[B, T]`` (token, sequence_token) or ``[B, 1]`` (sequence)."""
    old = logprobs.detach() if old_logprobs is None else old_logprobs.to(logprobs.dtype)
    log_ratio = torch.where(mask, logprobs - old, logprobs.new_zeros(()))
    if level == "token":
        log_w = log_ratio
    else:
        seq = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        log_w = seq if level == "sequence" else logprobs - logprobs.detach() + seq.detach()
    if clamp is not None:  # verl clamps the log-ratio to +-20 before exp
        log_w = log_w.clamp(-clamp, clamp)
    return log_w, log_ratio


def rollout_is_weights(old_logprobs, rollout_logprobs, mask, opts: PolicyLossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's vLLM IS correction ``rho`` (``[B, T]`` or ``[B, 1]``, detached) and where it was masked to 0."""
    diff = torch.where(mask, old_logprobs.detach() - rollout_logprobs.to(old_logprobs.dtype), 0.0)
    diff = torch.nan_to_num(diff, nan=0.0)  # a missing sampler log-prob gives ratio 1, as in TRL
    mode, clip_min, clip_max = (opts.vllm_importance_sampling_mode, opts.vllm_importance_sampling_clip_min,
                                opts.vllm_importance_sampling_clip_max)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    rho = torch.exp(diff)
    if mode.endswith("truncate"):
        return rho.clamp(min=clip_min, max=clip_max), torch.zeros_like(rho, dtype=torch.bool)
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max
    invalid = (rho < lo) | (rho > hi)
    return rho.masked_fill(invalid, 0.0), invalid


def token_losses(opts: PolicyLossConfig, logprobs, log_w, advantages, mask, ref_logprobs=None, rho=None, full_kl=None):
    """``(L [B, T], pg [B, T], kl [B, T] or None, r)`` per token, before aggregation (works on any equal shape)."""
    coef_1 = torch.exp(log_w)
    if opts.loss_type == "cispo":
        pg = -torch.clamp(coef_1, max=opts.clip_high).detach() * advantages * logprobs
    else:
        coef_2 = torch.clamp(coef_1, 1 - opts.epsilon, 1 + opts.clip_high)
        unclipped = coef_1 if opts.delta is None else torch.clamp(coef_1, max=opts.delta)
        pg = -torch.min(unclipped * advantages, coef_2 * advantages)
        if opts.dual_clip is not None:  # verl vanilla: bound the loss of negative-advantage tokens by -c*A
            pg = torch.where(advantages < 0, torch.min(pg, -opts.dual_clip * advantages), pg)
    if rho is not None:
        pg = pg * rho
    kl_t = None
    if opts.kl_estimator == "full" and full_kl is not None:
        kl_t = full_kl.to(logprobs.dtype)
    elif ref_logprobs is not None:
        kl_t = kl_mod.per_token_kl(logprobs, ref_logprobs, mask, opts.kl_estimator,
                                   log_ratio_clamp=opts.kl_log_ratio_clamp, kl_clamp=opts.kl_clamp)
        if opts.use_bias_correction_kl:  # DeepSeek-V3.2: k3 * pi_theta / pi_old (TRL, Liger)
            kl_t = kl_t * coef_1
    beta = opts.beta_value
    loss = pg if kl_t is None or beta == 0 else pg + beta * kl_t
    zero = loss.new_zeros(())
    return torch.where(mask, loss, zero), torch.where(mask, pg, zero), kl_t, coef_1


__all__ = ["aggregation_weights", "check_inputs", "check_kl_inputs", "log_importance_weights", "rollout_is_weights",
           "token_losses"]
