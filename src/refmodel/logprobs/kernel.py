"""The tile kernels and autograd function behind :func:`refmodel.token_logprobs`.

Rows are processed in blocks and the vocabulary in tiles (sizes from :func:`refmodel.logprobs.tiles.block_shape`,
the one rule shared with the exact KL and the fused policy loss), with an online log-sum-exp across tiles. The forward also accumulates the expected embedding
``E_i = sum_j p_ij f'_ij W_j`` (a second matmul), after which the gradient with respect to the hidden
state needs no vocabulary work at all:

    d logp_i / d h_i = s * (f'_iy W_y - E_i)

so a frozen-head (LoRA) policy pass costs 2 matmuls instead of 3, and the reference pass (no grad)
costs exactly 1. A trainable head adds a recompute and the ``dW`` matmul in the backward (4 total).
"""

from __future__ import annotations

from typing import NamedTuple, cast

import torch

from .tiles import (
    acc_dtype,
    block_shape,
    coef_matmul_into,
    cpu_upcast,
    tile_logits,
    weight_tile,
    workspace,
)
from .transform import LogitTransform


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


def _row_block_forward(hb, w, bias, y, tf, fp32, upcast, cols, want_entropy, buf, expected, expected_ent
                       ) -> _RowStats:
    """Online log-sum-exp over vocab tiles of one row block.

    When ``expected`` (``[M, H]``, a view of the saved tensor) is given, it receives ``sum_j p_j f'_j W_j``
    and ``expected_ent`` receives ``sum_j p_j (z_j - E_p z) f'_j W_j``; both are accumulated in place
    (rescaled as the running max moves) so the block allocates no ``[M, H]`` temporaries. With ``upcast`` each
    vocabulary tile of a low-precision ``w`` is upcast once and serves both of its matmuls.
    """
    vocab = w.shape[0]
    need_dh = expected is not None
    m: torch.Tensor | None = None  # the running max; None until the first tile
    # Set by the first tile (a vocabulary is never empty): typed as tensors so their uses are checked.
    s = z_y = deriv_y = t_acc = cast(torch.Tensor, None)
    for v0 in range(0, vocab, cols):
        v1 = min(v0 + cols, vocab)
        wt = weight_tile(w, v0, v1, upcast)
        z, deriv = tile_logits(hb, wt, bias, v0, v1, tf, fp32, buf)
        if z_y is None:
            z_y = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
            deriv_y = torch.full_like(z_y, tf.const_deriv)
        z_y = _gather_in_tile(z, y, v0, v1, z_y)
        if deriv is not None:
            deriv_y = _gather_in_tile(deriv, y, v0, v1, deriv_y)
        tile_max = z.amax(dim=1)
        m_new = tile_max if m is None else torch.maximum(m, tile_max)
        zs = z.sub_(m_new[:, None])  # z - m_new, in place
        zcopy = zs.clone() if want_entropy else zs  # read only when want_entropy
        e = zs.exp_()  # exp(z - m_new), in place
        tile_sum = e.sum(dim=1)
        if want_entropy:
            tile_t = (e * zcopy).sum(dim=1)
        first = m is None
        if m is not None:
            alpha, shift = torch.exp(m - m_new), m - m_new
            if want_entropy:  # T' = alpha (T + (m - m_new) S) + tile
                t_acc = alpha * (t_acc + shift * s) + tile_t
            s = alpha * s + tile_sum
            if need_dh:
                if want_entropy:  # A' = alpha (A + (m - m_new) E) + tile, before E moves
                    expected_ent.addcmul_(expected, shift[:, None]).mul_(alpha[:, None])
                expected.mul_(alpha[:, None])
        else:
            s = tile_sum
            if want_entropy:
                t_acc = tile_t
        if need_dh:
            coef = e.mul_(deriv) if deriv is not None else (
                e.mul_(tf.const_deriv) if tf.const_deriv != 1.0 else e)
            coef_matmul_into(coef, wt, expected, accumulate=not first)
            if want_entropy:
                coef_matmul_into(zcopy.mul_(coef), wt, expected_ent, accumulate=not first)
        m = m_new
    assert m is not None  # the vocabulary is never empty, so the loop ran
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
    upcast = cpu_upcast(weight, h, fp32)
    acc_type = acc_dtype(h)
    acc = dict(dtype=acc_type, device=h.device)
    rows, cols = tiles
    logp, lse, deriv_y = (torch.empty(n, **acc) for _ in range(3))
    entropy = torch.empty(n, **acc) if want_entropy else None
    expected = torch.empty(n, hidden_size, **acc) if need_dh else None
    expected_ent = torch.empty(n, hidden_size, **acc) if need_dh and want_entropy else None
    buf = workspace(rows, cols, weight, acc_type, upcast)
    for start in range(0, n, rows):
        sl = slice(start, min(start + rows, n))
        hb = _row_block(h, rows_idx, sl, upcast)
        st = _row_block_forward(hb, weight, bias, y[sl], tf, fp32, upcast, cols, want_entropy, buf,
                                expected[sl] if expected is not None else None,
                                expected_ent[sl] if expected_ent is not None else None)
        logp[sl], lse[sl], deriv_y[sl] = st.logp, st.lse, st.deriv_y
        if entropy is not None and st.entropy is not None:
            entropy[sl] = st.entropy
    return _Forward(logp, lse, deriv_y, entropy, expected, expected_ent)


class FusedTokenLogprobs(torch.autograd.Function):
    """Custom autograd over compacted rows: ``h [N, H]``, ``weight [V, H]``, ``y [N]`` -> ``[N]``, ``[N]``.

    The ``[n, H]`` expected embeddings are kept on ``ctx`` rather than saved, so the backward can turn
    them into ``dh`` in place (the head's extra memory is then one ``[n, H]`` tensor, not two); a second
    backward through a retained graph finds them consumed and recomputes them (one more forward sweep).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, rows_idx, y, tf, tiles, fp32, want_entropy):
        need_dh = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
        chunk, vocab_chunk = tiles
        shape = block_shape(y.shape[0], weight.shape[0], weight.shape[1], cuda=h.is_cuda, chunk=chunk,
                            vocab_chunk=vocab_chunk)
        tiles = (shape.rows, shape.cols)
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


def _row_block(h: torch.Tensor, rows_idx: torch.Tensor | None, sl: slice, upcast: bool) -> torch.Tensor:
    """Rows ``sl`` of the scored rows: a view when every row is scored, else a per-block gather."""
    hb = h[sl] if rows_idx is None else h.index_select(0, rows_idx[sl])
    return hb.float() if upcast else hb


def _weight_grads(h, weight, bias, rows_idx, y, tf, tiles, fp32, lse, entropy, g_logp, g_ent):
    """Recompute each tile's probabilities from the saved log-sum-exp; accumulate ``dW``, ``db`` in fp32."""
    n = y.shape[0]
    rows, cols = tiles
    upcast = cpu_upcast(weight, h, fp32)
    acc_type = acc_dtype(weight)
    dw = torch.zeros(weight.shape, dtype=acc_type, device=weight.device)
    db = torch.zeros(weight.shape[0], dtype=acc_type, device=weight.device) if bias is not None else None
    buf = workspace(rows, cols, weight, acc_type, upcast)
    with torch.no_grad():
        for start in range(0, n, rows):
            sl = slice(start, min(start + rows, n))
            hb = _row_block(h, rows_idx, sl, upcast)
            for v0 in range(0, weight.shape[0], cols):
                v1 = min(v0 + cols, weight.shape[0])
                z, deriv = tile_logits(hb, weight_tile(weight, v0, v1, upcast), bias, v0, v1, tf, fp32, buf)
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
                coef_matmul_into(grad_a.t(), hb, dw[v0:v1], accumulate=True)
                if db is not None:
                    db[v0:v1] += grad_a.sum(0)
    return dw.to(weight.dtype), (db.to(bias.dtype) if db is not None else None)


def _deriv_at(deriv, tf, rows, cols):
    if deriv is None:
        return tf.const_deriv
    return deriv[rows, cols[rows]]


__all__ = ["FusedTokenLogprobs", "LogitTransform"]
