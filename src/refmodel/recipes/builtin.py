"""The built-in verifiable task of ``refmodel demo --algo grpo``: "what comes after N", checked exactly.

:func:`verifiable_prompts` are prompt-only records and :func:`verifiable_reward` is a reward function
in the ``f(prompts, completions) -> [B]`` form :func:`refmodel.recipes.grpo.grpo` takes; a tiny LoRA
policy learns the task on CPU in seconds. Tests and benchmarks of GRPO/PPO use it too (through
:mod:`refmodel.testing`).
"""

from __future__ import annotations

import random


def verifiable_prompts(n: int | None = None, seed: int = 0) -> list[dict[str, str]]:
    """Prompt-only records ``{"prompt": "what comes after N"}`` (N in 0..19) for RL.

    ``n=None`` gives each of the 20 prompts once, in order; otherwise ``n`` prompts drawn with
    ``seed``. The prompt ends with the number, so the answer depends on the last prompt token: a
    lookup the tiny random model can learn by RL alone (GRPO with LoRA: reward 0.006 -> 0.63 in 120 steps,
    0.93 in 250, about a minute on CPU; see ``tests/recipes/test_grpo.py`` and ``refmodel demo --algo grpo``).
    """
    if n is None:
        return [{"prompt": f"what comes after {a}"} for a in range(20)]
    if n < 0:
        raise ValueError(f"n must be >= 0 or None, got {n}")
    rng = random.Random(seed)
    return [{"prompt": f"what comes after {rng.randint(0, 19)}"} for _ in range(n)]


def _prompt_str(prompt) -> str:
    if isinstance(prompt, dict):
        prompt = prompt.get("prompt", "")
    if isinstance(prompt, list):  # a conversation: the last user message asks the question
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        prompt = users[-1] if users else ""
    return str(prompt)


def verifiable_answer(prompt) -> str | None:
    """The one correct answer to a :func:`verifiable_prompts` prompt (text, record or conversation)."""
    words = _prompt_str(prompt).replace("?", " ").split()
    if len(words) >= 4 and words[-4:-1] == ["what", "comes", "after"] and words[-1].isdigit():
        return str(int(words[-1]) + 1)
    return None


def verifiable_reward(prompts, completions):
    """``[B]`` float32 rewards: 1.0 when the completion's first word is the exact answer, else 0.0.

    A reward function in the ``f(prompts, completions) -> [B]`` form the GRPO recipe takes;
    ``prompts[i]`` is row ``i``'s prompt (a record, text or conversation). Prompts it does not know
    score 0.
    """
    import torch

    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        answer, words = verifiable_answer(prompt), str(completion).split()
        out.append(1.0 if answer is not None and words and words[0] == answer else 0.0)
    return torch.tensor(out, dtype=torch.float32)


__all__ = ["verifiable_answer", "verifiable_prompts", "verifiable_reward"]
