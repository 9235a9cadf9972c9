"""The exact KL(pi || pi_ref) over the full vocabulary, from hidden states, in vocabulary tiles.

Sampled estimators (k1/k2/k3) see one token per position; this is the whole sum

    KL_i = sum_j p_ij (log p_ij - log q_ij),   p = softmax(z_pol), q = softmax(z_ref)

at every scored position ``i``, with ``z = f(h @ W.T + b)`` and ``f`` the logit transform of
:mod:`refmodel.logprobs.transform` (logit scale, soft-cap, temperature). No anchor offers it
(verl's ``kl_penalty="full"`` raises ``NotImplementedError``).

It never holds ``[B, T, V]``: rows go in blocks and the vocabulary in tiles, with an online log-sum-exp for
both distributions and, with ``d_j = z_pol_j - z_ref_j`` and ``e_j = exp(z_pol_j - m)`` for the running max
``m``, the online sums ``s = sum e_j``, ``S = sum e_j d_j`` (so ``KL = S/s - lse_pol + lse_ref``). For the
policy's hidden-state gradient, ``dKL/dz_pol_j = p_j (d_j - mu)`` with ``mu = S/s``, hence

    dKL_i/dh_i = (A_i - mu_i E_i) / s_i,   E = sum_j e_j f'_j W_j,  A = sum_j e_j d_j f'_j W_j

accumulated in the forward (rescaled as ``m`` moves), so the backward of ``dh`` needs no vocabulary work:
2 logit matmuls + 2 accumulation matmuls forward, none backward. A trainable policy head recomputes the
two logit tiles and adds the ``dW`` matmul in the backward. The reference side gets no gradient. Both heads are
:class:`refmodel.logprobs.lm_head.LMHead` (``refmodel.kl.LMHead`` is the same class): a LoRA adapter on the policy's
head is folded in as extra columns and trains through them.
"""

from __future__ import annotations

import torch

from .. import validation
from ..errors import InvalidInput
from ..logprobs.lm_head import LMHead
from ..logprobs.tiles import (
    acc_dtype,
    block_shape,
    coef_matmul_into,
    cpu_upcast,
    promote_operands,
    tile_logits,
    weight_tile,
    workspace,
)


def _as_head(head, name: str) -> LMHead:
    if isinstance(head, LMHead):
        return head
    if isinstance(head, torch.Tensor):
        return LMHead(head)
    raise InvalidInput(f"{name} must be an LMHead or a [V, H] weight tensor, got {type(head).__name__}")


def _block_forward(hp, wp, bp, tfp, hr, wr, br, tfr, cols, ups, buf_p, buf_r, acc_e, acc_a):
    """Online sweep of one row block; returns ``(kl, lse_p, mu)`` ``[M]``; writes ``dKL/dh`` into ``acc_a``.
    ``ups``: whether each head's vocabulary tiles are upcast to float32 (:func:`~refmodel.logprobs.tiles.cpu_upcast`)."""
    vocab = wp.shape[0]
    need_dh = acc_a is not None
    m = s = big_s = m_r = s_r = None
    for v0 in range(0, vocab, cols):
        v1 = min(v0 + cols, vocab)
        wpt = weight_tile(wp, v0, v1, ups[0])
        zp, deriv = tile_logits(hp, wpt, bp, v0, v1, tfp, True, buf_p)
        zr, _ = tile_logits(hr, weight_tile(wr, v0, v1, ups[1]), br, v0, v1, tfr, True, buf_r)
        tile_max_r = zr.amax(1)
        m_r_new = tile_max_r if m_r is None else torch.maximum(m_r, tile_max_r)
        d = zr.neg_().add_(zp)  # d = z_pol - z_ref, in the ref buffer; z_ref = z_pol - d below
        tile_max = zp.amax(1)
        m_new = tile_max if m is None else torch.maximum(m, tile_max)
        # the reference's log-sum-exp: exp(z_ref - m_r) = exp((z_pol - m_r) - d), before z_pol is overwritten
        tile_sum_r = (zp - m_r_new[:, None] - d).exp_().sum(1)
        e = zp.sub_(m_new[:, None]).exp_()
        tile_s, tile_big = e.sum(1), (e * d).sum(1)
        first = m is None
        if first:
            s, big_s, s_r = tile_s, tile_big, tile_sum_r
        else:
            alpha, alpha_r = torch.exp(m - m_new), torch.exp(m_r - m_r_new)
            s, big_s = alpha * s + tile_s, alpha * big_s + tile_big
            s_r = alpha_r * s_r + tile_sum_r
            if need_dh:
                acc_e.mul_(alpha[:, None])
                acc_a.mul_(alpha[:, None])
        if need_dh:
            coef = e.mul_(deriv) if deriv is not None else e.mul_(tfp.const_deriv)  # e f'
            coef_matmul_into(d.mul_(coef), wpt, acc_a, accumulate=not first)  # e d f'
            coef_matmul_into(coef, wpt, acc_e, accumulate=not first)
        m, m_r = m_new, m_r_new
    lse_p, lse_r = m + s.log(), m_r + s_r.log()
    mu = big_s / s
    if need_dh:  # dKL/dh = (A - mu E) / s
        acc_a.addcmul_(acc_e, -mu[:, None]).div_(s[:, None])
    return mu - lse_p + lse_r, lse_p, mu


class _ExactKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hp, wp, bp, hr, wr, br, tfp, tfr, tiles):
        need_dh = ctx.needs_input_grad[0]
        n, acc_type = hp.shape[0], acc_dtype(hp)
        # one rule for the block sizes (the policy's hidden size: its GEMMs carry the gradient)
        rows, cols, _ = block_shape(n, wp.shape[0], hp.shape[1], cuda=hp.is_cuda, chunk=tiles[0],
                                    vocab_chunk=tiles[1])
        up_p, up_r = cpu_upcast(wp, hp), cpu_upcast(wr, hr)
        acc = dict(dtype=acc_type, device=hp.device)
        kl, lse, mu = (torch.empty(n, **acc) for _ in range(3))
        grad_h = torch.empty(n, hp.shape[1], **acc) if need_dh else None
        acc_e = torch.empty(min(rows, n), hp.shape[1], **acc) if need_dh else None
        buf_p, buf_r = workspace(rows, cols, wp, acc_type, up_p), workspace(rows, cols, wr, acc_dtype(hr), up_r)
        with torch.no_grad():
            for start in range(0, n, rows):
                sl = slice(start, min(start + rows, n))
                hpb = hp[sl].float() if up_p else hp[sl]
                hrb = hr[sl].float() if up_r else hr[sl]
                kl[sl], lse[sl], mu[sl] = _block_forward(
                    hpb, wp, bp, tfp, hrb, wr, br, tfr, cols, (up_p, up_r), buf_p, buf_r,
                    acc_e[: sl.stop - sl.start] if need_dh else None, grad_h[sl] if need_dh else None)
        ctx.tfp, ctx.tfr, ctx.tiles = tfp, tfr, (rows, cols)
        ctx.grad_h = grad_h
        ctx.save_for_backward(hp, wp, bp, hr, wr, br, lse, mu)
        return kl

    @staticmethod
    def backward(ctx, g):
        hp, wp, bp, hr, wr, br, lse, mu = ctx.saved_tensors
        g = g.to(lse.dtype)
        dh = dw = db = None
        if ctx.needs_input_grad[0]:
            # not in place: a retained graph (gradcheck, a second loss) may run this backward again
            dh = (ctx.grad_h * g[:, None]).to(hp.dtype)
        if ctx.needs_input_grad[1] or (bp is not None and ctx.needs_input_grad[2]):
            dw, db = _weight_grads(hp, wp, bp, hr, wr, br, ctx.tfp, ctx.tfr, ctx.tiles, lse, mu, g)
            dw = dw if ctx.needs_input_grad[1] else None
        return dh, dw, db, None, None, None, None, None, None


def _weight_grads(hp, wp, bp, hr, wr, br, tfp, tfr, tiles, lse, mu, g):
    """Recompute both tiles; ``dKL/da_j = p_j (d_j - mu) f'_j``; accumulate ``dW``, ``db`` in fp32."""
    rows, cols = tiles
    up_p, up_r = cpu_upcast(wp, hp), cpu_upcast(wr, hr)
    acc_type = acc_dtype(wp)
    dw = torch.zeros(wp.shape, dtype=acc_type, device=wp.device)
    db = torch.zeros(wp.shape[0], dtype=acc_type, device=wp.device) if bp is not None else None
    with torch.no_grad():
        for start in range(0, hp.shape[0], rows):
            sl = slice(start, min(start + rows, hp.shape[0]))
            hpb = hp[sl].float() if up_p else hp[sl]
            hrb = hr[sl].float() if up_r else hr[sl]
            for v0 in range(0, wp.shape[0], cols):
                v1 = min(v0 + cols, wp.shape[0])
                zp, deriv = tile_logits(hpb, weight_tile(wp, v0, v1, up_p), bp, v0, v1, tfp, True, None)
                zr, _ = tile_logits(hrb, weight_tile(wr, v0, v1, up_r), br, v0, v1, tfr, True, None)
                d = zr.neg_().add_(zp).sub_(mu[sl, None])
                p = zp.sub_(lse[sl, None]).exp_()
                grad_a = p.mul_(d).mul_(g[sl, None])
                grad_a = grad_a.mul_(deriv) if deriv is not None else grad_a.mul_(tfp.const_deriv)
                coef_matmul_into(grad_a.t(), hpb, dw[v0:v1], accumulate=True)
                if db is not None:
                    db[v0:v1] += grad_a.sum(0)
    return dw.to(wp.dtype), (db.to(bp.dtype) if db is not None else None)


def exact(
    policy_hidden: torch.Tensor,
    policy_head: LMHead | torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_head: LMHead | torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
) -> torch.Tensor:
    """The exact ``KL(pi || pi_ref)`` (nats) of the next-token distributions at every scored position.

    Args:
        policy_hidden: ``[B, T, H]`` (or ``[N, H]``) the policy's final hidden states, aligned so that position
            ``t`` predicts the token scored at ``t`` (as for :func:`refmodel.token_logprobs`).
        policy_head, ref_head: :class:`LMHead` (``LMHead.from_model(model)``) or a bare ``[V, H]`` weight; the
            vocabularies must match, the hidden sizes may differ.
        ref_hidden: ``[B, T, H_ref]`` the reference's hidden states at the same positions (no gradient).
        mask: ``[B, T]`` (or ``[N]``) bool, the positions to score; ``None`` scores all. Unscored positions cost
            nothing and are 0.
        temperature: the sampling temperature, applied to both distributions (as at sampling).
        chunk_size, vocab_chunk_size: rows per block and vocabulary columns per tile (default: the one rule of the
            tiled kernels, :func:`refmodel.logprobs.tiles.block_shape`).

    Returns:
        ``[B, T]`` (or ``[N]``) float32 (float64 for float64 inputs), >= 0 up to rounding, differentiable with
        respect to ``policy_hidden`` and the policy head (weight, bias). Use it as ``full_kl`` of
        :func:`refmodel.losses.policy_loss` (``kl_estimator="full"``) or, detached, as the true KL to monitor.
    """
    ph, rh = _as_head(policy_head, "policy_head"), _as_head(ref_head, "ref_head")
    for name, hidden, head in (("policy", policy_hidden, ph), ("ref", ref_hidden, rh)):
        if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3) or head.weight.dim() != 2 or \
                hidden.shape[-1] != head.weight.shape[1]:
            got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise InvalidInput(f"{name}_hidden must be [B, T, H] or [N, H] with H = its head's weight.shape[1] "
                               f"({tuple(head.weight.shape)}), got {got}")
        if head.bias is not None and tuple(head.bias.shape) != (head.weight.shape[0],):
            raise InvalidInput(f"{name} head bias must be [V] = [{head.weight.shape[0]}], got {tuple(head.bias.shape)}")
    if ph.weight.shape[0] != rh.weight.shape[0]:
        raise InvalidInput(f"policy and reference vocabularies differ ({ph.weight.shape[0]} vs "
                           f"{rh.weight.shape[0]}); the exact KL needs the same token space")
    if policy_hidden.shape[:-1] != ref_hidden.shape[:-1]:
        raise InvalidInput(f"policy_hidden {tuple(policy_hidden.shape)} and ref_hidden {tuple(ref_hidden.shape)} "
                           "must have the same leading (position) shape")
    validation.temperature(temperature)
    lead = policy_hidden.shape[:-1]
    if mask is None:
        mask = torch.ones(lead, dtype=torch.bool, device=policy_hidden.device)
    if tuple(mask.shape) != tuple(lead):
        raise InvalidInput(f"mask must have shape {tuple(lead)} (the hidden states without H), got {tuple(mask.shape)}")
    rows = mask.reshape(-1).bool().nonzero().squeeze(1)
    # LoRA adapters on a head become extra columns (LMHead.fold), on the scored rows only; the reference's are
    # folded without a graph (it gets no gradient)
    hp, wp, bp = ph.fold(policy_hidden.reshape(-1, policy_hidden.shape[-1]).index_select(0, rows))
    with torch.no_grad():
        hr, wr, br = rh.fold(ref_hidden.detach().reshape(-1, ref_hidden.shape[-1]).index_select(0, rows))
    wr, br = wr.detach(), (br.detach() if br is not None else None)
    hp, wp, bp = promote_operands(hp, wp, bp)  # compute in the wider type, as token_logprobs does
    hr, wr, br = promote_operands(hr, wr, br)
    tfp, tfr = ph.transform(temperature), rh.transform(temperature)
    kl_rows = _ExactKL.apply(hp, wp, bp, hr, wr, br, tfp, tfr, (chunk_size, vocab_chunk_size))
    out = kl_rows.new_zeros(mask.numel()).index_put((rows,), kl_rows)
    return out.reshape(lead)


def naive_exact(policy_hidden, policy_head, ref_hidden, ref_head, mask=None, *, temperature: float = 1.0):
    """Full ``[..., V]`` softmaxes (:meth:`LMHead.full_log_softmax`); the test and benchmark baseline of
    :func:`exact` (same contract)."""
    logp = _as_head(policy_head, "policy_head").full_log_softmax(policy_hidden, temperature=temperature)
    logq = _as_head(ref_head, "ref_head").full_log_softmax(ref_hidden.detach(), temperature=temperature)
    kl = (logp.exp() * (logp - logq.detach())).sum(-1)
    return kl if mask is None else kl * mask


__all__ = ["LMHead", "exact", "naive_exact"]
