"""Policy-gradient losses (GRPO / DAPO / Dr. GRPO / CISPO / GSPO / PPO) with the reference KL in the loss.

Notation per completion token ``t`` of sequence ``i`` (all ``[B, T]``, nats): ``logprobs`` = log pi_theta
(with gradient), ``old_logprobs`` = log pi_old (the PPO anchor), ``ref_logprobs`` = log pi_ref,
``rollout_logprobs`` = the sampler's log-probs (vLLM/SGLang), ``m`` = the completion mask, ``A`` = advantage.
Everything below follows TRL's ``GRPOTrainer._compute_loss`` (1.16) line for line unless marked (verl):

    log_ratio = where(m, logprobs - old_logprobs, 0)          # masked *before* any exp
    log_w     = log_ratio                                  importance_sampling_level="token"
              = sum_t log_ratio / |o_i|        [B, 1]      "sequence" (GSPO, arXiv 2507.18071)
              = logprobs - sg(logprobs) + sg(sum_t log_ratio / |o_i|)   "sequence_token" (GSPO-token, verl gspo)
    r         = exp(log_w)
    clipped:  L_t = -min(min(r, delta) * A, clip(r, 1 - epsilon, 1 + epsilon_high) * A)
              dual_clip c (verl clip_ratio_c): L_t = min(L_t, -c * A) where A < 0
    cispo:    L_t = -sg(min(r, epsilon_high)) * A * logprobs          (MiniMax-M1, arXiv 2506.13585)
    L_t      *= rho_t                    truncated/masked IS weight against rollout_logprobs (TRL vLLM correction)
    L_t      += beta * KL_t               KL_t = estimator(logprobs, ref_logprobs) [* r if use_bias_correction_kl]
    loss      = sum_{i,t} w_{i,t} * L_{i,t}    with the aggregation weights w of ``loss_agg_mode``

k3 is ``exp(ref - logp) - (ref - logp) - 1`` (the orientation AgileRL swapped, d99c1c3b).

Aggregation, TRL ``loss_type`` <-> verl ``loss_agg_mode`` (``loss_agg_mode`` overrides the type's own):

    ==========  =============================  ==========================================================
    loss_type   loss_agg_mode                  loss
    ==========  =============================  ==========================================================
    grpo        seq-mean-token-mean            mean_i (sum_t L m / |o_i|)  (DeepSeekMath)
    bnpo        token-mean                     sum L m / sum m             (local batch)
    dr_grpo     seq-mean-token-sum-norm        sum L m / (B * max_completion_length)  (arXiv 2503.20783)
    dapo        token-mean                     sum L m / num_items_in_batch (global token count; DAPO)
    cispo       token-mean                     as dapo
    ppo         token-mean                     verl ``vanilla`` (its default aggregation)
    --          token-sum                      sum L m
    --          seq-mean-token-sum             mean_i (sum_t L m)
    ==========  =============================  ==========================================================

Other names: TRL ``epsilon``/``epsilon_high`` = verl ``clip_ratio_low``/``clip_ratio_high`` = OpenRLHF
``eps_clip_low_high``; ``dual_clip`` = verl ``clip_ratio_c`` = OpenRLHF ``--actor.dual_clip``; ``beta`` = verl
``kl_loss_coef``; ``kl_estimator`` = verl ``kl_loss_type``; ``importance_sampling_level="sequence"`` = verl
``loss_mode=gspo`` (verl's gspo is our ``sequence_token``); TRL ``cispo`` clips from above only (verl's clips
both sides); ``vllm_importance_sampling_*`` = verl ``rollout_is``/``rollout_is_threshold``. Not done here (and
not silently either): the gradient-accumulation and world-size scaling of the trainers (pass
``num_items_in_batch``), sapo/luspo/vespo and verl's covariance/DPPO modes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._deprecation import renamed_keywords
from .policy_config import (
    DEFAULT_AGG_MODE,
    IMPORTANCE_SAMPLING_LEVELS,
    LOSS_AGG_MODES,
    LOSS_TYPES,
    ROLLOUT_IS_MODES,
    PolicyLossConfig,
    build_config,
)
from .policy_terms import (
    aggregation_weights,
    check_inputs,
    check_kl_inputs,
    log_importance_weights,
    rollout_is_weights,
    token_losses,
)


@dataclass(frozen=True)
class PolicyLoss:
    """The result of :func:`policy_loss` and :func:`refmodel.losses.fused_policy_loss`.

    Every field except ``loss`` and ``per_token_loss`` is detached. Scalars are 0-dim float tensors (no
    device sync; ``float(x)`` to log them); ``None`` where the quantity does not apply.

    Attributes:
        loss: scalar, the value to ``backward()`` (policy term + ``beta`` * KL term, aggregated).
        per_token_loss: ``[B, T]`` the per-token ``L_t`` before aggregation, 0 outside the mask.
        pg_loss: scalar, the aggregated policy-gradient term alone.
        kl_loss: scalar, the aggregated ``beta * KL`` term (0 when ``beta == 0``).
        kl: scalar, masked mean per token of the KL estimate (nats/token); ``None`` without a reference.
        seq_kl: ``[B]`` per-sequence masked mean of the KL estimate; ``None`` without a reference.
        clip_fraction_low, clip_fraction_high, clip_fraction: fraction of masked tokens whose ratio is
            clipped from below (``r < 1 - epsilon`` and ``A < 0``), above (``r > 1 + epsilon_high`` and
            ``A > 0``; for cispo ``r > epsilon_high`` and ``A > 0``), either (TRL's ``clip_ratio/*``).
        dual_clip_fraction: fraction of masked tokens where the dual clip is active (0 without it).
        ratio_mean, ratio_min, ratio_max: of ``r`` over masked tokens (over sequences at sequence level).
        ppo_kl: masked mean of ``old_logprobs - logprobs`` (verl ``actor/ppo_kl``).
        is_weight_mean, is_weight_min, is_weight_max: of the rollout IS weight ``rho`` (masked tokens, or
            sequences at sequence level); is_masked_fraction: fraction zeroed by a ``*_mask`` mode;
            rollout_logp_diff_mean, rollout_logp_diff_max: of ``|old_logprobs - rollout_logprobs|`` (TRL's
            ``sampling/sampling_logp_difference``). All ``None`` without ``rollout_logprobs``.
    """

    loss: torch.Tensor
    per_token_loss: torch.Tensor
    pg_loss: torch.Tensor
    kl_loss: torch.Tensor
    kl: torch.Tensor | None
    seq_kl: torch.Tensor | None
    clip_fraction_low: torch.Tensor
    clip_fraction_high: torch.Tensor
    clip_fraction: torch.Tensor
    dual_clip_fraction: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_min: torch.Tensor
    ratio_max: torch.Tensor
    ppo_kl: torch.Tensor
    is_weight_mean: torch.Tensor | None = None
    is_weight_min: torch.Tensor | None = None
    is_weight_max: torch.Tensor | None = None
    is_masked_fraction: torch.Tensor | None = None
    rollout_logp_diff_mean: torch.Tensor | None = None
    rollout_logp_diff_max: torch.Tensor | None = None

    def metrics(self) -> dict[str, float]:
        """Every scalar statistic as a float (one device sync), for logging."""
        skip = ("loss", "per_token_loss", "seq_kl")
        return {k: float(v) for k, v in self.__dict__.items() if k not in skip and v is not None}


def _masked_stats(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean, min, max)`` of ``x`` (``[B, T]`` with ``mask``, or ``[B, 1]`` per sequence), detached."""
    x = x.detach()
    sel = x[mask] if x.shape == mask.shape else x.reshape(-1)
    if sel.numel() == 0:
        z = x.new_zeros(())
        return z, z, z
    return sel.mean(), sel.min(), sel.max()


def statistics(opts: PolicyLossConfig, loss, per_token, pg, kl_t, coef_1, advantages, mask, weights, logprobs, old_logprobs,
               rollout=None) -> PolicyLoss:
    """Assemble :class:`PolicyLoss` (all detached but ``loss``/``per_token_loss``)."""
    with torch.no_grad():
        m = mask.to(logprobs.dtype)
        n = m.sum().clamp(min=1)

        def frac(cond):
            return (torch.broadcast_to(cond, mask.shape) & mask).to(logprobs.dtype).sum() / n

        adv, r = advantages.detach(), coef_1.detach()
        if opts.loss_type == "cispo":
            low, high = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device), frac((r > opts.clip_high) & (adv > 0))
            region = high
        else:
            low_c, high_c = (r < 1 - opts.epsilon) & (adv < 0), (r > 1 + opts.clip_high) & (adv > 0)
            low, high, region = frac(low_c), frac(high_c), frac(low_c | high_c)
        dual = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
        if opts.dual_clip is not None:  # active where |A| * max(min(r, delta), clip(r)) exceeds c * |A|
            unclipped = r if opts.delta is None else r.clamp(max=opts.delta)
            worst = torch.maximum(unclipped, r.clamp(1 - opts.epsilon, 1 + opts.clip_high))
            dual = frac((adv < 0) & (worst > opts.dual_clip))
        pg_loss = (weights * pg.detach()).sum()
        kl_loss, kl_mean, seq_kl = torch.zeros_like(pg_loss), None, None
        if kl_t is not None:
            kd = torch.where(mask, kl_t.detach(), 0.0)
            kl_loss = opts.beta_value * (weights * kd).sum()
            kl_mean = kd.sum() / n
            seq_kl = kd.sum(-1) / mask.sum(-1).clamp(min=1)
        old = logprobs.detach() if old_logprobs is None else old_logprobs
        ppo_kl = (torch.where(mask, old - logprobs.detach(), 0.0)).sum() / n
        ratio = _masked_stats(r, mask)
        extra = {}
        if rollout is not None:
            rho, invalid, rollout_logprobs = rollout
            diff = torch.where(mask, (old - rollout_logprobs).abs(), 0.0)
            w_mean, w_min, w_max = _masked_stats(rho, mask)
            masked = invalid & mask if invalid.shape == mask.shape else invalid
            extra = dict(is_weight_mean=w_mean, is_weight_min=w_min, is_weight_max=w_max,
                         is_masked_fraction=masked.to(logprobs.dtype).sum() / (n if invalid.shape == mask.shape
                                                                             else max(invalid.numel(), 1)),
                         rollout_logp_diff_mean=diff.sum() / n, rollout_logp_diff_max=diff.max())
    return PolicyLoss(loss, per_token, pg_loss, kl_loss, kl_mean, seq_kl, low, high, region, dual, *ratio, ppo_kl,
                      **extra)


@renamed_keywords(logps="logprobs", old_logps="old_logprobs", ref_logps="ref_logprobs",
                  rollout_logps="rollout_logprobs")
def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    config: PolicyLossConfig | None = None,
    ref_logprobs: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    full_kl: torch.Tensor | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    **options: Any,
) -> PolicyLoss:
    """The clipped policy-gradient loss with the reference KL, from per-token log-probs (see the module docstring).

    ``policy_loss(logprobs, old, adv, mask, config=PolicyLossConfig(loss_type="grpo", beta=0.04), ref_logprobs=ref)``;
    the option keywords build the config for one call (``policy_loss(..., loss_type="grpo", beta=0.04,
    ref_logprobs=ref)`` is the same loss); giving both is an error.

    Args:
        logprobs: ``[B, T]`` policy log-probs of the sampled tokens (nats, with gradient).
        old_logprobs: ``[B, T]`` log-probs under pi_old, or ``None`` for on-policy (ratio 1 with the gradient of
            ``logprobs``, TRL's ``per_token_logps.detach()``).
        advantages: ``[B]`` per sequence or ``[B, T]`` per token. mask: ``[B, T]`` completion mask (bool/0-1).
        config: the options (:class:`~refmodel.losses.PolicyLossConfig`: loss type, clip range, ``beta``, KL
            estimator, aggregation, rollout IS mode, ...); ``None``: built from ``**options``.
        ref_logprobs: ``[B, T]`` reference log-probs; needed when ``beta != 0`` (an error otherwise) and reported
            as the ``kl`` statistic whenever given.
        rollout_logprobs: ``[B, T]`` the sampler's log-probs; enables TRL's IS correction ``rho = exp(old - rollout)``
            per token or summed per sequence, truncated to ``[clip_min, clip_max]`` (``*_truncate``) or set to 0
            outside it (``*_mask``), per the config's ``vllm_importance_sampling_*``. It multiplies the policy
            term only, not the KL (as TRL).
        full_kl: ``[B, T]`` the exact KL from :func:`refmodel.kl.exact` (with its gradient), for
            ``kl_estimator="full"``.
        num_items_in_batch: the token count ``token-mean`` divides by (the global count across processes and
            accumulation for dapo/cispo; per step, so an argument and not an option); default the local
            ``mask.sum()``.
        **options: the fields of :class:`~refmodel.losses.PolicyLossConfig` as keywords, when ``config`` is None.

    Returns:
        :class:`PolicyLoss`.

    Raises:
        ConfigError: an invalid option (see :class:`~refmodel.losses.PolicyLossConfig`), ``config`` together
            with option keywords, or ``beta != 0`` without ``ref_logprobs`` (``full_kl``).
        InvalidInput: tensors of the wrong shape.
    """
    opts = build_config(config, options, "policy_loss")
    mask, adv = check_inputs(logprobs, old_logprobs, advantages, mask, ref_logprobs, rollout_logprobs, full_kl)
    check_kl_inputs(opts, ref_logprobs, full_kl)
    log_w, _ = log_importance_weights(logprobs, old_logprobs, mask, opts.importance_sampling_level, opts.log_ratio_clamp)
    rollout = None
    if rollout_logprobs is not None:
        rho, invalid = rollout_is_weights(logprobs.detach() if old_logprobs is None else old_logprobs, rollout_logprobs, mask,
                                          opts)
        rollout = (rho, invalid, rollout_logprobs.to(logprobs.dtype))
    per_token, pg, kl_t, coef_1 = token_losses(opts, logprobs, log_w, adv, mask, ref_logprobs,
                                               rollout[0] if rollout else None, full_kl)
    weights = aggregation_weights(mask, opts.agg_mode, logprobs.dtype, num_items_in_batch, opts.max_completion_length)
    loss = (weights * per_token).sum()
    return statistics(opts, loss, per_token, pg, kl_t, coef_1, adv, mask, weights, logprobs, old_logprobs, rollout)


__all__ = ["DEFAULT_AGG_MODE", "IMPORTANCE_SAMPLING_LEVELS", "LOSS_AGG_MODES", "LOSS_TYPES", "ROLLOUT_IS_MODES",
           "PolicyLoss", "PolicyLossConfig", "policy_loss"]
