"""Losses on reference log-probs: the DPO family (:mod:`.preference`), policy-gradient losses (:mod:`.policy`),
advantages (:mod:`.advantages`) and KL estimators, exact KL and controllers (:mod:`.kl`)."""

from . import kl
from .advantages import GAE, gae_advantages, group_advantages, rloo_advantages
from .fused_policy import fused_policy_loss
from .kl import AdaptiveKLController, FixedKLController, KLPenalizedRewards, kl_penalized_rewards
from .policy import PolicyLoss, policy_loss
from .policy_config import PolicyLossConfig
from .preference import DPO_LOSS_TYPES, PreferenceLoss, dpo, kto, orpo, simpo

__all__ = ["DPO_LOSS_TYPES", "GAE", "AdaptiveKLController", "FixedKLController", "KLPenalizedRewards",
           "PolicyLoss", "PolicyLossConfig", "PreferenceLoss", "dpo", "fused_policy_loss", "gae_advantages",
           "group_advantages", "kl", "kl_penalized_rewards", "kto", "orpo", "policy_loss", "rloo_advantages", "simpo"]
