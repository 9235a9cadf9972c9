"""Fused, chunked log-probs of chosen tokens from hidden states and the LM head.

``token_logprobs(hidden, weight, targets)`` returns ``log softmax(f(hidden @ weight.T + bias))[target]``
without ever holding the ``(tokens, vocab)`` logits: rows are processed in chunks whose logits fit a
small budget, and ignored rows never enter the matmul.

Why our own op rather than Liger's or PyTorch's ``linear_cross_entropy``: both compute per-token
losses with a *recompute* backward (3 vocabulary matmuls for a frozen head) and neither supports
temperature; PyTorch returns the per-token loss in the input dtype. Ours accumulates the expected
embedding in the forward so the hidden-state gradient needs no vocabulary matmul (see
:mod:`refmodel.logprobs.kernel`): 1 matmul for a reference pass, 2 for a frozen head, 4 for a trainable one.

The logit transform applied to ``a = hidden @ weight.T + bias`` is, in the order models apply it:
``z = softcap * tanh(logit_scale * a / softcap) / temperature`` (``softcap=None`` skips the tanh;
:mod:`refmodel.logprobs.transform` owns it).
Precision: log-sum-exp, log-probs, entropy and the gradient accumulators are float32; with
``fp32_accumulation`` the logits are float32 even for bf16/fp16 operands (``mm(out_dtype=...)`` on
CUDA; on CPU, where that kernel does not exist, a low-precision weight is upcast one vocabulary tile at a time).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import InvalidInput
from ..validation import positive_finite
from ..validation import temperature as check_temperature
from .kernel import FusedTokenLogprobs
from .tiles import promote_operands
from .transform import LogitTransform, full_log_softmax


class TokenLogprobs(NamedTuple):
    """Result of ``token_logprobs(..., return_entropy=True)``.

    ``logprobs``: float32, same leading shape as ``targets``, nats, 0 at ignored targets.
    ``entropy``: float32, same shape, entropy (nats) of the transformed next-token distribution, 0 at
    ignored targets; differentiable.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor


def check_head_inputs(hidden, weight, targets, bias, temperature, logit_scale, softcap, chunk_size,
                      vocab_chunk_size) -> None:
    if weight.dim() != 2:
        raise InvalidInput(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    if hidden.dim() not in (2, 3) or hidden.shape[-1] != weight.shape[1]:
        raise InvalidInput(
            f"hidden must be [N, H] or [B, T, H] with H = weight.shape[1] = {weight.shape[1]}, "
            f"got shape {tuple(hidden.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise InvalidInput(f"targets must have shape {tuple(hidden.shape[:-1])} (hidden without H), "
                           f"got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise InvalidInput(f"targets must be an integer tensor of token ids, got dtype {targets.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise InvalidInput(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    check_temperature(temperature)
    positive_finite(logit_scale, "logit_scale")
    if softcap is not None:
        positive_finite(softcap, "softcap", hint="or None for no soft-cap")
    for name, value in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise InvalidInput(f"{name} must be None or an int >= 1, got {value!r}")


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    return_entropy: bool = False,
    fp32_accumulation: bool = True,
) -> torch.Tensor | TokenLogprobs:
    """Log-probabilities (nats) of ``targets`` under ``softmax(f(hidden @ weight.T + bias))``.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]`` hidden states (any float dtype).
        weight: ``[V, H]`` LM-head weight (tied embeddings are fine).
        targets: ``[N]`` or ``[B, T]`` token ids; positions equal to ``ignore_index`` are skipped
            (they cost no FLOPs) and get exactly 0.
        bias: optional ``[V]`` head bias.
        temperature, logit_scale, softcap: the logit transform (see the module docstring).
        chunk_size: rows per block; vocab_chunk_size: columns per vocabulary tile (defaults: the one rule of the
            tiled kernels, :func:`refmodel.logprobs.tiles.block_shape`: a tile of about the hidden states' size,
            e.g. 1024 x 4096 at N = 1024, H = 2048). The log-sum-exp runs online across vocabulary tiles.
        return_entropy: also return the (differentiable) entropy per position.
        fp32_accumulation: float32 logits even for low-precision operands (``cast_logprobs_to_fp32``).

    Returns:
        float32 (float64 for float64 inputs) log-probs shaped like ``targets``, or a :class:`TokenLogprobs` with the entropy.
        Gradients flow exactly to ``hidden``, ``weight`` and ``bias``.
    """
    check_head_inputs(hidden, weight, targets, bias, temperature, logit_scale, softcap, chunk_size, vocab_chunk_size)
    lead_shape = targets.shape
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1)
    keep = flat_t != ignore_index
    rows = keep.nonzero().squeeze(1)
    y = flat_t[rows].long()
    rows_idx = None if rows.numel() == flat_t.numel() else rows  # all scored: no gather at all
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= weight.shape[0]):
        bad = y[(y < 0) | (y >= weight.shape[0])][0].item()
        raise InvalidInput(f"target id {bad} is outside the vocabulary [0, {weight.shape[0]}) "
                           f"(and is not ignore_index={ignore_index})")
    h, weight, bias = promote_operands(flat_h, weight, bias)  # e.g. bf16 hidden with an fp32 head
    tf = LogitTransform.of(logit_scale, softcap, temperature)
    logp_rows, ent_rows = FusedTokenLogprobs.apply(h, weight, bias, rows_idx, y, tf, (chunk_size, vocab_chunk_size),
                                                    fp32_accumulation, return_entropy)
    out = logp_rows.new_zeros(flat_t.shape[0]).index_put((rows,), logp_rows).reshape(lead_shape)
    if not return_entropy:
        return out
    ent = logp_rows.new_zeros(flat_t.shape[0])
    return TokenLogprobs(out, ent.index_put((rows,), ent_rows).reshape(lead_shape))


def naive_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | TokenLogprobs:
    """The reference implementation: full ``[..., V]`` logits, ``log_softmax`` and ``gather``.

    Same contract as :func:`token_logprobs`; used by tests and as the benchmark baseline.
    """
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return logprobs_from_logits(logits, targets, ignore_index=ignore_index, temperature=temperature,
                                logit_scale=logit_scale, softcap=softcap, return_entropy=return_entropy)


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | TokenLogprobs:
    """The full-softmax oracle on logits already computed: transform, ``log_softmax`` over ``V``, ``gather``.

    Args:
        logits: ``[..., V]`` raw head output at the positions of ``targets`` (position ``t`` predicts
            ``targets[..., t]``; no shift happens here). Pass ``logit_scale=1, softcap=None`` for a model's own
            ``.logits``, which already include them.
        targets: ``[...]`` token ids; ``ignore_index`` positions get exactly 0.
        temperature, logit_scale, softcap: the logit transform (:mod:`refmodel.logprobs.transform`).

    Returns:
        float32 (float64 for float64 logits) log-probs shaped like ``targets``, or :class:`TokenLogprobs` with
        the entropy of each transformed distribution. Differentiable.
    """
    log_p = full_log_softmax(logits, scale=logit_scale, softcap=softcap, temperature=temperature)
    keep = targets != ignore_index
    safe = torch.where(keep, targets, torch.zeros_like(targets)).long()
    out = log_p.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * keep
    if not return_entropy:
        return out
    entropy = -(log_p.exp() * log_p).sum(-1) * keep
    return TokenLogprobs(out, entropy)


__all__ = ["TokenLogprobs", "logprobs_from_logits", "naive_token_logprobs", "token_logprobs"]
