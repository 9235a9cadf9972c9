"""Optional Liger-Kernel fast path for the fused head (CUDA only).

Liger's ``LigerFusedLinearCrossEntropyLoss(reduction="none")`` returns the per-token negative
log-likelihood. It has no temperature or logit-scale argument, so both are folded into the hidden
states (``(s * h / T) W^T = s * (h W^T) / T``), which is exact only without a soft-cap; with a
soft-cap and a temperature, or without CUDA / Liger, the built-in op runs instead (logged once).
"""

from __future__ import annotations

from .._optional import available
from ..cluster import get_logger
from .head import token_logprobs

log = get_logger(__name__)  # shared warnings: main process only (refmodel.cluster)
_warned: set[str] = set()


def _fallback(reason: str, *args, **kwargs):
    if reason not in _warned:
        _warned.add(reason)
        log.warning("use_liger: %s; using refmodel's fused op instead", reason)
    return token_logprobs(*args, **kwargs)


def liger_token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, logit_scale=1.0,
                         softcap=None, chunk_size=None, return_entropy=False, fp32_accumulation=True):
    """Same contract as :func:`refmodel.token_logprobs`, computed by Liger where it applies."""
    kwargs = dict(bias=bias, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                  chunk_size=chunk_size, return_entropy=return_entropy, fp32_accumulation=fp32_accumulation)
    if not (hidden.is_cuda and available("liger_kernel")):
        return _fallback("Liger needs CUDA and the liger-kernel package", hidden, weight, targets, **kwargs)
    if return_entropy or (softcap is not None and temperature != 1.0):
        return _fallback("entropy, or soft-cap with temperature, is not expressible with Liger",
                         hidden, weight, targets, **kwargs)
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    factor = logit_scale / temperature if softcap is None else logit_scale
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="none", softcap=softcap)
    flat_h = hidden.reshape(-1, hidden.shape[-1]) * factor
    scaled_bias = bias * factor if bias is not None else None
    nll = loss(weight, flat_h, targets.reshape(-1), scaled_bias)
    return (-nll.float()).reshape(targets.shape) * (targets != -100)
