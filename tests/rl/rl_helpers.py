"""Helpers for the RL tests: rollouts with EOS (the LoRA policy is ``refmodel.testing.lora.lora_policy``).

(Not named conftest: ``from conftest import`` would clash with tests/conftest.py.)
"""

from __future__ import annotations

import copy

import torch

from refmodel.rl import SamplingConfig, generate_rollouts
from refmodel.testing import verifiable_prompts


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
