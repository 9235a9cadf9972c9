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
from ..models import zero3
from ..models.dtypes import parse_dtype
from ..models.fingerprint import fingerprint
from ..models.quantize import check_mode, quantize_model
from ..models.sharding import local_parameter_bytes, sharded_copy, sharding_kind
from ..models.sharding import shard_like as shard_like_policy

log = logging.getLogger(__name__)


def _check_sharded_options(model: nn.Module, dtype, quantize, offload_to_cpu: bool, device) -> None:
    """Refuse what a sharded model cannot do here, saying how to get it."""
    wrong = [name for name, value in (("quantize", quantize), ("offload_to_cpu", offload_to_cpu or None),
                                      ("device", device)) if value is not None]
    if dtype is not None and any(p.dtype != dtype for p in model.parameters()):
        wrong.append("dtype")
    if wrong:
        raise ConfigError(f"Frozen got a sharded model ({sharding_kind(model)}) with {', '.join(wrong)}: its shards "
                          "stay where the framework put them, in their dtype; build it that way (Frozen.from_policy("
                          "policy, dtype=...) for a sharded copy), or pass an unsharded model or a folder"
                          + ("; under ZeRO-3 the DeepSpeed config sets them (bf16.enabled, "
                             "zero_optimization.offload_param)" if sharding_kind(model) == "zero3" else ""))


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
        device: where the weights live (e.g. ``"cuda:0"``); ``None`` keeps them where they are and, unless
            offloaded, moves them once to the batches' device at the first call: the reference lives on
            the policy's device.
        shard_like: the policy; when it is FSDP2-sharded, the reference is ``fully_shard``-ed the same way
            (same modules, same mesh) right after loading, so each rank keeps only its shards
            (:func:`refmodel.models.sharding.shard_like`). Ignored for a plain or DDP policy.

    A model sharded with FSDP2 (``fully_shard``) stays sharded: it runs through its own hooked forward and
    ``memory_bytes`` counts this rank's shards; it cannot be moved, offloaded or quantized here.
    """

    def __init__(self, model_or_path, *, dtype=None, offload_to_cpu: bool = False, quantize: str | None = None,
                 temperature: float = 1.0, attn_implementation: str | None = None,
                 use_fused_linear_logprobs: bool = True, cast_logprobs_to_fp32: bool = True,
                 chunk_size: int | None = None, allow_pickle: bool = False, device: str | torch.device | None = None,
                 shard_like: nn.Module | None = None):
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
        if shard_like is not None and sharding_kind(shard_like) == "fsdp2" and sharding_kind(model) == "none":
            if torch_dtype is not None and not loaded:
                model = model.to(torch_dtype)
            torch_dtype = None  # applied: a sharded model is not cast again
            model.eval()
            model.requires_grad_(False)
            shard_like_policy(model, shard_like)
        self.sharded = sharding_kind(model) != "none"
        if self.sharded:
            _check_sharded_options(model, torch_dtype, quantize, offload_to_cpu, device)
            if sharding_kind(model) == "zero3" and not zero3.is_prepared(model):  # zero.Init alone: no gather hooks
                model, self._engine = zero3.prepare_reference(model)
        elif torch_dtype is not None and not loaded:
            model = model.to(torch_dtype)
        model.eval()
        model.requires_grad_(False)
        if quantize is not None and not loaded:
            model = quantize_model(model, quantize)
        self.offload_to_cpu = bool(offload_to_cpu)
        if self.offload_to_cpu:
            model.to("cpu")
        elif device is not None:
            model.to(device)
        self.model = model
        self.temperature = float(temperature)
        self.quantize = quantize
        self._kwargs: dict[str, Any] = dict(use_fused_linear_logprobs=use_fused_linear_logprobs,
                            cast_logprobs_to_fp32=cast_logprobs_to_fp32, chunk_size=chunk_size)
        self._fingerprint: str | None = None

    @classmethod
    def from_policy(cls, policy: nn.Module, **kwargs) -> Frozen:
        """A frozen copy of ``policy`` on its device (the policy itself stays trainable and untouched).

        A plain or DDP policy is deep-copied; an FSDP2-sharded policy gets a copy sharded the same way, built
        from its shards (:func:`refmodel.models.sharding.sharded_copy`: each rank holds only its shards).
        """
        if hasattr(policy, "peft_config") and hasattr(policy, "merge_and_unload"):
            raise ConfigError("Frozen.from_policy got a PEFT model; use AdapterDisabled(policy) (no extra weights) "
                              "or Frozen(copy.deepcopy(policy).merge_and_unload()) to freeze the adapted weights")
        if isinstance(policy, nn.parallel.DistributedDataParallel):
            policy = policy.module
        if sharding_kind(policy) == "zero3":  # partitioned like it, with its own inference engine
            return cls(zero3.partitioned_copy(policy), **kwargs)
        if sharding_kind(policy) == "fsdp2":
            return cls(sharded_copy(policy, parse_dtype(kwargs.pop("dtype", None))), **kwargs)
        return cls(copy.deepcopy(policy), **kwargs)

    def shard_like(self, policy: nn.Module) -> bool:
        """Shard this reference like ``policy`` now, in place; True when it did.

        For a reference built before the framework wrapped the policy (the TRL trainers get ``reference=``
        before ``accelerator.prepare`` shards the policy; they call this when training begins). An FSDP2
        policy: the model is ``fully_shard``-ed the same way (:func:`refmodel.models.sharding.shard_like`).
        A ZeRO-3 policy: the weights move into a partitioned copy run by its own DeepSpeed inference engine,
        as TRL's ``prepare_deepspeed`` prepares a reference (:func:`refmodel.models.zero3.partitioned_copy`,
        one parameter at a time). Nothing happens for a plain or DDP policy, or a reference already sharded,
        offloaded or quantized, or (ZeRO-3) not a Hugging Face model class: those stay as they are, whole on
        each rank. Every rank must call it.
        """
        if isinstance(policy, nn.parallel.DistributedDataParallel):
            policy = policy.module
        kind = sharding_kind(policy)
        if kind == "none" or self.sharded or self.offload_to_cpu or self.quantize is not None:
            return False
        if kind == "zero3" and not callable(getattr(type(self.model), "_from_config", None)):
            log.warning("Frozen reference %s stays whole on each rank: a ZeRO-3 partitioned copy needs a Hugging "
                        "Face model class; load it from a folder under the DeepSpeed config to partition it",
                        type(self.model).__name__)
            return False
        if kind == "fsdp2":
            shard_like_policy(self.model, policy)
        else:
            plain = self.model
            self.model, self._engine = zero3.prepare_reference(zero3.partitioned_copy(plain))
            del plain  # the whole copy goes: each rank keeps its partition
        self.model.eval()
        self.model.requires_grad_(False)
        self.sharded = True
        log.info("Frozen reference sharded like the policy (%s): %d bytes on this rank", kind, self.memory_bytes)
        return True

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.model, temperature=self.temperature,
                                                     quantization=self.quantize)
        return self._fingerprint

    @property
    def memory_bytes(self) -> int:
        """Bytes of the frozen copy's weights on this rank (its shards when sharded; on the CPU when offloaded)."""
        return local_parameter_bytes(self.model)

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
        if target != home and not self.offload_to_cpu and not self.sharded:
            # The batches come on the policy's device: the reference lives there (once, not per call).
            log.info("Frozen reference moved from %s to %s, the batches' device (pass device= to place it up front)",
                     home, target)
            self.model.to(target)
            home = target
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
