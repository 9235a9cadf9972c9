"""The policy loss fused into the LM head: hidden states -> loss, gradients produced in the forward.

``fused_policy_loss(hidden, head_weight, targets, old_logprobs, advantages, mask, ...)`` equals
``policy_loss(token_logprobs(hidden, head_weight, targets), old_logprobs, advantages, mask, ...)`` but never
builds ``[B, T, V]`` logits and needs no recompute. A *token-level* loss ``L = sum_i w_i l_i(logp_i)`` knows
each token's ``g_i = w_i dl_i/dlogp_i`` as soon as that row's log-prob is final, so for each block of
rows the forward computes the block's logits over the whole vocabulary (1 matmul), its log-softmax, ``g``
(by autograd on the ``[rows]`` log-probs through the very same :func:`~refmodel.losses.policy.token_losses`
that ``policy_loss`` uses, so the two cannot drift apart), the logit gradient ``g f' (onehot(y) - p)``,
and from it ``dh`` (1 matmul) and, for a trainable head, ``dW``/``db`` (1 matmul). The backward only
scales the stored gradients by the upstream scalar. Cost: a frozen head (LoRA) 2 matmul units, a
trainable head 3 (``token_logprobs`` + autograd needs 2 and 4; naive full logits 3 plus ``[N, V]``).

Why row blocks over the *whole* vocabulary rather than online vocabulary tiles (as ``token_logprobs``):
``g_i`` depends on ``logp_i``, which is final only after the last tile, so an online sweep would have to
recompute the logits for ``dW`` (4 units). A block holds ``rows x V`` float32 logits; ``rows`` comes from the one
block rule of the tiled kernels (:func:`refmodel.logprobs.tiles.block_shape`, ``whole_vocab=True``): the tile
budget over ``V`` (about the hidden states' size, as Liger's chunks), and with a trainable head at least
``min(512, H)`` rows, because every block's three GEMMs against ``W`` re-pack the whole ``[V, H]`` weight on CPU
(MKL/oneDNN), ~``1/rows`` of the math: the logits GEMM measured 1.46 matmul units at 131 rows and 0.9-1.0 at
512-1024 (``benchmarks/bench_policy_loss.py --block-rows``). ``rows <= H`` keeps the block below the second
``[V, H]`` float32 weight gradient Liger's ``LigerFusedLinearGRPOLoss`` holds per chunk. ``dW`` and ``dh`` are the
only ``O(V H)``/``O(N H)`` buffers, as in any backward. A bf16/fp16 weight on CPU is upcast one vocabulary tile at a
time, never whole. Why not Liger's ``LigerFusedLinearGRPOLoss``: it recomputes the log-probs' gradient with
``torch.autograd.grad`` over each chunk's graph (4 units with a trainable head), it zeroes the KL silently without a
reference, and it has no dual-clip, verl aggregations or truncated IS modes.

A frozen head takes ``token_logprobs`` + ``policy_loss`` itself (:func:`fused_pays`): both cost 2 matmul units,
but the unfused kernel's vocabulary tiles read each part of the weight once per row block of up to thousands of
rows, where the fused blocks re-pack (CPU) or re-read (GPU) all of it per block of tens of rows (measured on CPU
at ``V = 262,144``, 96-row blocks: 2.50 units against 1.68), and its tiles stay within the tile budget. Same
results, gradients included (``tests/losses/test_fused_policy.py``).

Fallbacks to ``token_logprobs`` + ``policy_loss`` (same result, the unfused cost; ``PolicyLoss`` is the
same): ``importance_sampling_level`` ``sequence``/``sequence_token`` (the ratio needs the whole sequence's
log-probs first) and ``rollout_logprobs`` with ``old_logprobs=None`` (the IS weight needs the current log-probs
of the whole sequence). ``kl_estimator="full"`` is fused for the policy term; the ``full_kl`` term keeps its
own graph (from :func:`refmodel.kl.exact`).
"""

from __future__ import annotations

from typing import Any

import torch

from .._deprecation import renamed_keywords
from ..errors import InvalidInput
from ..logprobs.head import check_head_inputs, token_logprobs
from ..logprobs.lm_head import LMHead
from ..logprobs.tiles import (
    acc_dtype,
    block_shape,
    coef_matmul_into,
    cpu_upcast,
    logits_fp32,
    promote_operands,
    weight_tile,
    workspace,
)
from ..logprobs.transform import LogitTransform
from .policy import PolicyLoss, policy_loss, statistics
from .policy_config import PolicyLossConfig, build_config
from .policy_terms import (
    aggregation_weights,
    check_inputs,
    check_kl_inputs,
    log_importance_weights,
    rollout_is_weights,
    token_losses,
)


class _FusedPolicyLoss(torch.autograd.Function):
    """``(h_flat [N, H], W [V, H], b, rows [n], y [n], per-row inputs) -> (loss, logp [n])``; grads in forward.
    ``shape``: the :class:`~refmodel.logprobs.tiles.BlockShape` of the whole-vocabulary blocks."""

    @staticmethod
    def forward(ctx, h, weight, bias, rows_idx, y, opts, tf, shape, fp32, old, adv, ref, rho, w_agg):
        need_dh = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        n, vocab = y.shape[0], weight.shape[0]
        acc = acc_dtype(h)
        upcast = cpu_upcast(weight, h, fp32)
        block = shape.rows
        logp = torch.empty(n, dtype=acc, device=h.device)
        dh_rows = torch.empty(n, h.shape[1], dtype=acc, device=h.device) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=acc_dtype(weight), device=weight.device) if need_dw else None
        db = torch.zeros(vocab, dtype=acc_dtype(weight), device=weight.device) if need_db else None
        loss = torch.zeros((), dtype=acc, device=h.device)
        buf = workspace(block, vocab, weight, acc, upcast)
        ones = torch.ones(1, dtype=torch.bool, device=h.device)
        with torch.no_grad():
            for start in range(0, n, block):
                sl = slice(start, min(start + block, n))
                hb = h.index_select(0, rows_idx[sl])
                hb = hb.float() if upcast else hb
                z = _block_logits(hb, weight, bias, fp32, upcast, shape.upcast_cols,
                                  buf[: hb.shape[0]] if buf is not None else None)
                deriv = tf.apply_(z)
                yb = y[sl, None]
                z_y = z.gather(1, yb).squeeze(1)
                m = z.amax(1, keepdim=True)
                p = z.sub_(m).exp_()
                s = p.sum(1, keepdim=True)
                lp = z_y - (m + s.log()).squeeze(1)
                logp[sl] = lp
                # g_i = w_i dl_i/dlogp_i through the shared per-token loss (a [rows] graph, no vocabulary)
                with torch.enable_grad():
                    lp_leaf = lp.detach().requires_grad_()
                    mask_b = ones.expand(lp.shape[0])
                    log_w, _ = log_importance_weights(lp_leaf, None if old is None else old[sl], mask_b,
                                                      "token", opts.log_ratio_clamp)
                    per_tok, _, _, _ = token_losses(opts, lp_leaf, log_w, adv[sl], mask_b,
                                                    None if ref is None else ref[sl],
                                                    None if rho is None else rho[sl])
                    total = (w_agg[sl] * per_tok).sum()
                    (g,) = torch.autograd.grad(total, lp_leaf)
                loss += total.detach()
                # d logp / d a_j = f'_j (onehot_y - p_j): written over the unnormalized exp (one pass folds the
                # softmax's 1/s and -g), then chained through the transform
                grad_a = p.mul_((-g / s.squeeze(1))[:, None])
                grad_a.scatter_add_(1, yb, g[:, None])
                if deriv is not None:
                    grad_a.mul_(deriv)
                elif tf.const_deriv != 1.0:
                    grad_a.mul_(tf.const_deriv)
                if need_dh:
                    _grad_rows(grad_a, weight, upcast, shape.upcast_cols, dh_rows[sl])
                if need_dw:
                    _accumulate_dw(grad_a, hb, dw)
                if need_db:
                    db += grad_a.sum(0)
        ctx.save_for_backward(rows_idx)
        ctx.grads = (dh_rows, dw, db)
        ctx.shapes = (h.shape, h.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(logp)
        return loss, logp

    @staticmethod
    def backward(ctx, g_loss, _g_logp):
        (rows_idx,) = ctx.saved_tensors
        if ctx.grads is None:
            raise RuntimeError("fused_policy_loss: backward ran twice through the same graph; its gradients are "
                               "produced in the forward and handed out (scaled in place) once. Call it again.")
        (dh_rows, dw, db), ctx.grads = ctx.grads, None
        h_shape, h_dtype, w_dtype, b_dtype = ctx.shapes
        dh = None
        # Scale in place and hand the buffers over: no second [N, H] / [V, H] copy at the backward's peak.
        if dh_rows is not None:
            dh_rows = dh_rows.mul_(g_loss).to(h_dtype)
            if rows_idx.numel() == h_shape[0]:  # every row scored (rows_idx is sorted): no scatter
                dh = dh_rows
            else:
                dh = torch.zeros(h_shape, dtype=h_dtype, device=dh_rows.device).index_copy_(0, rows_idx, dh_rows)
        dw = dw.mul_(g_loss).to(w_dtype) if dw is not None else None
        db = db.mul_(g_loss).to(b_dtype) if db is not None else None
        return dh, dw, db, None, None, None, None, None, None, None, None, None, None, None


def _block_logits(hb, weight, bias, fp32, upcast, cols, out):
    """``hb @ weight.T + bias`` as float32 ``[M, V]`` (in ``out`` when given); a low-precision weight on CPU is
    upcast ``cols`` vocabulary rows at a time (:func:`~refmodel.logprobs.tiles.weight_tile`), never whole."""
    if not upcast:
        return logits_fp32(hb, weight.t(), bias, fp32, out)
    vocab = weight.shape[0]
    z = out if out is not None else torch.empty(hb.shape[0], vocab, dtype=hb.dtype, device=hb.device)
    for v0 in range(0, vocab, cols):
        v1 = min(v0 + cols, vocab)
        z[:, v0:v1] = logits_fp32(hb, weight_tile(weight, v0, v1, True).t(),
                                  bias[v0:v1] if bias is not None else None, fp32, None)
    return z


def _grad_rows(grad_a, weight, upcast, cols, out) -> None:
    """``out = grad_a [M, V] @ weight [V, H]`` in float32; tile by tile when a low-precision weight is upcast."""
    if not upcast:
        coef_matmul_into(grad_a, weight, out, accumulate=False)
        return
    for v0 in range(0, weight.shape[0], cols):
        v1 = min(v0 + cols, weight.shape[0])
        coef_matmul_into(grad_a[:, v0:v1], weight_tile(weight, v0, v1, True), out, accumulate=v0 > 0)


def _accumulate_dw(grad_a: torch.Tensor, hb: torch.Tensor, dw: torch.Tensor, cols: int = 8192) -> None:
    """``dw += grad_a.T @ hb`` in fp32; in place when the dtypes match, else in vocabulary slices so a
    low-precision head never allocates a second ``[V, H]`` fp32 temporary per block."""
    if hb.dtype == dw.dtype:
        dw.addmm_(grad_a.t(), hb)
        return
    for v0 in range(0, dw.shape[0], cols):
        coef_matmul_into(grad_a[:, v0:v0 + cols].t(), hb, dw[v0:v0 + cols], accumulate=True)


def fused_pays(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the fused loop beats ``token_logprobs`` + ``policy_loss``: for a trainable head (3 matmul units
    against 4), not for a frozen one (module docstring), where both cost 2 units and the fused blocks' whole-
    vocabulary GEMMs re-pack (CPU) or re-read (GPU) the whole weight for every block of rows."""
    return torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))


def _unpack_head(head: LMHead, hidden, head_bias, logit_scale, softcap):
    """``(hidden', weight', bias', logit_scale, softcap)`` of ``head``, its LoRA adapters folded (``LMHead.fold``)."""
    if head_bias is not None or logit_scale != 1.0 or softcap is not None:
        raise InvalidInput("head_weight is an LMHead, which brings its own bias, logit_scale and softcap; "
                           "leave head_bias, logit_scale and softcap unset (or pass the weight tensor instead)")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[-1] != head.weight.shape[1]:
        raise InvalidInput(f"hidden must be [B, T, H] with H = the head's weight.shape[1] ({head.weight.shape[1]}), "
                           f"got {getattr(hidden, 'shape', type(hidden).__name__)}")
    h, w, b = head.fold(hidden)
    return h, w, b, head.logit_scale, head.softcap


@renamed_keywords(old_logps="old_logprobs", ref_logps="ref_logprobs", rollout_logps="rollout_logprobs")
def fused_policy_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor | LMHead,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    config: PolicyLossConfig | None = None,
    ref_logprobs: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    full_kl: torch.Tensor | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    head_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    fp32_accumulation: bool = True,
    **options: Any,
) -> PolicyLoss:
    """:func:`refmodel.losses.policy_loss` computed from hidden states with the LM head fused in (module docstring).

    Args:
        hidden: ``[B, T, H]`` final hidden states, position ``t`` predicting ``targets[:, t]`` (shift as for
            :func:`refmodel.token_logprobs`). head_weight: ``[V, H]`` (frozen or trainable); head_bias ``[V]``.
            Or an :class:`~refmodel.logprobs.lm_head.LMHead` (``LMHead.from_model(policy)``), which brings its bias,
            logit scale, soft-cap and LoRA adapters (folded in; they train); then leave ``head_bias``,
            ``logit_scale`` and ``softcap`` unset.
        targets: ``[B, T]`` sampled token ids; only positions in ``mask`` are read (others may hold -100).
        old_logprobs, advantages, mask: as :func:`refmodel.losses.policy_loss`.
        config, ref_logprobs, rollout_logprobs, full_kl, num_items_in_batch: as :func:`refmodel.losses.policy_loss`.
        temperature, logit_scale, softcap: the logit transform (as ``token_logprobs``; the sampling temperature).
        chunk_size: rows per block (default: :func:`refmodel.logprobs.tiles.block_shape`, module docstring).
        **options: the fields of :class:`~refmodel.losses.PolicyLossConfig` as keywords, when ``config`` is None
            (``loss_type``, ``epsilon``, ``beta``, ``kl_estimator``, ...).

    Returns:
        :class:`PolicyLoss` with the same values as the unfused path; ``per_token_loss`` is detached here
        (the gradient flows through ``loss`` only).
    """
    opts = build_config(config, options, "fused_policy_loss")
    if isinstance(head_weight, LMHead):
        hidden, head_weight, head_bias, logit_scale, softcap = _unpack_head(head_weight, hidden, head_bias,
                                                                            logit_scale, softcap)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or not isinstance(head_weight, torch.Tensor):
        raise InvalidInput("hidden must be [B, T, H] and head_weight [V, H] with the same H, got "
                           f"{getattr(hidden, 'shape', None)} and {getattr(head_weight, 'shape', None)}")
    if not isinstance(targets, torch.Tensor):
        raise InvalidInput(f"targets must be an integer [B, T] = {tuple(hidden.shape[:2])} tensor of token ids, got "
                           f"{type(targets).__name__}")
    # The head's own checks (shapes, dtype, bias, temperature, logit scale, soft-cap, chunk size), as token_logprobs.
    check_head_inputs(hidden, head_weight, targets, head_bias, temperature, logit_scale, softcap, chunk_size, None)
    head_kw: dict[str, Any] = dict(bias=head_bias, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                   chunk_size=chunk_size, fp32_accumulation=fp32_accumulation)
    inputs: dict[str, Any] = dict(ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs, full_kl=full_kl,
                                  num_items_in_batch=num_items_in_batch)
    bmask = mask.bool() if isinstance(mask, torch.Tensor) else mask
    if opts.importance_sampling_level != "token" or (rollout_logprobs is not None and old_logprobs is None) \
            or not fused_pays(head_weight, head_bias):
        safe = torch.where(bmask, targets, torch.full_like(targets, -100)) if isinstance(bmask, torch.Tensor) \
            else targets
        logprobs = token_logprobs(hidden, head_weight, safe, **head_kw)
        assert isinstance(logprobs, torch.Tensor)  # a TokenLogprobs only with return_entropy=True, not asked here
        return policy_loss(logprobs, old_logprobs, advantages, mask, config=opts, **inputs)

    acc = acc_dtype(hidden) if hidden.dtype == head_weight.dtype else \
        acc_dtype(torch.empty(0, dtype=torch.promote_types(hidden.dtype, head_weight.dtype)))
    probe = torch.empty(hidden.shape[:2], dtype=acc, device=hidden.device)
    bmask, adv = check_inputs(probe, old_logprobs, advantages, mask, ref_logprobs, rollout_logprobs, full_kl)
    check_kl_inputs(opts, ref_logprobs, full_kl)
    rows = bmask.reshape(-1).nonzero().squeeze(1)
    y = targets.reshape(-1)[rows].long()
    vocab = head_weight.shape[0]
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= vocab):
        bad = y[(y < 0) | (y >= vocab)][0].item()
        raise InvalidInput(f"target id {bad} at a masked-in position is outside the vocabulary [0, {vocab})")
    rho = invalid = None
    if rollout_logprobs is not None:
        assert old_logprobs is not None  # rollout_logprobs without old_logprobs took the unfused path above
        rho, invalid = rollout_is_weights(old_logprobs.to(acc), rollout_logprobs, bmask, opts)

    def per_row(t):
        return None if t is None else torch.broadcast_to(t, bmask.shape).reshape(-1)[rows].detach().to(acc)

    weights = aggregation_weights(bmask, opts.agg_mode, acc, num_items_in_batch, opts.max_completion_length)
    h, w, b = promote_operands(hidden.reshape(-1, hidden.shape[-1]), head_weight, head_bias)  # as token_logprobs
    tf = LogitTransform.of(logit_scale, softcap, temperature)
    trainable = w.requires_grad or (b is not None and b.requires_grad)
    shape = block_shape(y.numel(), vocab, w.shape[1], cuda=h.is_cuda, whole_vocab=True, trainable=trainable,
                        chunk=chunk_size)
    loss, logp_rows = _FusedPolicyLoss.apply(h, w, b, rows, y, opts, tf, shape, fp32_accumulation,
                                             per_row(old_logprobs), per_row(adv), per_row(ref_logprobs),
                                             per_row(rho), per_row(weights))
    logprobs = logp_rows.new_zeros(bmask.numel()).index_put((rows,), logp_rows).reshape(bmask.shape)
    kl_graph = None
    beta = opts.beta_value
    if opts.kl_estimator == "full" and beta != 0 and full_kl is not None:  # (None with beta != 0 was refused)
        kl_graph = beta * (weights * torch.where(bmask, full_kl.to(acc), 0.0)).sum()
        loss = loss + kl_graph
    with torch.no_grad():  # the statistics from the final log-probs, through the same code as policy_loss
        log_w, _ = log_importance_weights(logprobs, old_logprobs, bmask, "token", opts.log_ratio_clamp)
        per_tok, pg, kl_t, coef_1 = token_losses(opts, logprobs, log_w, adv, bmask, ref_logprobs, rho,
                                                 None if full_kl is None else full_kl.detach())
    rollout = None if rho is None or rollout_logprobs is None else (rho, invalid, rollout_logprobs.to(acc))
    return statistics(opts, loss, per_tok, pg, kl_t, coef_1, adv, bmask, weights, logprobs, old_logprobs, rollout)


__all__ = ["fused_policy_loss"]
