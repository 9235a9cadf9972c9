"""The ``Reference`` protocol every strategy implements, and small helpers they share.

A reference answers ``logprobs(input_ids, attention_mask, score_mask) -> [B, T] float32`` with the
alignment of :func:`refmodel.model_logprobs` (``out[:, t] = log p(ids[t] | ids[:t])``, ``out[:, 0] = 0``,
zeros outside ``score_mask`` and padding), names itself with a ``fingerprint``, reports the
``memory_bytes`` it holds beyond the policy, and may change only in ``on_step(step, policy)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..models.quantize import model_nbytes as module_bytes  # the one byte counter (quantized weights too)


@runtime_checkable
class Reference(Protocol):
    """What a training loop needs from the reference policy pi_ref."""

    @property
    def fingerprint(self) -> str:
        """Identity of the reference's weights and log-prob settings (changes after a sync)."""
        ...

    @property
    def memory_bytes(self) -> int:
        """Bytes of weights this strategy holds beyond the policy (0 when it shares the policy's)."""
        ...

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 score_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T]`` float32 log-probs of ``input_ids`` under pi_ref (no gradient)."""
        ...

    def on_step(self, step: int, policy) -> None:
        """Called after every optimizer step with the global step (1-based) and the policy."""
        ...


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode (no dropout) and restore each one's own flag afterwards."""
    states = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in states:
            m.training = training


@contextlib.contextmanager
def restore_requires_grad(model: nn.Module) -> Iterator[None]:
    """Restore every parameter's ``requires_grad`` on exit (PEFT's ``set_adapter`` toggles them)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


__all__ = ["Reference", "module_bytes", "eval_mode", "restore_requires_grad"]
