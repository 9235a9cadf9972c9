"""A real PEFT LoRA policy for tests: an adapter whose B factors are random, so the policy differs from its base.

(A fresh LoRA adapter has ``B = 0``, so policy and base would give the same log-probs and a test that
mixes them up could not fail.) Needs the ``peft`` extra.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .._optional import require


def lora_policy(model: nn.Module, *, r: int = 4, seed: int = 1, scale: float = 0.3, lora_dropout: float = 0.0,
                perturb: bool = True, **config) -> nn.Module:
    """A ``peft.PeftModel`` with LoRA on every linear layer of a deep copy of ``model`` (``model`` is untouched).

    Args:
        r: LoRA rank (``lora_alpha = 2 r``).
        seed, scale: the random B factors (and ``modules_to_save`` copies) get ``N(0, scale^2)`` added.
        lora_dropout: 0 by default (a training-mode policy is deterministic); a test that checks that a
            reference runs in eval mode sets it > 0, so that forgetting eval mode shows as noise.
        perturb: ``False`` keeps B = 0 (the policy equals its base).
        config: more ``peft.LoraConfig`` options (``modules_to_save``, ``use_dora``, ``bias``, ...).
    """
    peft = require("peft", "peft")
    policy = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=lora_dropout, **config))
    if perturb:
        perturb_adapter(policy, seed=seed, scale=scale)
    return policy


@torch.no_grad()
def perturb_adapter(policy: nn.Module, seed: int = 1, scale: float = 0.3, adapter: str = "default") -> None:
    """Add ``N(0, scale^2)`` noise to the LoRA B factors and ``modules_to_save`` copies of ``adapter``."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in policy.named_parameters():
        if f".{adapter}." in name and ("lora_B" in name or "modules_to_save" in name):
            p.add_(torch.randn(p.shape, generator=gen) * scale)


__all__ = ["lora_policy", "perturb_adapter"]
