"""The per-token math shared by :func:`refmodel.policy_loss` and :func:`refmodel.fused_policy_loss`.

Options are validated once (:func:`resolve_options`); :func:`token_losses` is the only place the per-token
policy/KL formulas live (see :mod:`refmodel.losses.policy` for them and their sources), so the fused head,
which differentiates it on ``[rows]`` log-probs inside its forward, cannot drift from the unfused loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError, InvalidInput
from . import kl as kl_mod

LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "ppo")
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = ("token", "sequence", "sequence_token")
LOSS_AGG_MODES: tuple[str, ...] = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                   "seq-mean-token-sum-norm")
ROLLOUT_IS_MODES: tuple[str, ...] = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
DEFAULT_AGG_MODE: dict[str, str] = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean",
                                    "dr_grpo": "seq-mean-token-sum-norm", "dapo": "token-mean",
                                    "cispo": "token-mean", "ppo": "token-mean"}


@dataclass(frozen=True)
class _Options:
    """The validated options, shared by :func:`policy_loss` and the fused head."""

    loss_type: str
    epsilon: float
    epsilon_high: float
    delta: float | None
    dual_clip: float | None
    level: str
    agg: str
    beta: float
    kl_estimator: str
    use_bias_correction_kl: bool
    log_ratio_clamp: float | None
    kl_log_ratio_clamp: float | None
    kl_clamp: float | None
    rollout_mode: str
    rollout_clip_min: float | None
    rollout_clip_max: float | None


def _positive(name: str, value, allow_none: bool = True, above: float = 0.0) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= above:
        raise ConfigError(f"{name} must be a finite number > {above:g}{' or None' if allow_none else ''}, "
                          f"got {value!r}")


def resolve_options(loss_type="dapo", epsilon=0.2, epsilon_high=None, delta=None, dual_clip=None,
                    importance_sampling_level="token", loss_agg_mode=None, beta=0.0, kl_estimator="k3",
                    use_bias_correction_kl=False, log_ratio_clamp=None, kl_log_ratio_clamp=None, kl_clamp=None,
                    vllm_importance_sampling_mode="sequence_mask", vllm_importance_sampling_clip_max=3.0,
                    vllm_importance_sampling_clip_min=None) -> _Options:
    """Validate every option once; refuse the combinations that TRL/verl accept and silently mis-train."""
    for name, value, allowed in (("loss_type", loss_type, LOSS_TYPES),
                                 ("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS),
                                 ("vllm_importance_sampling_mode", vllm_importance_sampling_mode, ROLLOUT_IS_MODES)):
        if value not in allowed:
            raise ConfigError(f"unknown {name} {value!r}; expected one of {list(allowed)}")
    if loss_agg_mode is not None and loss_agg_mode not in LOSS_AGG_MODES:
        raise ConfigError(f"unknown loss_agg_mode {loss_agg_mode!r}; expected None (the loss_type's own) or one "
                          f"of {list(LOSS_AGG_MODES)}")
    _positive("epsilon", epsilon, allow_none=False)
    _positive("epsilon_high", epsilon_high)
    if loss_type == "cispo":
        if epsilon_high is None:
            raise ConfigError("loss_type='cispo' caps the ratio at the *absolute* epsilon_high (MiniMax-M1; TRL "
                              "recommends 5.0); falling back to epsilon=0.2 would cap every ratio at 0.2. Pass "
                              "epsilon_high=5.0 (or your cap).")
        if delta is not None or dual_clip is not None:
            raise ConfigError("delta and dual_clip apply to the clipped surrogate, not to loss_type='cispo' "
                              "(whose ratio is already capped at epsilon_high); drop them")
    _positive("delta", delta, above=1.0)
    _positive("dual_clip", dual_clip, above=1.0)
    for name, value in (("log_ratio_clamp", log_ratio_clamp), ("kl_log_ratio_clamp", kl_log_ratio_clamp),
                        ("kl_clamp", kl_clamp), ("vllm_importance_sampling_clip_max", vllm_importance_sampling_clip_max),
                        ("vllm_importance_sampling_clip_min", vllm_importance_sampling_clip_min)):
        _positive(name, value)
    beta_value = kl_mod.coefficient(beta, "beta")
    if beta_value < 0:
        raise ConfigError(f"beta must be >= 0, got {beta_value}")
    estimator = "full" if kl_estimator == "full" else kl_mod.canonical_estimator(kl_estimator)
    if estimator == "full" and use_bias_correction_kl:
        raise ConfigError("use_bias_correction_kl reweights a sampled KL estimate by r; kl_estimator='full' is "
                          "the exact KL over the vocabulary and needs no importance weight; drop one of them")
    return _Options(loss_type, float(epsilon), float(epsilon if epsilon_high is None else epsilon_high),
                    delta, dual_clip, importance_sampling_level, loss_agg_mode or DEFAULT_AGG_MODE[loss_type],
                    beta_value, estimator, bool(use_bias_correction_kl), log_ratio_clamp, kl_log_ratio_clamp,
                    kl_clamp, vllm_importance_sampling_mode, vllm_importance_sampling_clip_min,
                    vllm_importance_sampling_clip_max)


def check_inputs(logps, old_logps, advantages, mask, ref_logps=None, rollout_logps=None, full_kl=None):
    """Shapes and dtypes at the boundary; returns ``(mask as bool, advantages as [B, 1] or [B, T])``."""
    if not isinstance(logps, torch.Tensor) or logps.dim() != 2 or not logps.dtype.is_floating_point:
        raise InvalidInput("logps must be a float [B, T] tensor of per-token log-probs, got "
                           f"{tuple(logps.shape) if isinstance(logps, torch.Tensor) else type(logps).__name__}")
    shape = tuple(logps.shape)
    for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps), ("rollout_logps", rollout_logps),
                    ("full_kl", full_kl), ("mask", mask)):
        if t is None and name != "mask":
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InvalidInput(f"{name} must be a [B, T] tensor of the shape of logps {shape}, got {got}")
    if not isinstance(advantages, torch.Tensor) or advantages.dim() not in (1, 2) or \
            advantages.shape[0] != shape[0] or (advantages.dim() == 2 and advantages.shape[1] not in (1, shape[1])):
        got = tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else type(advantages).__name__
        raise InvalidInput(f"advantages must be [B] (one per sequence) or [B, T] (per token) with B, T = {shape}, "
                           f"got {got}")
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    return mask.bool(), adv.to(logps.dtype)


def check_kl_inputs(opts: _Options, ref_logps, full_kl) -> None:
    if opts.kl_estimator == "full":
        if full_kl is None and opts.beta != 0:
            raise ConfigError("kl_estimator='full' needs full_kl=refmodel.kl.exact(policy_hidden, policy_head, "
                              "ref_hidden, ref_head, mask) (the [B, T] exact KL with its gradient)")
    elif opts.beta != 0 and ref_logps is None:
        raise ConfigError(f"beta={opts.beta} puts beta * KL(policy || reference) in the loss, but ref_logps is None. "
                          "Pass ref_logps ([B, T] reference log-probs of the same tokens, e.g. "
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
    length = mask.shape[1] if max_completion_length is None else max_completion_length
    _positive("max_completion_length", length, allow_none=False)
    return m / (batch * length)


def log_importance_weights(logps, old_logps, mask, level, clamp=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_w, log_ratio)``: ``log_w`` is ``[B, T]`` (token, sequence_token) or ``[B, 1]`` (sequence)."""
    old = logps.detach() if old_logps is None else old_logps.to(logps.dtype)
    log_ratio = torch.where(mask, logps - old, logps.new_zeros(()))
    if level == "token":
        log_w = log_ratio
    else:
        seq = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        log_w = seq if level == "sequence" else logps - logps.detach() + seq.detach()
    if clamp is not None:  # verl clamps the log-ratio to +-20 before exp
        log_w = log_w.clamp(-clamp, clamp)
    return log_w, log_ratio


def rollout_is_weights(old_logps, rollout_logps, mask, opts: _Options) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's vLLM IS correction ``rho`` (``[B, T]`` or ``[B, 1]``, detached) and where it was masked to 0."""
    diff = torch.where(mask, old_logps.detach() - rollout_logps.to(old_logps.dtype), 0.0)
    diff = torch.nan_to_num(diff, nan=0.0)  # a missing sampler log-prob gives ratio 1, as in TRL
    if opts.rollout_mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    rho = torch.exp(diff)
    if opts.rollout_mode.endswith("truncate"):
        return rho.clamp(min=opts.rollout_clip_min, max=opts.rollout_clip_max), torch.zeros_like(rho, dtype=torch.bool)
    lo = -math.inf if opts.rollout_clip_min is None else opts.rollout_clip_min
    hi = math.inf if opts.rollout_clip_max is None else opts.rollout_clip_max
    invalid = (rho < lo) | (rho > hi)
    return rho.masked_fill(invalid, 0.0), invalid


def token_losses(opts: _Options, logps, log_w, advantages, mask, ref_logps=None, rho=None, full_kl=None):
    """``(L [B, T], pg [B, T], kl [B, T] or None, r)`` per token, before aggregation (works on any equal shape)."""
    coef_1 = torch.exp(log_w)
    if opts.loss_type == "cispo":
        pg = -torch.clamp(coef_1, max=opts.epsilon_high).detach() * advantages * logps
    else:
        coef_2 = torch.clamp(coef_1, 1 - opts.epsilon, 1 + opts.epsilon_high)
        unclipped = coef_1 if opts.delta is None else torch.clamp(coef_1, max=opts.delta)
        pg = -torch.min(unclipped * advantages, coef_2 * advantages)
        if opts.dual_clip is not None:  # verl vanilla: bound the loss of negative-advantage tokens by -c*A
            pg = torch.where(advantages < 0, torch.min(pg, -opts.dual_clip * advantages), pg)
    if rho is not None:
        pg = pg * rho
    kl_t = None
    if opts.kl_estimator == "full" and full_kl is not None:
        kl_t = full_kl.to(logps.dtype)
    elif ref_logps is not None:
        kl_t = kl_mod.per_token_kl(logps, ref_logps, mask, opts.kl_estimator,
                                   log_ratio_clamp=opts.kl_log_ratio_clamp, kl_clamp=opts.kl_clamp)
        if opts.use_bias_correction_kl:  # DeepSeek-V3.2: k3 * pi_theta / pi_old (TRL, Liger)
            kl_t = kl_t * coef_1
    loss = pg if kl_t is None or opts.beta == 0 else pg + opts.beta * kl_t
    zero = loss.new_zeros(())
    return torch.where(mask, loss, zero), torch.where(mask, pg, zero), kl_t, coef_1


__all__ = ["DEFAULT_AGG_MODE", "IMPORTANCE_SAMPLING_LEVELS", "LOSS_AGG_MODES", "LOSS_TYPES", "ROLLOUT_IS_MODES",
           "aggregation_weights", "check_inputs", "check_kl_inputs", "log_importance_weights", "resolve_options",
           "rollout_is_weights", "token_losses"]
