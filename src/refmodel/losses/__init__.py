"""Losses on reference log-probs: the DPO family (:mod:`.preference`) and KL estimators (:mod:`.kl`)."""

from . import kl
from .preference import DPO_LOSS_TYPES, PreferenceLoss, dpo, kto, orpo, simpo

__all__ = ["DPO_LOSS_TYPES", "PreferenceLoss", "dpo", "kl", "kto", "orpo", "simpo"]
