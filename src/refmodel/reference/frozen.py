"""``Frozen``: a separate, frozen copy of the reference model (the default strategy).

The copy is put in ``eval()`` (no dropout), every parameter gets ``requires_grad=False``, and every
forward runs under ``torch.no_grad()``. Options: a compute ``dtype``, CPU offload between calls
(the weights travel to the batch's device for the call and back afterwards), and weight
quantization through :mod:`refmodel.quantize`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import validation
from ..errors import ConfigError
from ..logprobs.model import model_logprobs
from ..models import sharding, zero3
from ..models.dtypes import parse_dtype
from ..models.fingerprint import fingerprint
from ..models.quantize import check_mode, quantize_model

log = logging.getLogger(__name__)

class Frozen:
    """A frozen reference model of its own: ``[B, T]`` float32 log-probs under no_grad.

    Args:
        model_or_path: a causal LM (frozen *in place*, not copied) or a local model folder, loaded by
            :func:`refmodel.models.loading.load_model`: safetensors only unless ``allow_pickle=True``,
            never the folder's own code, no hub ids.
            Use :meth:`from_policy` to freeze a deep copy of the policy instead.
        dtype: compute dtype of the reference weights (e.g. ``torch.bfloat16``); ``None`` keeps them.
        offload_to_cpu: keep the weights on the CPU between calls; move them to the batch's device
            for each call. Saves accelerator memory, costs a host-device copy per call.
        quantize: a mode of :data:`refmodel.models.quantize.QUANT_MODES` (torchao ``"int8"``/``"int4"``,
            bitsandbytes ``"bnb-int8"``/``"bnb-nf4"``): every mode the loader supports. A path is quantized
            by :func:`~refmodel.models.loading.load_model` (bitsandbytes while loading), a model in place.
        temperature: the sampling temperature the log-probs must match (logits / temperature).
        attn_implementation: passed to ``from_pretrained`` when loading from a path.
        allow_pickle: accept a folder whose only weights are pickled (``pytorch_model.bin``).
    """

    def __init__(self, model_or_path, *, dtype=None, offload_to_cpu: bool = False, quantize: str | None = None,
                 temperature: float = 1.0, attn_implementation: str | None = None,
                 use_fused_linear_logprobs: bool = True, cast_logprobs_to_fp32: bool = True,
                 chunk_size: int | None = None, allow_pickle: bool = False):
        check_mode(quantize)
        temperature = validation.temperature(temperature, error=ConfigError)
        torch_dtype = parse_dtype(dtype)
        if isinstance(model_or_path, (str, Path)):
            from ..models.loading import load_model

            model = load_model(model_or_path, dtype=torch_dtype, quantize=quantize,
                               attn_implementation=attn_implementation, allow_pickle=allow_pickle, what="Frozen")
        elif isinstance(model_or_path, nn.Module):
            model = model_or_path
        else:
            raise ConfigError(f"Frozen needs a torch model or a model path, got {type(model_or_path).__name__}")
        if hasattr(model, "peft_config") and hasattr(model, "disable_adapter"):
            raise ConfigError("Frozen got a PEFT model; merge it first (model.merge_and_unload()) to freeze the "
                              "adapted weights, or use AdapterDisabled(model) to use the base model as reference")
        loaded = isinstance(model_or_path, (str, Path))  # then load_model applied dtype and quantize
        self._engine = None  # the DeepSpeed inference engine of a ZeRO-3 reference: it owns the gather hooks
        if sharding.sharding_kind(model) == "zero3":
            if offload_to_cpu or (quantize is not None and not loaded) or (torch_dtype is not None and not loaded):
                raise ConfigError("a ZeRO-3 partitioned reference takes its dtype and offload from the DeepSpeed "
                                  "config (bf16.enabled, zero_optimization.offload_param), and cannot be quantized "
                                  "here; leave dtype, offload_to_cpu and quantize unset")
            if not zero3.is_prepared(model):  # loaded under zero.Init: partitions without gather hooks
                model, self._engine = zero3.prepare_reference(model)
        if torch_dtype is not None and not loaded:
            model = model.to(torch_dtype)
        model.eval()
        model.requires_grad_(False)
        if quantize is not None and not loaded:
            model = quantize_model(model, quantize)
        self.offload_to_cpu = bool(offload_to_cpu)
        if self.offload_to_cpu:
            model.to("cpu")
        self.model = model
        self.temperature = float(temperature)
        self.quantize = quantize
        self._kwargs: dict[str, Any] = dict(use_fused_linear_logprobs=use_fused_linear_logprobs,
                            cast_logprobs_to_fp32=cast_logprobs_to_fp32, chunk_size=chunk_size)
        self._fingerprint: str | None = None

    @classmethod
    def from_policy(cls, policy: nn.Module, **kwargs) -> Frozen:
        """A frozen deep copy of ``policy`` (the policy itself stays trainable and untouched); of a ZeRO-3
        policy, a copy partitioned like it (:func:`~refmodel.models.zero3.partitioned_copy`) with its own
        inference engine (:func:`~refmodel.models.zero3.prepare_reference`)."""
        if hasattr(policy, "peft_config") and hasattr(policy, "merge_and_unload"):
            raise ConfigError("Frozen.from_policy got a PEFT model; use AdapterDisabled(policy) (no extra weights) "
                              "or Frozen(copy.deepcopy(policy).merge_and_unload()) to freeze the adapted weights")
        if sharding.sharding_kind(policy) == "zero3":
            return cls(zero3.partitioned_copy(policy), **kwargs)
        return cls(copy.deepcopy(policy), **kwargs)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.model, temperature=self.temperature,
                                                     quantization=self.quantize)
        return self._fingerprint

    @property
    def memory_bytes(self) -> int:
        """Bytes of the frozen copy's weights on this rank (on the CPU when offloaded; a partition under ZeRO-3)."""
        return sharding.local_parameter_bytes(self.model)

    def _device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    @torch.no_grad()
    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 score_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T]`` float32 log-probs under the frozen model (on ``input_ids``' device)."""
        home = self._device()
        target = input_ids.device if isinstance(input_ids, torch.Tensor) else home
        moved = self.offload_to_cpu and target != home
        if moved:
            self.model.to(target)
        try:
            return model_logprobs(self.model, input_ids, attention_mask, score_mask,
                                  temperature=self.temperature, **self._kwargs)
        finally:
            if moved:
                self.model.to(home)

    def on_step(self, step: int, policy) -> None:
        """A frozen reference never changes; refuses to run when it *is* the policy."""
        if policy is self.model:
            raise ConfigError("the Frozen reference is the policy object itself, so it would train with it; "
                              "use Frozen.from_policy(policy) to freeze a copy")

    def __repr__(self) -> str:
        return (f"Frozen({type(self.model).__name__}, bytes={self.memory_bytes}, temperature={self.temperature}, "
                f"offload_to_cpu={self.offload_to_cpu}, quantize={self.quantize})")


__all__ = ["Frozen"]
