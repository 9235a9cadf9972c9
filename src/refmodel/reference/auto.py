"""``auto(policy, config)``: pick the reference strategy by the rules users know, and say why.

Rules, first match wins:

1. ``reference_free`` -> :class:`ReferenceFree`.
2. ``load_reference_logprobs`` -> :class:`Precomputed` if the store's fingerprint equals that of the
   reference the rules below would build (a zero-memory live strategy becomes its fallback);
   otherwise :class:`~refmodel.errors.FingerprintMismatch`, never a silent reuse.
3. ``sync_ref_model`` -> :class:`Synced` (TR-DPO; PEFT policies get an exact reference adapter).
4. a PEFT policy without ``ref_model_path`` -> :class:`AdapterDisabled` (``ref_adapter_name`` if set).
5. ``remote_url`` -> ``Remote``; but with ``max_local_bytes`` set and the reference's weights fitting
   in it, a local :class:`Frozen` (hybrid).
6. ``ref_model_path`` -> :class:`Frozen` loaded from it; else a frozen copy of the policy.

Exactly one INFO line on the ``refmodel.reference`` logger says what was chosen and why.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import FingerprintMismatch
from ..models.dtypes import parse_dtype
from ..models.fingerprint import fingerprint
from ..models.loading import weights_bytes
from .adapter import AdapterDisabled
from .base import Reference, module_bytes
from .config import ReferenceConfig
from .free import ReferenceFree
from .frozen import Frozen
from .peft_policy import is_peft_model
from .precomputed import Precomputed
from .synced import Synced

log = logging.getLogger("refmodel.reference")


def _frozen_kwargs(cfg: ReferenceConfig) -> dict:
    return dict(dtype=cfg.dtype, offload_to_cpu=cfg.offload_to_cpu, quantize=cfg.quantize,
                temperature=cfg.temperature, use_fused_linear_logprobs=cfg.use_fused_linear_logprobs,
                cast_logprobs_to_fp32=cfg.cast_logprobs_to_fp32)


def _live(policy, cfg: ReferenceConfig, *, copy_policy: bool = True) -> tuple[Reference | None, str]:
    """Rules 3-6: ``(reference, reason)``.

    With ``copy_policy=False`` a rule that would freeze a deep copy of the policy returns ``(None,
    reason)`` instead: :func:`_copy_fingerprint` names that copy without making it.
    """
    logp: dict[str, Any] = dict(temperature=cfg.temperature, use_fused_linear_logprobs=cfg.use_fused_linear_logprobs,
                cast_logprobs_to_fp32=cfg.cast_logprobs_to_fp32)
    if cfg.sync_ref_model:
        synced = Synced(policy, ref_model_sync_steps=cfg.ref_model_sync_steps,
                     ref_model_mixup_alpha=cfg.ref_model_mixup_alpha, max_rank=cfg.max_rank, **logp)
        kind = "a LoRA reference adapter" if synced.lora is not None else "a full copy"
        return synced, (f"sync_ref_model=True (TR-DPO: every {cfg.ref_model_sync_steps} steps, "
                     f"alpha={cfg.ref_model_mixup_alpha}; {kind})")
    if is_peft_model(policy) and not cfg.ref_model_path:
        what = f"adapter {cfg.ref_adapter_name!r}" if cfg.ref_adapter_name else "the base model, adapters off"
        return (AdapterDisabled(policy, adapter_name=cfg.ref_adapter_name, **logp),
                f"the policy is a PEFT model ({what}; no extra weights)")
    if cfg.remote_url:
        from .remote import Remote, placement_rule

        size = weights_bytes(cfg.ref_model_path) if cfg.ref_model_path else module_bytes(policy)
        if size is None:
            placement, why = "remote", "its size is unknown (not a local model folder)"
        elif cfg.max_local_bytes is None:
            placement, why = "remote", "max_local_bytes is not set"
        else:
            placement, why = placement_rule(size, cfg.max_local_bytes)
        if placement == "local":
            reason = f"remote_url is set but the reference stays local: {why}"
            if cfg.ref_model_path:
                return Frozen(cfg.ref_model_path, **_frozen_kwargs(cfg)), reason
            return (Frozen.from_policy(policy, **_frozen_kwargs(cfg)) if copy_policy else None), reason
        remote = Remote(cfg.remote_url, cfg.remote_model, token=cfg.remote_token, temperature=cfg.temperature)
        return remote, f"remote_url is set and the reference goes remote: {why}; model {remote.model!r} at {cfg.remote_url}"
    if cfg.ref_model_path:
        return Frozen(cfg.ref_model_path, **_frozen_kwargs(cfg)), f"ref_model_path={cfg.ref_model_path!r}"
    reason = "default: a frozen copy of the policy"
    return (Frozen.from_policy(policy, **_frozen_kwargs(cfg)) if copy_policy else None), reason


def _copy_fingerprint(policy, cfg: ReferenceConfig) -> str:
    """``Frozen.from_policy(policy, ...).fingerprint`` without the copy when the copy would hold the
    policy's own tensors (no ``dtype`` cast, no quantization): the hash reads the policy's weights."""
    dtype = parse_dtype(cfg.dtype)
    if cfg.quantize is None and (dtype is None or all(t.dtype == dtype for t in policy.state_dict().values()
                                                      if t.is_floating_point())):
        return fingerprint(policy, temperature=cfg.temperature)
    # a cast or quantized copy has other bytes: they exist only once the copy is made (then freed)
    return Frozen.from_policy(policy, **_frozen_kwargs(cfg)).fingerprint


def _open_store(path: str):
    from ..store import LogprobStore

    return LogprobStore.open(path)


def auto(policy, config: ReferenceConfig | None = None) -> Reference:
    """Build the :class:`~refmodel.reference.Reference` that ``config`` asks for (see module rules)."""
    cfg = config if config is not None else ReferenceConfig()
    ref: Reference
    if cfg.reference_free:
        ref, reason = ReferenceFree(), "reference_free=True (ORPO/SimPO need no pi_ref)"
    elif cfg.load_reference_logprobs:
        store = _open_store(cfg.load_reference_logprobs)
        # A frozen copy of the policy would only be hashed and dropped (it holds weights, so it is never
        # the fallback): hash the policy instead of copying it.
        live, live_reason = _live(policy, cfg, copy_policy=False)
        live_fingerprint = live.fingerprint if live is not None else _copy_fingerprint(policy, cfg)
        if live_fingerprint != store.fingerprint:
            raise FingerprintMismatch(
                f"the store {cfg.load_reference_logprobs} was computed by reference {store.fingerprint}, but "
                f"this policy and config give reference {live_fingerprint} ({live_reason}); precompute the "
                "store again with this reference, or point load_reference_logprobs at the matching store")
        fallback = live if live is not None and live.memory_bytes == 0 else None
        ref = Precomputed(store, fallback=fallback)
        reason = (f"load_reference_logprobs={cfg.load_reference_logprobs!r} matches fingerprint {store.fingerprint}"
                  + (f"; misses fall back to {type(live).__name__}" if fallback is not None else "; misses raise"))
    else:
        live, reason = _live(policy, cfg)
        assert live is not None  # copy_policy=True always builds
        ref = live
    log.info("reference: %s, because %s; extra memory %d bytes", type(ref).__name__, reason, ref.memory_bytes)
    return ref


__all__ = ["auto"]
