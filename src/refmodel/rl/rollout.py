"""Rollouts: ``num_generations`` sampled completions per prompt from a Hugging Face causal LM.

``generate_rollouts(policy, tokenizer, prompts, SamplingConfig(...))`` left-pads the prompts, calls
``model.generate`` with sampling (temperature, top-k, top-p, max new tokens, stop at EOS) and returns
a typed :class:`Rollouts` laid out as every refmodel scorer expects:

    input_ids [B, T] = left-padded prompt | completion (right-padded after EOS)
    attention_mask [B, T]: real prompt and completion tokens (the EOS included, padding after it not)
    completion_mask [B, T]: the completion tokens, EOS included (the tokens a policy loss scores)

``B = len(prompts) * num_generations``; rows of one prompt are adjacent (``group_index`` says which
prompt a row belongs to, as ``refmodel.losses.group_advantages`` expects). ``sampler_logprobs`` ``[B, T]`` are
the log-probs of the *processed* distribution the tokens were drawn from (after temperature, top-k,
top-p: what vLLM reports as ``processed_logprobs``), aligned like :func:`refmodel.model_logprobs`.
With top-k/top-p they are renormalised over the kept support, so they differ from the trainer's
full-vocabulary log-probs by the kept mass (trl#6789); without truncation they equal
``model_logprobs(policy, ..., temperature=T)`` up to float error (tested).

Prompts are prompt-only records ``{"prompt": "text"}`` or ``{"prompt": [{"role", "content"}, ...]}``,
or bare text or messages, tokenized by the one prompt rule, :func:`refmodel.data.tokenize_prompt`
(TRL's ``GRPOTrainer._tokenize_prompts``: text with the tokenizer's special tokens, messages through the
chat template with ``add_generation_prompt=True``), and left-padded by the one padder,
:func:`refmodel.data.collate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from .. import validation
from .._deprecation import renamed_fields
from ..data import collate, tokenize_prompts
from ..errors import ConfigError, DataFormatError


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled (names as in ``transformers.GenerationConfig`` / TRL's GRPOConfig).

    ``top_k=0`` and ``top_p=1.0`` switch truncation off (sample from the whole tempered distribution).
    """

    num_generations: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None  # seeds torch's generator before sampling (reproducible rollouts)

    def __post_init__(self):
        if not isinstance(self.num_generations, int) or self.num_generations < 1:
            raise ConfigError(f"num_generations must be an integer >= 1, got {self.num_generations!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        validation.temperature(self.temperature, error=ConfigError)  # sampling needs it: greedy is no rollout
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")


@renamed_fields(sampler_logps="sampler_logprobs")
@dataclass
class Rollouts:
    """A batch of sampled completions, ``B = num_prompts * num_generations`` rows (see module docstring).

    Attributes:
        input_ids: ``[B, T]`` long, prompt (left-padded) then completion (right-padded with ``pad_id``).
        attention_mask: ``[B, T]`` bool, real tokens.
        completion_mask: ``[B, T]`` bool, completion tokens up to and including the first EOS.
        prompt_lengths: ``[B]`` long, real prompt tokens per row.
        completion_lengths: ``[B]`` long, completion tokens per row (EOS included).
        group_index: ``[B]`` long, index of the row's prompt in ``prompts``.
        sampler_logprobs: ``[B, T]`` float32 nats, log-prob of each completion token under the processed
            sampling distribution; 0 outside ``completion_mask``.
        prompts: the prompt records (one per group), completions: the decoded completion texts ``[B]``.
        terminated: ``[B]`` bool, the completion ended with EOS (False: cut at ``max_new_tokens``).
        prompt_width: ``P``, the column where completions start (``input_ids[:, P:]`` are completion slots).
        temperature: the sampling temperature (old/reference log-probs must be scored at it).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    prompt_lengths: torch.Tensor
    completion_lengths: torch.Tensor
    group_index: torch.Tensor
    sampler_logprobs: torch.Tensor
    prompts: list
    completions: list[str]
    terminated: torch.Tensor
    prompt_width: int
    temperature: float
    num_generations: int

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device) -> Rollouts:
        """A copy with every tensor on ``device``."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in kw.items():
            if isinstance(v, torch.Tensor):
                kw[k] = v.to(device)
        return Rollouts(**kw)

    def select(self, rows: torch.Tensor | Sequence[int]) -> Rollouts:
        """The rows ``rows`` (a micro-batch); ``prompts`` and text lists are sliced to match."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in kw.items():
            if isinstance(v, torch.Tensor):
                kw[k] = v[idx.to(v.device)]
        kw["completions"] = [self.completions[i] for i in idx.tolist()]
        return Rollouts(**kw)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_and_eos(tokenizer, model) -> tuple[int, set[int]]:
    gen = getattr(model, "generation_config", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None and gen is not None:
        eos = gen.eos_token_id
    if eos is None:
        raise ConfigError("rollouts stop at EOS, but neither the tokenizer nor the generation config has an "
                          "eos_token_id; set tokenizer.eos_token")
    eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}
    pad = getattr(tokenizer, "pad_token_id", None)
    return (int(pad) if pad is not None else min(eos_ids)), eos_ids


@torch.no_grad()
def generate_rollouts(policy: nn.Module, tokenizer, prompts: Sequence, config: SamplingConfig = SamplingConfig(),
                      ) -> Rollouts:
    """Sample ``config.num_generations`` completions for each of ``prompts`` (see module docstring).

    The policy runs in eval mode (no dropout) for sampling and is put back in its own mode after.
    """
    if len(prompts) == 0:
        raise DataFormatError("generate_rollouts needs at least one prompt")
    pad_id, eos_ids = _pad_and_eos(tokenizer, policy)
    g = config.num_generations
    device = _device(policy)
    # left padding: every prompt ends at column width - 1, where generation starts
    batch = collate([(ids, None) for ids in tokenize_prompts(prompts, tokenizer) for _ in range(g)], pad_id,
                    side="left")
    ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    width = ids.shape[1]
    if config.seed is not None:
        torch.manual_seed(config.seed)
    was_training = policy.training
    policy.eval()
    generate: Any = policy.generate  # a transformers model's GenerationMixin.generate
    try:
        out = generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=float(config.temperature),
                       top_k=config.top_k, top_p=float(config.top_p), max_new_tokens=config.max_new_tokens,
                       eos_token_id=sorted(eos_ids), pad_token_id=pad_id, output_scores=True,
                       return_dict_in_generate=True, use_cache=True)
    finally:
        policy.train(was_training)
    completion = out.sequences[:, width:]
    n_new = completion.shape[1]
    # ``scores`` are the processed logits (after the temperature, top-k and top-p warpers), one [B, V]
    # per new token; -inf outside the kept support, so log_softmax renormalises over it.
    if n_new:
        scores = torch.stack(out.scores, dim=1).float()  # [B, n_new, V]
        sampled = torch.log_softmax(scores, dim=-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    else:
        sampled = torch.zeros(completion.shape, dtype=torch.float32, device=device)
    is_eos = torch.zeros_like(completion, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= completion == e
    # keep tokens up to and including the first EOS: exclusive cumsum of EOS hits must be 0
    before_eos = (is_eos.long().cumsum(1) - is_eos.long()) == 0
    comp_mask = before_eos
    terminated = is_eos.any(1)
    completion = torch.where(comp_mask, completion, torch.full_like(completion, pad_id))
    input_ids = torch.cat([ids, completion], dim=1)
    attention = torch.cat([attn.bool(), comp_mask], dim=1)
    completion_mask = torch.cat([torch.zeros_like(attn, dtype=torch.bool), comp_mask], dim=1)
    sampler_logprobs = torch.cat([torch.zeros(ids.shape, dtype=torch.float32, device=device),
                               torch.where(comp_mask, sampled, torch.zeros_like(sampled))], dim=1)
    texts = tokenizer.batch_decode([row[m].tolist() for row, m in zip(completion, comp_mask, strict=True)],
                                   skip_special_tokens=True)
    return Rollouts(
        input_ids=input_ids, attention_mask=attention, completion_mask=completion_mask,
        prompt_lengths=attn.sum(1), completion_lengths=comp_mask.sum(1),
        group_index=torch.arange(len(prompts), device=device).repeat_interleave(g),
        sampler_logprobs=sampler_logprobs, prompts=list(prompts), completions=[t.strip() for t in texts],
        terminated=terminated, prompt_width=width, temperature=float(config.temperature), num_generations=g)


__all__ = ["Rollouts", "SamplingConfig", "generate_rollouts"]
