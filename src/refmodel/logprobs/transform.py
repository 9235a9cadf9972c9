"""The logit transform, written once: what a model and a sampler do to ``a = hidden @ W.T + b`` before the softmax.

In the order models apply it (Cohere/Granite scale, Gemma-2 final soft-cap, then the sampler's temperature):

    z = softcap * tanh(logit_scale * a / softcap) / temperature      (``softcap=None`` skips the tanh)

Two forms of the same rule: :func:`apply_logit_transform` on full logits (differentiable, out of place; the
naive oracles and the fallbacks that hold ``[..., V]`` logits) and :class:`LogitTransform`, which the tile
kernels apply in place to each ``[rows, vocab-tile]`` tile and which also returns the derivative the fused
backward needs. :func:`full_log_softmax` is the full-softmax oracle's first half (transform, then
``log_softmax``); :func:`refmodel.logprobs.head.logprobs_from_logits` gathers the targets from it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def apply_logit_transform(logits: torch.Tensor, *, scale: float = 1.0, softcap: float | None = None,
                          temperature: float = 1.0) -> torch.Tensor:
    """``softcap * tanh(scale * logits / softcap) / temperature`` (module docstring), out of place.

    Args:
        logits: ``[..., V]`` raw head output (any float dtype).
        scale: the model's logit scale (Cohere multiplies, Granite divides: pass ``1 / logits_scaling``).
        softcap: the model's final-logit soft-cap (Gemma-2), or None.
        temperature: the sampling temperature.

    Returns:
        ``[..., V]`` in float32 (float64 for float64 input), differentiable.
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if scale != 1.0:
        z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if temperature != 1.0:
        z = z / temperature
    return z


def full_log_softmax(logits: torch.Tensor, *, scale: float = 1.0, softcap: float | None = None,
                     temperature: float = 1.0) -> torch.Tensor:
    """``[..., V]`` log-probabilities (nats, float32 or float64) of the transformed ``logits``: the naive
    full-softmax reference the fused kernels are tested against (and the fallback for heads they cannot run)."""
    return torch.log_softmax(apply_logit_transform(logits, scale=scale, softcap=softcap, temperature=temperature),
                             dim=-1)


class LogitTransform(NamedTuple):
    """The transform's parameters, as the tile kernels apply it: ``softcap * tanh(scale * a / softcap) / temperature``.

    ``logit_scale`` and ``softcap`` are the model's (read from its config by
    :func:`refmodel.logprobs.model.logit_transform`: Cohere, Granite, Gemma-2); ``temperature`` is the
    caller's sampling temperature.
    """

    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    @classmethod
    def of(cls, logit_scale: float, softcap: float | None, temperature: float) -> LogitTransform:
        """Built from user numbers (ints, numpy scalars) as plain floats, so the kernels' checks compare floats."""
        return cls(float(logit_scale), None if softcap is None else float(softcap), float(temperature))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """:func:`apply_logit_transform` with these parameters (out of place, differentiable)."""
        return apply_logit_transform(logits, scale=self.logit_scale, softcap=self.softcap,
                                     temperature=self.temperature)

    def apply_(self, a: torch.Tensor) -> torch.Tensor | None:
        """Transform fp32 logits ``a`` ``[M, V]`` in place; return ``dz/da`` ``[M, V]``, or None when it is constant
        (then :attr:`const_deriv`). Same arithmetic, in the same order, as :func:`apply_logit_transform`."""
        if self.logit_scale != 1.0:
            a.mul_(self.logit_scale)
        deriv = None
        if self.softcap is not None:
            a.div_(self.softcap).tanh_()
            # d/da [c tanh(s a / c) / T] = (1 - tanh^2) s / T, from the tanh already in the buffer
            deriv = torch.mul(a, a).neg_().add_(1.0).mul_(self.logit_scale / self.temperature)
            a.mul_(self.softcap)
        if self.temperature != 1.0:
            a.div_(self.temperature)
        return deriv

    @property
    def const_deriv(self) -> float:
        """``dz/da`` without a soft-cap: ``logit_scale / temperature``."""
        return self.logit_scale / self.temperature


__all__ = ["LogitTransform", "apply_logit_transform", "full_log_softmax"]
