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

# Logits budget of one [rows, vocab-tile] tile (elements): 8 MiB in fp32. Temporaries are a small multiple
# of it, far below the full logits, while tiles stay large enough for an efficient GEMM.
DEFAULT_CHUNK_ELEMENTS = 1 << 21
_HALF = (torch.bfloat16, torch.float16)


class TokenLogprobs(NamedTuple):
    """Result of ``token_logprobs(..., return_entropy=True)``.

    ``logprobs``: float32, same leading shape as ``targets``, nats, 0 at ignored targets.
    ``entropy``: float32, same shape, entropy (nats) of the transformed next-token distribution, 0 at
    ignored targets; differentiable.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor


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


def _tiles(n: int, vocab: int, chunk: int | None, vocab_chunk: int | None) -> tuple[int, int]:
    """``(rows per block, vocab columns per tile)`` for a logits tile of ~``DEFAULT_CHUNK_ELEMENTS``.

    Every row block re-reads the whole weight and every vocab tile re-reads the row block, so the
    memory traffic is ~``N*V*H*(1/rows + 1/cols)``: square-ish tiles minimise it for a fixed budget.
    """
    rows = chunk or min(n, 1 << (DEFAULT_CHUNK_ELEMENTS.bit_length() // 2))
    cols = vocab_chunk or max(128, DEFAULT_CHUNK_ELEMENTS // max(rows, 1))
    return max(1, min(rows, n)), min(cols, vocab)


def _workspace(rows: int, cols: int, w: torch.Tensor, acc: torch.dtype) -> torch.Tensor | None:
    """A reusable ``[rows, cols]`` logits buffer on CPU (fresh pages per tile cost more than the math)."""
    if rows == 0 or w.is_cuda or w.dtype != acc:
        return None  # the CUDA caching allocator already reuses blocks
    return torch.empty(rows, cols, dtype=acc, device=w.device)


def _tile_logits(hb, w, bias, v0, v1, tf, fp32, buf):
    """Transformed fp32 logits of one tile ``[M, v1 - v0]`` and their derivative (None if constant)."""
    out = buf[: hb.shape[0], : v1 - v0] if buf is not None else None
    z = _logits_fp32(hb, w[v0:v1].t(), bias[v0:v1] if bias is not None else None, fp32, out)
    return z, tf.apply_(z)


def _gather_in_tile(z, y, v0, v1, into):
    """``into[i] = z[i, y_i - v0]`` for the rows whose target lies in ``[v0, v1)``."""
    inside = (y >= v0) & (y < v1)
    vals = z.gather(1, (y - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
    return torch.where(inside, vals, into)


class _RowStats(NamedTuple):
    logp: torch.Tensor  # [M]
    lse: torch.Tensor  # [M]
    entropy: torch.Tensor | None  # [M]
    deriv_y: torch.Tensor  # [M]


def _row_block_forward(hb, w, bias, y, tf, fp32, cols, want_entropy, buf, expected, expected_ent) -> _RowStats:
    """Online log-sum-exp over vocab tiles of one row block.

    When ``expected`` (``[M, H]``, a view of the saved tensor) is given, it receives ``sum_j p_j f'_j W_j``
    and ``expected_ent`` receives ``sum_j p_j (z_j - E_p z) f'_j W_j``; both are accumulated in place
    (rescaled as the running max moves) so the block allocates no ``[M, H]`` temporaries.
    """
    vocab = w.shape[0]
    need_dh = expected is not None
    m = s = z_y = deriv_y = t_acc = None
    for v0 in range(0, vocab, cols):
        v1 = min(v0 + cols, vocab)
        z, deriv = _tile_logits(hb, w, bias, v0, v1, tf, fp32, buf)
        if z_y is None:
            z_y = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
            deriv_y = torch.full_like(z_y, tf.const_deriv)
        z_y = _gather_in_tile(z, y, v0, v1, z_y)
        if deriv is not None:
            deriv_y = _gather_in_tile(deriv, y, v0, v1, deriv_y)
        tile_max = z.amax(dim=1)
        m_new = tile_max if m is None else torch.maximum(m, tile_max)
        zs = z.sub_(m_new[:, None])  # z - m_new, in place
        zcopy = zs.clone() if want_entropy else None
        e = zs.exp_()  # exp(z - m_new), in place
        tile_sum = e.sum(dim=1)
        if want_entropy:
            tile_t = (e * zcopy).sum(dim=1)
        first = m is None
        if not first:
            alpha, shift = torch.exp(m - m_new), m - m_new
            if want_entropy:  # T' = alpha (T + (m - m_new) S) + tile
                t_acc = alpha * (t_acc + shift * s) + tile_t
            s = alpha * s + tile_sum
            if need_dh:
                if want_entropy:  # A' = alpha (A + (m - m_new) E) + tile, before E moves
                    expected_ent.addcmul_(expected, shift[:, None]).mul_(alpha[:, None])
                expected.mul_(alpha[:, None])
        else:
            s, t_acc = tile_sum, (tile_t if want_entropy else None)
        if need_dh:
            coef = e.mul_(deriv) if deriv is not None else (
                e.mul_(tf.const_deriv) if tf.const_deriv != 1.0 else e)
            _coef_matmul_into(coef, w[v0:v1], expected, accumulate=not first)
            if want_entropy:
                _coef_matmul_into(zcopy.mul_(coef), w[v0:v1], expected_ent, accumulate=not first)
        m = m_new
    log_s = s.log()
    lse = m + log_s
    logp = z_y - lse
    entropy = None
    if want_entropy:
        mean_shift = t_acc / s  # E_p[z] - m
        entropy = log_s - mean_shift
    if need_dh:
        expected.div_(s[:, None])
        if want_entropy:
            expected_ent.div_(s[:, None]).addcmul_(expected, -mean_shift[:, None])
    return _RowStats(logp, lse, entropy, deriv_y)


class _Forward(NamedTuple):
    logp: torch.Tensor  # [n]
    lse: torch.Tensor  # [n]
    deriv_y: torch.Tensor  # [n]
    entropy: torch.Tensor | None  # [n]
    expected: torch.Tensor | None  # [n, H]
    expected_ent: torch.Tensor | None  # [n, H]


def _forward_rows(h, weight, bias, rows_idx, y, tf, tiles, fp32, want_entropy, need_dh) -> _Forward:
    """Every row block's statistics; the ``[n, H]`` expected embeddings only when ``need_dh``."""
    n, hidden_size = y.shape[0], h.shape[1]
    cpu_upcast = fp32 and not h.is_cuda and weight.dtype in _HALF
    w = weight.float() if cpu_upcast else weight
    acc_dtype = _acc_dtype(h)
    acc = dict(dtype=acc_dtype, device=h.device)
    rows, cols = tiles
    logp, lse, deriv_y = (torch.empty(n, **acc) for _ in range(3))
    entropy = torch.empty(n, **acc) if want_entropy else None
    expected = torch.empty(n, hidden_size, **acc) if need_dh else None
    expected_ent = torch.empty(n, hidden_size, **acc) if need_dh and want_entropy else None
    buf = _workspace(rows, cols, w, acc_dtype)
    for start in range(0, n, rows):
        sl = slice(start, min(start + rows, n))
        hb = _row_block(h, rows_idx, sl, cpu_upcast)
        st = _row_block_forward(hb, w, bias, y[sl], tf, fp32, cols, want_entropy, buf,
                                expected[sl] if need_dh else None,
                                expected_ent[sl] if expected_ent is not None else None)
        logp[sl], lse[sl], deriv_y[sl] = st.logp, st.lse, st.deriv_y
        if want_entropy:
            entropy[sl] = st.entropy
    return _Forward(logp, lse, deriv_y, entropy, expected, expected_ent)


class _FusedTokenLogprobs(torch.autograd.Function):
    """Custom autograd over compacted rows: ``h [N, H]``, ``weight [V, H]``, ``y [N]`` -> ``[N]``, ``[N]``.

    The ``[n, H]`` expected embeddings are kept on ``ctx`` rather than saved, so the backward can turn
    them into ``dh`` in place (the head's extra memory is then one ``[n, H]`` tensor, not two); a second
    backward through a retained graph finds them consumed and recomputes them (one more forward sweep).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, rows_idx, y, tf, tiles, fp32, want_entropy):
        need_dh = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
        tiles = _tiles(y.shape[0], weight.shape[0], *tiles)
        fw = _forward_rows(h, weight, bias, rows_idx, y, tf, tiles, fp32, want_entropy, need_dh)
        ctx.tf, ctx.tiles, ctx.fp32, ctx.want_entropy, ctx.need_dw = tf, tiles, fp32, want_entropy, need_dw
        ctx.expected = (fw.expected, fw.expected_ent) if need_dh else None
        ctx.save_for_backward(h, weight, bias, rows_idx, y, fw.deriv_y, fw.lse, fw.entropy)
        ctx.mark_non_differentiable(y)
        return fw.logp, (fw.entropy if fw.entropy is not None else fw.logp.new_zeros(0))

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        h, weight, bias, rows_idx, y, deriv_y, lse, entropy = ctx.saved_tensors
        acc = deriv_y.dtype
        g_logp = g_logp.to(acc) if g_logp is not None else torch.zeros_like(deriv_y)
        use_ent = ctx.want_entropy and g_ent is not None and g_ent.numel() > 0
        g_ent = g_ent.to(acc) if use_ent else None
        dh = dw = db = None
        if ctx.need_dw:
            dw, db = _weight_grads(h, weight, bias, rows_idx, y, ctx.tf, ctx.tiles, ctx.fp32, lse,
                                   entropy if use_ent else None, g_logp, g_ent)
            if not ctx.needs_input_grad[1]:
                dw = None
        if ctx.needs_input_grad[0]:
            if ctx.expected is None:  # consumed by an earlier backward of a retained graph
                fw = _forward_rows(h, weight, bias, rows_idx, y, ctx.tf, ctx.tiles, ctx.fp32, ctx.want_entropy,
                                   need_dh=True)
                expected, expected_ent = fw.expected, fw.expected_ent
            else:
                (expected, expected_ent), ctx.expected = ctx.expected, None
            dh = _hidden_grad(h, weight, rows_idx, y, deriv_y, expected, expected_ent, g_logp,
                              g_ent if use_ent else None)
        return dh, dw, db, None, None, None, None, None, None


def _hidden_grad(h, weight, rows_idx, y, deriv_y, expected, expected_ent, g_logp, g_ent) -> torch.Tensor:
    """``dh_i = g_i (f'_iy W_y - E_i) - g^ent_i A_i``, written over ``expected`` (which it consumes).

    No vocabulary matmul: only the target rows of ``W`` are gathered, in small blocks.
    """
    block = 256
    for start in range(0, y.shape[0], block):
        sl = slice(start, min(start + block, y.shape[0]))
        g = g_logp[sl, None]
        blk = expected[sl].mul_(-g).addcmul_(weight[y[sl]].to(expected.dtype), deriv_y[sl, None] * g)
        if g_ent is not None:
            blk.addcmul_(expected_ent[sl], g_ent[sl, None], value=-1.0)
    if rows_idx is None and expected.dtype == h.dtype:
        return expected
    dh = torch.zeros_like(h) if rows_idx is not None else torch.empty_like(h)
    if rows_idx is None:
        return dh.copy_(expected)
    return dh.index_copy_(0, rows_idx, expected.to(h.dtype))


def _coef_matmul_into(coef: torch.Tensor, w: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """``out (+)= coef [M, K] @ w [K, H]`` in ``out``'s float32/float64, without an ``[M, H]`` temporary
    where the operands allow it."""
    if w.dtype == out.dtype:
        if accumulate:
            out.addmm_(coef.to(w.dtype), w)
        else:
            torch.mm(coef.to(w.dtype), w, out=out)
    elif accumulate:
        out.add_(_coef_matmul(coef, w))
    else:
        out.copy_(_coef_matmul(coef, w))


def _coef_matmul(coef: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``coef [M, K] @ w [K, H]`` with float32 accumulation (coef cast to w's dtype on CUDA)."""
    if w.dtype in (torch.float32, torch.float64):
        return coef.to(w.dtype) @ w
    if w.is_cuda:
        return torch.mm(coef.to(w.dtype), w, out_dtype=torch.float32)
    return coef @ w.float()


def _row_block(h: torch.Tensor, rows_idx: torch.Tensor | None, sl: slice, upcast: bool) -> torch.Tensor:
    """Rows ``sl`` of the scored rows: a view when every row is scored, else a per-block gather."""
    hb = h[sl] if rows_idx is None else h.index_select(0, rows_idx[sl])
    return hb.float() if upcast else hb


def _weight_grads(h, weight, bias, rows_idx, y, tf, tiles, fp32, lse, entropy, g_logp, g_ent):
    """Recompute each tile's probabilities from the saved log-sum-exp; accumulate ``dW``, ``db`` in fp32."""
    n = y.shape[0]
    rows, cols = tiles
    cpu_upcast = fp32 and not h.is_cuda and weight.dtype in _HALF
    w = weight.float() if cpu_upcast else weight
    acc_dtype = _acc_dtype(weight)
    dw = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
    db = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if bias is not None else None
    buf = _workspace(rows, cols, w, acc_dtype)
    with torch.no_grad():
        for start in range(0, n, rows):
            sl = slice(start, min(start + rows, n))
            hb = _row_block(h, rows_idx, sl, cpu_upcast)
            for v0 in range(0, weight.shape[0], cols):
                v1 = min(v0 + cols, weight.shape[0])
                z, deriv = _tile_logits(hb, w, bias, v0, v1, tf, fp32, buf)
                # dlogp/da_j = f'_y [j == y] - p_j f'_j ;  d ent/da_j = -p_j (z_j - E_p z) f'_j
                zcopy = z.clone() if g_ent is not None else None
                p = z.sub_(lse[sl, None]).exp_()
                grad_a = p.mul_(deriv) if deriv is not None else p.mul_(tf.const_deriv)  # p f'
                if g_ent is not None:
                    mean_z = lse[sl] - entropy[sl]
                    grad_a_ent = zcopy.sub_(mean_z[:, None]).mul_(grad_a).mul_(g_ent[sl, None])
                grad_a.mul_(-g_logp[sl, None])
                if g_ent is not None:
                    grad_a.sub_(grad_a_ent)
                yb = y[sl]
                inside = ((yb >= v0) & (yb < v1)).nonzero().squeeze(1)
                grad_a[inside, yb[inside] - v0] += g_logp[sl][inside] * _deriv_at(deriv, tf, inside, yb - v0)
                dw[v0:v1] += _coef_matmul(grad_a.t(), hb)
                if db is not None:
                    db[v0:v1] += grad_a.sum(0)
    return dw.to(weight.dtype), (db.to(bias.dtype) if db is not None else None)


def _deriv_at(deriv, tf, rows, cols):
    if deriv is None:
        return tf.const_deriv
    return deriv[rows, cols[rows]]


def _validate(hidden, weight, targets, bias, temperature, logit_scale, softcap, chunk_size,
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
    if not (temperature > 0 and math.isfinite(temperature)):
        raise InvalidInput(f"temperature must be a positive finite number, got {temperature}")
    if not (logit_scale > 0 and math.isfinite(logit_scale)):
        raise InvalidInput(f"logit_scale must be a positive finite number, got {logit_scale}")
    if softcap is not None and not (softcap > 0 and math.isfinite(softcap)):
        raise InvalidInput(f"softcap must be None or a positive finite number, got {softcap}")
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
        chunk_size: rows per block (default ~1024); vocab_chunk_size: columns per vocabulary tile (default:
            a tile of ~2M logits, 8 MiB fp32). The log-sum-exp runs online across vocabulary tiles.
        return_entropy: also return the (differentiable) entropy per position.
        fp32_accumulation: float32 logits even for low-precision operands (``cast_logprobs_to_fp32``).

    Returns:
        float32 (float64 for float64 inputs) log-probs shaped like ``targets``, or a :class:`TokenLogprobs` with the entropy.
        Gradients flow exactly to ``hidden``, ``weight`` and ``bias``.
    """
    _validate(hidden, weight, targets, bias, temperature, logit_scale, softcap, chunk_size, vocab_chunk_size)
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
    h = flat_h
    if h.dtype != weight.dtype:  # e.g. bf16 hidden with an fp32 head: compute in the wider type
        wide = torch.promote_types(h.dtype, weight.dtype)
        h, weight = h.to(wide), weight.to(wide)
        bias = bias.to(wide) if bias is not None else None
    tf = _Transform(float(logit_scale), None if softcap is None else float(softcap), float(temperature))
    logp_rows, ent_rows = _FusedTokenLogprobs.apply(h, weight, bias, rows_idx, y, tf, (chunk_size, vocab_chunk_size),
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


__all__ = ["TokenLogprobs", "token_logprobs", "naive_token_logprobs"]
