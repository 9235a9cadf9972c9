"""``PolicyLossConfig``: every option of :func:`refmodel.losses.policy_loss`, with its default, validated once.

The one owner of the policy loss's options: :func:`refmodel.losses.policy_loss`, :func:`refmodel.losses.fused_policy_loss`,
:func:`refmodel.rl.forward_backward` and the GRPO recipe all take one (their option keywords are a convenience
that builds it, :func:`build_config`), and the per-token math (:mod:`.policy_terms`) reads it. Build it once
per run and pass it to every step::

    cfg = PolicyLossConfig(loss_type="grpo", epsilon_high=0.28, beta=0.04)
    out = policy_loss(logprobs, old_logprobs, advantages, mask, config=cfg, ref_logprobs=ref_logprobs)

Only options live here; the per-batch inputs (log-prob tensors, advantages, masks, ``full_kl`` and
``num_items_in_batch``, TRL's per-step global token count) stay arguments of the loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..validation import InvalidInput, positive_finite
from . import kl as kl_mod

LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "ppo")
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = ("token", "sequence", "sequence_token")
LOSS_AGG_MODES: tuple[str, ...] = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                   "seq-mean-token-sum-norm")
ROLLOUT_IS_MODES: tuple[str, ...] = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
DEFAULT_AGG_MODE: dict[str, str] = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean",
                                    "dr_grpo": "seq-mean-token-sum-norm", "dapo": "token-mean",
                                    "cispo": "token-mean", "ppo": "token-mean"}


def _positive(name: str, value: Any, above: float = 0.0, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    positive_finite(value, name, above=above, error=ConfigError, hint="None turns it off" if allow_none else "")


@dataclass(frozen=True)
class PolicyLossConfig:
    """The options of the policy loss (the formulas and their sources: :mod:`refmodel.losses.policy`).

    Frozen and hashable (a KL controller given as ``beta`` is held by reference: its ``value`` is read at
    each call). Every field is checked in ``__post_init__``, so a config that exists is valid;
    ``dataclasses.replace(cfg, epsilon=0.1)`` builds a new, re-checked one. verl/OpenRLHF estimator
    names are normalized (``kl_estimator="low_var_kl"`` is stored as ``"k3"``); ``None`` fields keep their
    meaning ("the loss type's own", "same as epsilon") and are resolved by :attr:`clip_high`, :attr:`agg_mode`.

    Attributes:
        loss_type: TRL's ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo`` (default), ``cispo``; ``ppo`` is the plain
            clipped surrogate with token-mean aggregation (verl ``vanilla``).
        epsilon, epsilon_high: clip range ``[1 - epsilon, 1 + epsilon_high]`` (``epsilon_high=None`` ->
            ``epsilon``; DAPO's clip-higher uses 0.28). For ``cispo``, ``epsilon_high`` is the absolute cap
            (required). delta: TRL's upper bound on the unclipped ratio (INTELLECT-2), > 1. dual_clip: verl's
            ``clip_ratio_c`` (3.0 there), > 1. Neither applies to ``cispo``.
        importance_sampling_level: ``token``, ``sequence`` (GSPO) or ``sequence_token`` (GSPO-token).
        loss_agg_mode: a verl aggregation overriding the loss type's (``None``: the loss type's own).
        beta: the KL coefficient (>= 0), a number or a :class:`~refmodel.kl.FixedKLController` /
            :class:`~refmodel.kl.AdaptiveKLController`. ``beta != 0`` needs ``ref_logprobs`` (``full_kl`` for
            ``kl_estimator="full"``) at the call.
        kl_estimator: ``k1``/``kl``, ``k2``/``mse``, ``k3``/``low_var_kl`` (default, TRL's), ``abs``, with a ``+``
            suffix for k2's straight-through gradient, or ``full`` (the exact KL passed as ``full_kl``).
        use_bias_correction_kl: multiply the KL by the ratio r (DeepSeek-V3.2; TRL, Liger); not with ``full``.
        log_ratio_clamp: clamp ``log r`` before exp (verl: 20; default None as in TRL).
        kl_log_ratio_clamp, kl_clamp: clamps of the KL log-ratio and value (verl k3: 20 and 10); None disables.
        vllm_importance_sampling_mode: how ``rollout_logprobs`` correct the sampler gap: ``token``/``sequence`` x
            ``truncate``/``mask`` (default ``sequence_mask``, TRL's); vllm_importance_sampling_clip_max (3.0,
            TRL's cap) and vllm_importance_sampling_clip_min (None) bound the IS weight.
        max_completion_length: Dr. GRPO's constant normalizer (``None``: the batch's ``T``).
    """

    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    dual_clip: float | None = None
    importance_sampling_level: str = "token"
    loss_agg_mode: str | None = None
    beta: float | kl_mod.FixedKLController | kl_mod.AdaptiveKLController = 0.0
    kl_estimator: str = "k3"
    use_bias_correction_kl: bool = False
    log_ratio_clamp: float | None = None
    kl_log_ratio_clamp: float | None = None
    kl_clamp: float | None = None
    vllm_importance_sampling_mode: str = "sequence_mask"
    vllm_importance_sampling_clip_max: float | None = 3.0
    vllm_importance_sampling_clip_min: float | None = None
    max_completion_length: int | None = None

    def __post_init__(self) -> None:
        """Refuse every invalid value and the combinations that TRL/verl accept and silently mis-train."""
        for name, allowed in (("loss_type", LOSS_TYPES), ("importance_sampling_level", IMPORTANCE_SAMPLING_LEVELS),
                              ("vllm_importance_sampling_mode", ROLLOUT_IS_MODES)):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise ConfigError(f"unknown {name} {value!r}; expected one of {list(allowed)}")
        if self.loss_agg_mode is not None and self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ConfigError(f"unknown loss_agg_mode {self.loss_agg_mode!r}; expected None (the loss_type's own) "
                              f"or one of {list(LOSS_AGG_MODES)}")
        _positive("epsilon", self.epsilon, allow_none=False)
        _positive("epsilon_high", self.epsilon_high)
        if self.loss_type == "cispo":
            if self.epsilon_high is None:
                raise ConfigError("loss_type='cispo' caps the ratio at the *absolute* epsilon_high (MiniMax-M1; TRL "
                                  "recommends 5.0); falling back to epsilon=0.2 would cap every ratio at 0.2. Pass "
                                  "epsilon_high=5.0 (or your cap).")
            if self.delta is not None or self.dual_clip is not None:
                raise ConfigError("delta and dual_clip apply to the clipped surrogate, not to loss_type='cispo' "
                                  "(whose ratio is already capped at epsilon_high); drop them")
        _positive("delta", self.delta, above=1.0)
        _positive("dual_clip", self.dual_clip, above=1.0)
        for name in ("log_ratio_clamp", "kl_log_ratio_clamp", "kl_clamp", "vllm_importance_sampling_clip_max",
                     "vllm_importance_sampling_clip_min", "max_completion_length"):
            _positive(name, getattr(self, name))
        beta = self.beta
        if isinstance(beta, bool):
            raise ConfigError(f"beta must be a number >= 0 or a KL controller, got {beta!r}")
        if not isinstance(beta, (kl_mod.FixedKLController, kl_mod.AdaptiveKLController)):
            beta = kl_mod.coefficient(beta, "beta")  # a number: finite, stored as float
        if kl_mod.coefficient(beta, "beta") < 0:
            raise ConfigError(f"beta must be >= 0 (0 = no KL term, no reference needed), got {self.beta!r}")
        estimator = self.kl_estimator
        if estimator != "full":
            try:
                estimator = kl_mod.canonical_estimator(estimator)
            except InvalidInput as exc:
                raise ConfigError(f"{exc}; a policy loss also takes 'full' (the exact KL, passed as full_kl)"
                                  ) from None
        if self.use_bias_correction_kl not in (True, False):
            raise ConfigError(f"use_bias_correction_kl must be True or False, got {self.use_bias_correction_kl!r}")
        if estimator == "full" and self.use_bias_correction_kl:
            raise ConfigError("use_bias_correction_kl reweights a sampled KL estimate by r; kl_estimator='full' is "
                              "the exact KL over the vocabulary and needs no importance weight; drop one of them")
        # normalized once, so equal options give equal (and equally hashed) configs
        normalized: dict[str, Any] = {"beta": beta, "kl_estimator": estimator,
                                      "use_bias_correction_kl": bool(self.use_bias_correction_kl)}
        for name in ("epsilon", "epsilon_high", "delta", "dual_clip", "log_ratio_clamp", "kl_log_ratio_clamp",
                     "kl_clamp", "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min"):
            value = getattr(self, name)
            normalized[name] = None if value is None else float(value)
        for name, value in normalized.items():
            object.__setattr__(self, name, value)  # frozen: the dataclass's own way to normalize in __post_init__

    @property
    def clip_high(self) -> float:
        """The upper clip ``epsilon_high`` (``epsilon`` when None); for ``cispo`` the absolute ratio cap."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def agg_mode(self) -> str:
        """The aggregation in effect: ``loss_agg_mode``, or the loss type's own (:data:`DEFAULT_AGG_MODE`)."""
        return self.loss_agg_mode or DEFAULT_AGG_MODE[self.loss_type]

    @property
    def beta_value(self) -> float:
        """The KL coefficient now (a controller's current ``value``)."""
        return kl_mod.coefficient(self.beta, "beta")


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(PolicyLossConfig))


def build_config(config: PolicyLossConfig | None, options: Mapping[str, Any], caller: str = "policy_loss",
                 ) -> PolicyLossConfig:
    """The config of a call that takes ``config=`` or option keywords (the convenience that builds one).

    Args:
        config: a :class:`PolicyLossConfig`, or ``None`` (build one from ``options``).
        options: option keywords (the fields of :class:`PolicyLossConfig`); must be empty when ``config`` is given.
        caller: the function's name, for the messages.

    Raises:
        ConfigError: ``config`` is not a :class:`PolicyLossConfig`, both ``config`` and options were given
            (naming them), an option name is unknown (listing the known ones), or an option is invalid.
    """
    if config is not None and not isinstance(config, PolicyLossConfig):
        raise ConfigError(f"{caller}: config must be a refmodel.losses.PolicyLossConfig, got "
                          f"{type(config).__name__}; build one with PolicyLossConfig(loss_type=..., ...)")
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ConfigError(f"{caller}: unknown option(s) {unknown}; the options are the fields of PolicyLossConfig: "
                          f"{sorted(OPTION_NAMES)}")
    if config is None:
        return PolicyLossConfig(**options)
    if options:
        raise ConfigError(f"{caller}: got both config= and the option keyword(s) {sorted(options)}; pass one: "
                          f"dataclasses.replace(config, {', '.join(f'{k}=...' for k in sorted(options))}) "
                          "or the keywords alone")
    return config


__all__ = ["DEFAULT_AGG_MODE", "IMPORTANCE_SAMPLING_LEVELS", "LOSS_AGG_MODES", "LOSS_TYPES", "OPTION_NAMES",
           "ROLLOUT_IS_MODES", "PolicyLossConfig", "build_config"]
