"""Helpers for the RL tests: a tiny LoRA policy that differs from its base, rollouts with EOS.

(Not named conftest: ``from conftest import`` would clash with tests/conftest.py.)
"""

from __future__ import annotations

import copy

import torch

from refmodel.rl import SamplingConfig, generate_rollouts
from refmodel.testing import verifiable_prompts


def lora_policy(base, *, r: int = 4, seed: int = 1, scale: float = 0.3, perturb: bool = True):
    """A real PEFT LoRA policy on a deep copy of ``base``; with ``perturb`` its B factors are random."""
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                            lora_dropout=0.0))
    if perturb:
        perturb_adapter(policy, seed=seed, scale=scale)
    return policy


@torch.no_grad()
def perturb_adapter(policy, seed: int = 1, scale: float = 0.3, adapter: str = "default"):
    gen = torch.Generator().manual_seed(seed)
    for name, p in policy.named_parameters():
        if f".{adapter}." in name and "lora_B" in name:
            p.add_(torch.randn(p.shape, generator=gen) * scale)


@torch.no_grad()
def eos_likely(model, eos_id: int = 3, boost: float = 3.0):
    """A copy of ``model`` whose head makes EOS likely, so rollouts stop early and get padded."""
    model = copy.deepcopy(model)
    head = model.get_output_embeddings()
    head.weight[eos_id] += boost * head.weight.mean(0) + 0.0
    if getattr(head, "bias", None) is not None:
        head.bias[eos_id] += boost
    return model


def make_rollouts(policy, tok, n_prompts: int = 4, generations: int = 4, max_new_tokens: int = 5,
                  temperature: float = 1.0, seed: int = 0, **kw):
    cfg = SamplingConfig(num_generations=generations, max_new_tokens=max_new_tokens, temperature=temperature,
                         seed=seed, **kw)
    return generate_rollouts(policy, tok, verifiable_prompts(n_prompts, seed=seed), cfg)
