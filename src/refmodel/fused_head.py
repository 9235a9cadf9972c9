"""Fused, chunked log-probs of chosen tokens from hidden states and the LM head.

``token_logprobs(hidden, weight, targets)`` returns ``log softmax(f(hidden @ weight.T + bias))[target]``
without ever holding the ``(tokens, vocab)`` logits: rows are processed in chunks whose logits fit a
small budget, and ignored rows never enter the matmul.

Why our own op rather than Liger's or PyTorch's ``linear_cross_entropy``: both compute per-token
losses with a *recompute* backward (3 vocabulary matmuls for a frozen head) and neither supports
temperature; PyTorch returns the per-token loss in the input dtype. Here the forward also
accumulates the expected embedding ``E_i = sum_j p_ij f'_ij W_j`` (a second matmul), after which
the gradient with respect to the hidden state needs no vocabulary work at all:

    d logp_i / d h_i = s * (f'_iy W_y - E_i)

so a frozen-head (LoRA) policy pass costs 2 matmuls instead of 3, and the reference pass (no grad)
costs exactly 1. A trainable head adds a recompute and the ``dW`` matmul in the backward (4 total).

The logit transform applied to ``a = hidden @ weight.T + bias`` is, in the order models apply it:
``z = softcap * tanh(logit_scale * a / softcap) / temperature`` (``softcap=None`` skips the tanh).
Precision: log-sum-exp, log-probs, entropy and the gradient accumulators are float32; with
``fp32_accumulation`` the logits are float32 even for bf16/fp16 operands (``mm(out_dtype=...)`` on
CUDA, operands upcast once per call on CPU where that kernel does not exist).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .errors import InvalidInput

# Per-chunk logits budget (elements). Chunk temporaries are a few multiples of this in fp32, which
# keeps the head's extra memory far below the full logits while the chunk GEMM stays efficient.
DEFAULT_CHUNK_ELEMENTS = 1 << 21
MIN_CHUNK_ROWS = 16
_HALF = (torch.bfloat16, torch.float16)


class TokenLogprobs(NamedTuple):
    """Result of ``token_logprobs(..., return_entropy=True)``.

    ``logprobs``: float32, same leading shape as ``targets``, nats, 0 at ignored targets.
    ``entropy``: float32, same shape, entropy (nats) of the transformed next-token distribution, 0 at
    ignored targets; differentiable.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk so that one chunk's logits hold about ``DEFAULT_CHUNK_ELEMENTS`` values."""
    return max(MIN_CHUNK_ROWS, DEFAULT_CHUNK_ELEMENTS // max(1, vocab_size))


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 accumulation, or float64 for float64 inputs (so float64 gradcheck is meaningful)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _logits_fp32(h: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, fp32: bool,
                 out: torch.Tensor | None) -> torch.Tensor:
    """``h @ weight_t (+ bias)`` as float32 (float64 for float64 inputs) ``[M, V]``, into ``out`` if given."""
    if h.dtype in (torch.float32, torch.float64):
        z = torch.mm(h, weight_t, out=out) if out is not None else h @ weight_t
    elif fp32 and h.is_cuda:
        z = torch.mm(h, weight_t, out_dtype=torch.float32)
    else:  # without fp32 accumulation the logits are rounded to the operand dtype first
        z = (h @ weight_t).float()
    if bias is not None:
        z += bias.to(z.dtype)
    return z


class _Transform(NamedTuple):
    logit_scale: float
    softcap: float | None
    temperature: float

    def apply_(self, a: torch.Tensor) -> torch.Tensor | None:
        """Transform fp32 logits ``a`` in place; return ``dz/da`` ``[M, V]``, or None when it is constant."""
        if self.logit_scale != 1.0:
            a.mul_(self.logit_scale)
        deriv = None
        if self.softcap is not None:
            a.div_(self.softcap).tanh_()
            deriv = torch.mul(a, a).neg_().add_(1.0).mul_(self.logit_scale / self.temperature)
            a.mul_(self.softcap)
        if self.temperature != 1.0:
            a.div_(self.temperature)
        return deriv

    @property
    def const_deriv(self) -> float:
        return self.logit_scale / self.temperature


class _ChunkStats(NamedTuple):
    logp: torch.Tensor  # [M] target log-prob
    entropy: torch.Tensor | None  # [M]
    # [M, V] gradient coefficients, unnormalised: coef / denom = p * f' (and p * (logp + ent) * f')
    coef: torch.Tensor | None
    coef_ent: torch.Tensor | None
    denom: torch.Tensor  # [M, 1] softmax normaliser (sum of exp(z - max))
    deriv_y: torch.Tensor  # [M] f' at the target


def _chunk_forward(h, weight_t, bias, y, tf: _Transform, fp32: bool, need_coef: bool, want_entropy: bool,
                   need_coef_ent: bool, buf: torch.Tensor | None) -> _ChunkStats:
    """One chunk of rows: everything happens in place in ``buf`` (the logits) to keep memory flat."""
    z = _logits_fp32(h, weight_t, bias, fp32, buf)
    deriv = tf.apply_(z)
    z_y = z.gather(1, y[:, None])
    deriv_y = deriv.gather(1, y[:, None]).squeeze(1) if deriv is not None else torch.full_like(
        z_y.squeeze(1), tf.const_deriv)
    z_max = z.amax(dim=-1, keepdim=True)
    entropy = coef_ent = None
    shifted = torch.sub(z, z_max) if want_entropy else None
    e = z.sub_(z_max).exp_()  # z is consumed: e = exp(z - max)
    denom = e.sum(dim=-1, keepdim=True)
    log_denom = denom.log()
    logp = (z_y - z_max - log_denom).squeeze(1)
    if want_entropy:
        log_p = shifted.sub_(log_denom)
        entropy = -(e * log_p).sum(-1) / denom.squeeze(1)
        if need_coef_ent:  # p * (z - E_p[z]) * f'  ==  e * (log p + H) * f' / denom
            coef_ent = log_p.add_(entropy[:, None]).mul_(e)
            if deriv is not None:
                coef_ent.mul_(deriv)
            elif tf.const_deriv != 1.0:
                coef_ent.mul_(tf.const_deriv)
    coef = None
    if need_coef:
        coef = e
        if deriv is not None:
            coef.mul_(deriv)
        elif tf.const_deriv != 1.0:
            coef.mul_(tf.const_deriv)
    return _ChunkStats(logp, entropy, coef, coef_ent, denom, deriv_y)


def _workspace(rows: int, chunk: int, w: torch.Tensor) -> torch.Tensor | None:
    """A reusable ``[min(chunk, rows), V]`` logits buffer on CPU (fresh pages per chunk cost more than the math)."""
    if rows == 0 or w.is_cuda or w.dtype not in (torch.float32, torch.float64):
        return None  # the CUDA caching allocator already reuses blocks
    return torch.empty(min(chunk, rows), w.shape[0], dtype=w.dtype, device=w.device)


class _FusedTokenLogprobs(torch.autograd.Function):
    """Custom autograd over compacted rows: ``h [N, H]``, ``weight [V, H]``, ``y [N]`` -> ``[N]``, ``[N]``."""

    @staticmethod
    def forward(ctx, h, weight, bias, y, tf, chunk, fp32, want_entropy):
        n, hidden_size = h.shape
        need_dh = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
        cpu_upcast = fp32 and not h.is_cuda and weight.dtype in _HALF
        w = weight.float() if cpu_upcast else weight
        weight_t = w.t()
        acc = dict(dtype=_acc_dtype(h), device=h.device)
        logp = torch.empty(n, **acc)
        entropy = torch.empty(n, **acc) if want_entropy else None
        deriv_y = torch.empty(n, **acc)
        expected = torch.empty(n, hidden_size, **acc) if need_dh else None
        expected_ent = torch.empty(n, hidden_size, **acc) if need_dh and want_entropy else None
        buf = _workspace(n, chunk, w)
        for start in range(0, n, chunk):
            sl = slice(start, min(start + chunk, n))
            hc = h[sl].float() if cpu_upcast else h[sl]
            out = buf[: hc.shape[0]] if buf is not None else None
            st = _chunk_forward(hc, weight_t, bias, y[sl], tf, fp32, need_dh, want_entropy,
                                need_dh and want_entropy, out)
            logp[sl], deriv_y[sl] = st.logp, st.deriv_y
            if want_entropy:
                entropy[sl] = st.entropy
            if need_dh:  # normalise the [M, H] product rather than the [M, V] coefficients
                expected[sl] = _coef_matmul(st.coef, w).div_(st.denom)
                if want_entropy:
                    expected_ent[sl] = _coef_matmul(st.coef_ent, w).div_(st.denom)
        ctx.tf, ctx.chunk, ctx.fp32, ctx.want_entropy = tf, chunk, fp32, want_entropy
        ctx.need_dw = need_dw
        ctx.save_for_backward(h, weight, bias, y, deriv_y, expected, expected_ent)
        if entropy is None:
            entropy = logp.new_zeros(0)
        ctx.mark_non_differentiable(y)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        h, weight, bias, y, deriv_y, expected, expected_ent = ctx.saved_tensors
        tf, want_entropy = ctx.tf, ctx.want_entropy
        acc = deriv_y.dtype
        g_logp = g_logp.to(acc) if g_logp is not None else torch.zeros_like(deriv_y)
        use_ent = want_entropy and g_ent is not None and g_ent.numel() > 0
        g_ent = g_ent.to(acc) if use_ent else None
        dh = dw = db = None
        if ctx.needs_input_grad[0]:
            w_y = weight[y].to(acc)
            dh = g_logp[:, None] * (deriv_y[:, None] * w_y - expected)
            if use_ent:
                dh -= g_ent[:, None] * expected_ent
            dh = dh.to(h.dtype)
        if ctx.need_dw:
            dw, db = _weight_grads(h, weight, bias, y, tf, ctx.chunk, ctx.fp32, g_logp, g_ent)
            if not ctx.needs_input_grad[1]:
                dw = None
        return dh, dw, db, None, None, None, None, None


def _coef_matmul(coef: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``coef [M, K] @ w [K, H]`` with float32 accumulation (coef cast to w's dtype on CUDA)."""
    if w.dtype in (torch.float32, torch.float64):
        return coef.to(w.dtype) @ w
    if w.is_cuda:
        return torch.mm(coef.to(w.dtype), w, out_dtype=torch.float32)
    return coef @ w.float()


def _weight_grads(h, weight, bias, y, tf, chunk, fp32, g_logp, g_ent):
    """Recompute each chunk's probabilities and accumulate ``dW [V, H]`` and ``db [V]`` in float32."""
    n = h.shape[0]
    cpu_upcast = fp32 and not h.is_cuda and weight.dtype in _HALF
    w = weight.float() if cpu_upcast else weight
    weight_t = w.t()
    acc = dict(dtype=_acc_dtype(weight), device=weight.device)
    dw = torch.zeros(weight.shape, **acc)
    db = torch.zeros(weight.shape[0], **acc) if bias is not None else None
    buf = _workspace(n, chunk, w)
    with torch.no_grad():
        for start in range(0, n, chunk):
            sl = slice(start, min(start + chunk, n))
            hc = h[sl].float() if cpu_upcast else h[sl]
            out = buf[: hc.shape[0]] if buf is not None else None
            st = _chunk_forward(hc, weight_t, bias, y[sl], tf, fp32, True, g_ent is not None,
                                g_ent is not None, out)
            # dlogp/da_j = f'_y [j == y] - p_j f'_j ; d ent/da_j = -p_j (z_j - E[z]) f'_j
            grad_a = st.coef.mul_(-g_logp[sl, None] / st.denom)
            if g_ent is not None:
                grad_a.sub_(st.coef_ent.mul_(g_ent[sl, None] / st.denom))
            grad_a.scatter_add_(1, y[sl, None], (g_logp[sl] * st.deriv_y)[:, None])
            dw += _coef_matmul(grad_a.t(), hc)
            if db is not None:
                db += grad_a.sum(0)
    return dw.to(weight.dtype), (db.to(bias.dtype) if db is not None else None)


def _validate(hidden, weight, targets, bias, temperature, logit_scale, softcap, chunk_size) -> None:
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
    if not (temperature > 0 and math.isfinite(temperature)):
        raise InvalidInput(f"temperature must be a positive finite number, got {temperature}")
    if not (logit_scale > 0 and math.isfinite(logit_scale)):
        raise InvalidInput(f"logit_scale must be a positive finite number, got {logit_scale}")
    if softcap is not None and not (softcap > 0 and math.isfinite(softcap)):
        raise InvalidInput(f"softcap must be None or a positive finite number, got {softcap}")
    if chunk_size is not None and chunk_size < 1:
        raise InvalidInput(f"chunk_size must be >= 1 rows, got {chunk_size}")


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
        chunk_size: rows per chunk; default keeps one chunk's logits at ~2M values (8 MiB fp32).
        return_entropy: also return the (differentiable) entropy per position.
        fp32_accumulation: float32 logits even for low-precision operands (``cast_logprobs_to_fp32``).

    Returns:
        float32 (float64 for float64 inputs) log-probs shaped like ``targets``, or a :class:`TokenLogprobs` with the entropy.
        Gradients flow exactly to ``hidden``, ``weight`` and ``bias``.
    """
    _validate(hidden, weight, targets, bias, temperature, logit_scale, softcap, chunk_size)
    lead_shape = targets.shape
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1)
    keep = flat_t != ignore_index
    rows = keep.nonzero().squeeze(1)
    y = flat_t[rows].long()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= weight.shape[0]):
        bad = y[(y < 0) | (y >= weight.shape[0])][0].item()
        raise InvalidInput(f"target id {bad} is outside the vocabulary [0, {weight.shape[0]}) "
                           f"(and is not ignore_index={ignore_index})")
    h = flat_h.index_select(0, rows)
    if h.dtype != weight.dtype:  # e.g. bf16 hidden with an fp32 head: compute in the wider type
        wide = torch.promote_types(h.dtype, weight.dtype)
        h, weight = h.to(wide), weight.to(wide)
        bias = bias.to(wide) if bias is not None else None
    tf = _Transform(float(logit_scale), None if softcap is None else float(softcap), float(temperature))
    chunk = chunk_size or default_chunk_rows(weight.shape[0])
    logp_rows, ent_rows = _FusedTokenLogprobs.apply(h, weight, bias, y, tf, chunk, fp32_accumulation,
                                                    return_entropy)
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
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    log_p = torch.log_softmax(logits, dim=-1)
    keep = targets != ignore_index
    safe = torch.where(keep, targets, torch.zeros_like(targets)).long()
    out = log_p.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * keep
    if not return_entropy:
        return out
    entropy = -(log_p.exp() * log_p).sum(-1) * keep
    return TokenLogprobs(out, entropy)


__all__ = ["TokenLogprobs", "token_logprobs", "naive_token_logprobs", "default_chunk_rows"]
