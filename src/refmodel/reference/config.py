"""``ReferenceConfig``: the reference options users already know (TRL, HALOs), validated once.

Names follow TRL's ``DPOConfig`` (``precompute_ref_log_probs``, ``sync_ref_model``,
``ref_model_mixup_alpha``, ``ref_model_sync_steps``, ``use_fused_linear_logprobs``,
``cast_logprobs_to_fp32``) and HALOs (``cache_reference_logprobs``, ``load_reference_logprobs``).
Combinations that cannot work fail at construction with a message that says what to do instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import validation
from ..errors import ConfigError
from ..models.dtypes import parse_dtype
from ..models.quantize import check_mode
from .synced import check_sync_settings


@dataclass(frozen=True)
class ReferenceConfig:
    """How to build the reference; see :func:`refmodel.reference.auto` for how it is chosen.

    Attributes:
        precompute_ref_log_probs / cache_reference_logprobs: read pi_ref from a precomputed store
            (requires ``load_reference_logprobs``; make one with ``refmodel precompute``).
        load_reference_logprobs: path of a log-prob store; used when its fingerprint matches.
        sync_ref_model, ref_model_mixup_alpha, ref_model_sync_steps: TR-DPO (see ``Synced``).
        max_rank: PEFT + sync only: bound on the reference adapter's rank (None = exact).
        use_fused_linear_logprobs, cast_logprobs_to_fp32: how log-probs are computed.
        ref_model_path: a reference model other than the policy's initial weights.
        reference_free: no reference (ORPO, SimPO).
        ref_adapter_name: PEFT: a frozen adapter that is the reference (instead of the base).
        dtype, offload_to_cpu, quantize, temperature: options of a local frozen copy.
        remote_url, remote_model, remote_token: a reference service, the model's name on it (``None``: the
            one log-prob model it serves) and its bearer token; ``max_local_bytes``: keep the reference
            local when its weights fit in this many bytes (hybrid), else use the service.
    """

    precompute_ref_log_probs: bool = False
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    cache_reference_logprobs: bool = False
    load_reference_logprobs: str | None = None
    use_fused_linear_logprobs: bool = True
    cast_logprobs_to_fp32: bool = True
    ref_model_path: str | None = None
    reference_free: bool = False
    ref_adapter_name: str | None = None
    dtype: str | None = None
    offload_to_cpu: bool = False
    quantize: str | None = None
    temperature: float = 1.0
    remote_url: str | None = None
    remote_model: str | None = None
    remote_token: str | None = None
    max_local_bytes: int | None = None
    max_rank: int | None = None

    @property
    def wants_store(self) -> bool:
        return bool(self.precompute_ref_log_probs or self.cache_reference_logprobs or self.load_reference_logprobs)

    def __post_init__(self) -> None:
        check_sync_settings(self.ref_model_sync_steps, self.ref_model_mixup_alpha, self.max_rank)
        parse_dtype(self.dtype)
        check_mode(self.quantize)
        validation.temperature(self.temperature, error=ConfigError)
        if self.max_local_bytes is not None and (not isinstance(self.max_local_bytes, int) or self.max_local_bytes < 0):
            raise ConfigError(f"max_local_bytes must be a byte count >= 0, got {self.max_local_bytes!r}")
        if self.reference_free:
            others = [name for name, on in [
                ("precompute_ref_log_probs", self.precompute_ref_log_probs),
                ("cache_reference_logprobs", self.cache_reference_logprobs),
                ("load_reference_logprobs", self.load_reference_logprobs), ("sync_ref_model", self.sync_ref_model),
                ("ref_model_path", self.ref_model_path), ("ref_adapter_name", self.ref_adapter_name),
                ("remote_url", self.remote_url), ("quantize", self.quantize),
                ("offload_to_cpu", self.offload_to_cpu)] if on]
            if others:
                raise ConfigError(f"reference_free=True means no reference at all (ORPO, SimPO), but "
                                  f"{', '.join(others)} configure one; drop them, or set reference_free=False "
                                  "for a reference-based loss")
        if self.sync_ref_model and self.wants_store:
            raise ConfigError("sync_ref_model=True moves the reference every ref_model_sync_steps steps, so "
                              "precomputed log-probs (precompute_ref_log_probs / cache_reference_logprobs / "
                              "load_reference_logprobs) would go stale; use one or the other")
        if self.sync_ref_model and self.remote_url:
            raise ConfigError("sync_ref_model=True needs the reference next to the policy to mix weights into "
                              "it; a remote reference cannot be synced. Drop remote_url or sync_ref_model")
        if self.sync_ref_model and (self.ref_model_path or self.ref_adapter_name):
            raise ConfigError("sync_ref_model=True starts the reference from the policy (TR-DPO); "
                              "ref_model_path / ref_adapter_name name a fixed reference. Drop one of them")
        if self.sync_ref_model and (self.quantize or self.offload_to_cpu):
            raise ConfigError("sync_ref_model=True updates the reference's weights in place; quantize and "
                              "offload_to_cpu apply to a fixed Frozen reference only")
        if (self.precompute_ref_log_probs or self.cache_reference_logprobs) and not self.load_reference_logprobs:
            raise ConfigError("precompute_ref_log_probs / cache_reference_logprobs need "
                              "load_reference_logprobs=PATH of a log-prob store; make one with `refmodel "
                              "precompute` (same model, tokenizer and data), then pass its path")
        if self.max_rank is not None and not self.sync_ref_model:
            raise ConfigError("max_rank bounds the rank of a synced LoRA reference; set sync_ref_model=True "
                              "or drop max_rank")
        if (self.remote_model or self.remote_token) and not self.remote_url:
            raise ConfigError("remote_model / remote_token need remote_url (the reference service's address)")
        if self.max_local_bytes is not None and not self.remote_url:
            raise ConfigError("max_local_bytes chooses between a local copy and the service; it needs "
                              "remote_url (without a service the reference is always local)")


__all__ = ["ReferenceConfig"]
