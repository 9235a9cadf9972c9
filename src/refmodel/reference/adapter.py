"""``AdapterDisabled``: with a PEFT policy, the base model (adapters off) or a named adapter is pi_ref.

No extra weights: the reference shares the policy's frozen base. Each call runs the policy under
``disable_adapter()`` (or with ``adapter_name`` active), in eval mode and under ``no_grad``, then
restores the active adapter, train/eval flags and ``requires_grad`` exactly as they were.
"""

from __future__ import annotations

import torch

from .. import validation
from ..errors import ConfigError
from ..logprobs.model import model_logprobs
from ..models.sharding import local_bytes
from .peft_policy import (
    reference_fingerprint,
    reference_view,
    require_peft_model,
    require_shared_base_frozen,
)


class AdapterDisabled:
    """The policy's base model (or its reference adapter ``adapter_name``) as pi_ref.

    Args:
        peft_policy: a ``peft.PeftModel``; refused at construction if it has no adapters or trains
            base weights (the reference would move with them).
        adapter_name: a second, frozen adapter that is the reference (e.g. the SFT adapter you start
            DPO from); ``None`` uses the base model with every adapter disabled.
    """

    def __init__(self, peft_policy, *, adapter_name: str | None = None, temperature: float = 1.0,
                 use_fused_linear_logprobs: bool = True, cast_logprobs_to_fp32: bool = True):
        require_peft_model(peft_policy, "AdapterDisabled")
        require_shared_base_frozen(peft_policy, "AdapterDisabled")
        if adapter_name is not None:
            if adapter_name not in peft_policy.peft_config:
                raise ConfigError(f"reference adapter {adapter_name!r} is not loaded in the policy; it has "
                                  f"{sorted(peft_policy.peft_config)} (load it with policy.load_adapter(path, "
                                  f"adapter_name={adapter_name!r}))")
            if adapter_name in peft_policy.active_adapters:
                raise ConfigError(f"reference adapter {adapter_name!r} is the policy's active (trained) adapter; "
                                  "pass the name of a second, frozen adapter, or adapter_name=None for the base")
            trained = [n for n, p in peft_policy.named_parameters() if p.requires_grad and f".{adapter_name}." in n]
            if trained:
                raise ConfigError(f"reference adapter {adapter_name!r} has trainable parameters ({trained[0]}, ...); "
                                  "freeze it (requires_grad_(False)) so that the reference does not change")
        temperature = validation.temperature(temperature, error=ConfigError)
        self.policy = peft_policy
        self.adapter_name = adapter_name
        self.temperature = float(temperature)
        self._kwargs = dict(use_fused_linear_logprobs=use_fused_linear_logprobs,
                            cast_logprobs_to_fp32=cast_logprobs_to_fp32)
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """The base model's fingerprint (as if loaded alone), plus the reference adapter if named."""
        if self._fingerprint is None:
            self._fingerprint = reference_fingerprint(self.policy, self.adapter_name, temperature=self.temperature)
        return self._fingerprint

    @property
    def memory_bytes(self) -> int:
        """0 for the base model; the reference adapter's bytes when one is named."""
        if self.adapter_name is None:
            return 0
        causal = self.policy.get_base_model()
        return local_bytes(t for n, t in causal.named_parameters() if f".{self.adapter_name}." in n)

    @torch.no_grad()
    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 score_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T]`` float32 log-probs under the base model (or the reference adapter)."""
        with reference_view(self.policy, self.adapter_name):
            return model_logprobs(self.policy, input_ids, attention_mask, score_mask,
                                  temperature=self.temperature, **self._kwargs)

    def on_step(self, step: int, policy) -> None:
        """Nothing to do: the base (and a frozen reference adapter) never change."""

    def __repr__(self) -> str:
        return f"AdapterDisabled(adapter_name={self.adapter_name!r})"


__all__ = ["AdapterDisabled"]
