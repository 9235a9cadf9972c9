"""The LM head of a causal LM as one linear map plus the model's logit transform: :class:`LMHead`.

The log-prob kernel (:func:`refmodel.head_logprobs`), the exact KL (:func:`refmodel.kl.exact`) and the fused
policy loss (:func:`refmodel.losses.fused_policy_loss`) all take the head in this one form:

    z = f([h, s_1 drop_1(h) A_1^T, ...] @ [W, B_1, ...]^T + b),   f = the logit transform (logit scale, soft-cap)

PEFT LoRA adapters on the head (``target_modules=["lm_head"]``) are folded in exactly by this rank
concatenation: ``h W^T + s drop(h) A^T B^T`` is the product of the extended hidden state and the extended
weight, so the tiled kernels run unchanged on ``H + r`` columns and the gradients reach ``A``, ``B`` and ``h``.
A ``modules_to_save`` copy of the head is read through its active adapter. A head that is not a linear map
(DoRA, a quantized layer, a custom module) has no ``LMHead``: :meth:`LMHead.from_model_or_none` returns None
and the caller runs the module itself on the rows it needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import ConfigError
from .tiles import promote_operands
from .transform import LogitTransform, full_log_softmax

# A transformers model or PEFT wrapper (or one of their layers): its submodules (``lm_head``, ``lora_A``,
# ...) are dynamic attributes, which ``nn.Module.__getattr__`` types as ``Tensor | Module``; so ``Any``.
HFModule = Any

# Said wherever a DeepSpeed ZeRO-3 partition is reached outside a gather (its data is an empty placeholder).
PARTITIONED_HINT = ("under DeepSpeed ZeRO-3 a parameter is full only inside the model's own forward (the hooks of "
                    "deepspeed.initialize) or inside deepspeed.zero.GatheredParameters / "
                    "refmodel.models.sharding.full_parameters(model)")


def is_partitioned(tensor: torch.Tensor) -> bool:
    """True for a DeepSpeed ZeRO-3 parameter outside a gather: its ``data`` is an empty placeholder and the
    full shape is ``tensor.ds_shape``; this rank holds only its slice (``tensor.ds_tensor``)."""
    return hasattr(tensor, "ds_shape") and tensor.numel() == 0 and tuple(tensor.ds_shape) != tuple(tensor.shape)


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """The shape of ``tensor`` as the model sees it: ``ds_shape`` for a ZeRO-3 partition, else its own."""
    return tensor.ds_shape if is_partitioned(tensor) else tensor.shape  # type: ignore[attr-defined]  # DeepSpeed's


def unwrap_causal_lm(model: HFModule) -> HFModule:
    """The ``*ForCausalLM`` module inside a DDP and/or PEFT wrapper (or ``model`` itself)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        return get_base()
    return model


def logit_transform(config) -> LogitTransform:
    """The logit scale and final soft-cap that ``config``'s model applies (Gemma-2, Cohere, Granite).

    Temperature is not the model's: it stays 1.0 here and the caller passes its own.
    """
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = float(getattr(cfg, "logit_scale", None) or 1.0)  # Cohere multiplies
    granite = getattr(cfg, "logits_scaling", None)  # Granite divides
    if granite:
        scale /= float(granite)
    return LogitTransform(scale, float(softcap) if softcap else None)


class LoraColumns(NamedTuple):
    """One active LoRA adapter of the head, folded as ``r`` extra columns: ``scaling * lora_a(dropout(h))``
    against ``lora_b [V, r]`` (and ``lora_b_bias [V]`` when lora_B has one)."""

    lora_a: nn.Linear  # [r, H]
    dropout: nn.Module
    scaling: float
    lora_b: torch.Tensor
    lora_b_bias: torch.Tensor | None


@dataclass(frozen=True)
class LMHead:
    """An LM head as ``z = f(h @ weight.T + bias)`` plus folded LoRA adapters (module docstring).

    ``weight [V, H]`` and ``bias [V]`` are the linear layer's own (tied embeddings included); ``logit_scale`` and
    ``softcap`` are the model's own transform (Gemma-2, Cohere, Granite); ``lora`` the head's active LoRA adapters
    at the time the head was read (:meth:`from_model`). Temperature is not part of the head: it is the sampling
    temperature, passed to each function. Build one with :meth:`from_model`, or ``LMHead(weight, bias)``.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None
    lora: tuple[LoraColumns, ...] = ()

    def transform(self, temperature: float = 1.0) -> LogitTransform:
        """The head's logit transform at the sampling ``temperature``."""
        return LogitTransform.of(self.logit_scale, self.softcap, temperature)

    def fold(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(hidden' [..., H + r], weight' [V, H + r], bias' [V])`` with ``hidden' @ weight'.T + bias'`` equal to
        the head with its adapters, exactly; ``(hidden, weight, bias)`` themselves (no copy) without adapters.

        Differentiable: gradients reach ``hidden``, the weight, and each adapter's ``lora_A`` / ``lora_B``.
        """
        if not self.lora:
            return hidden, self.weight, self.bias
        cols, weights, bias = [hidden], [self.weight], self.bias
        for part in self.lora:
            a = part.lora_a(part.dropout(hidden.to(part.lora_a.weight.dtype)))
            cols.append(part.scaling * a.to(hidden.dtype))
            weights.append(part.lora_b.to(self.weight.dtype))
            if part.lora_b_bias is not None:
                bias = part.lora_b_bias if bias is None else bias + part.lora_b_bias
        return torch.cat(cols, dim=-1), torch.cat(weights, dim=1), bias

    def full_log_softmax(self, hidden: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
        """``[..., V]`` log-probabilities (float32; float64 for float64 inputs) from full logits: the naive oracle the
        tiled kernels are tested against, and the fallback where they do not apply."""
        h, w, b = promote_operands(*self.fold(hidden))
        return full_log_softmax(torch.nn.functional.linear(h, w, b), scale=self.logit_scale, softcap=self.softcap,
                                temperature=temperature)

    @classmethod
    def from_model(cls, model: HFModule) -> LMHead:
        """The head of a Hugging Face causal LM (or its PEFT wrapper): tied, biased, soft-capped and LoRA heads.

        Raises:
            ConfigError: the head is not a linear map (DoRA, a quantized layer, a custom module).
        """
        head = cls.from_model_or_none(model)
        if head is None and _head_parts(unwrap_causal_lm(model)) is not None:
            raise ConfigError(f"the model's LM head weight is a ZeRO-3 partition here (empty on this rank): "
                              f"{PARTITIONED_HINT}; read the head inside such a gather")
        if head is None:
            raise ConfigError("the model's LM head is not a linear map (DoRA, a quantized layer or a custom module), "
                              "so it cannot be tiled; merge the adapter (model.merge_and_unload()), keep the head "
                              "unquantized, or pass LMHead(weight, bias) explicitly")
        return head

    @classmethod
    def from_model_or_none(cls, model: HFModule) -> LMHead | None:
        """:meth:`from_model`, or None when the head is not a linear map, or is a ZeRO-3 partition outside a gather
        (then run the head module itself: its forward gathers it)."""
        causal = unwrap_causal_lm(model)
        parts = _head_parts(causal)
        if parts is None or any(is_partitioned(t) for t in _tensors(parts)):
            return None
        tf = logit_transform(causal.config)
        weight, bias, lora = parts
        return cls(weight, bias, tf.logit_scale, tf.softcap, lora)


def _head_parts(causal: HFModule) -> tuple[torch.Tensor, torch.Tensor | None, tuple[LoraColumns, ...]] | None:
    return _linear_parts(causal.get_output_embeddings())


def _tensors(parts) -> list[torch.Tensor]:
    weight, bias, lora = parts
    out = [weight, *(t for t in (bias,) if t is not None)]
    for part in lora:
        out += [part.lora_a.weight, part.lora_b, *(t for t in (part.lora_b_bias,) if t is not None)]
    return out


def _linear_parts(head: HFModule) -> tuple[torch.Tensor, torch.Tensor | None, tuple[LoraColumns, ...]] | None:
    """``(weight, bias, lora)`` of ``head`` as a linear map with PEFT adapters folded in, never dropped; None if
    it is not one."""
    if type(head) is nn.Linear:
        return head.weight, head.bias, ()
    if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):  # PEFT ModulesToSaveWrapper
        active = getattr(head, "active_adapters", None) or [getattr(head, "active_adapter", None)]
        name = active[0] if active else None
        use_copy = not getattr(head, "disable_adapters", False) and name in head.modules_to_save
        return _linear_parts(head.modules_to_save[name] if use_copy else head.original_module)
    if hasattr(head, "lora_A") and hasattr(head, "base_layer"):  # PEFT LoRA layer
        base = _linear_parts(head.base_layer)
        if base is None:  # e.g. a quantized base: only the whole LoRA module computes base + adapter
            return None
        if getattr(head, "disable_adapters", False) or getattr(head, "merged", False):
            return base
        weight, bias, lora = base
        for name in head.active_adapters:
            if name not in head.lora_A:
                continue
            if head.use_dora.get(name, False) or type(head.lora_B[name]) is not nn.Linear:
                return None  # DoRA rescales the column norms: no rank concatenation expresses it
            b = head.lora_B[name]
            lora += (LoraColumns(head.lora_A[name], head.lora_dropout[name], head.scaling[name], b.weight, b.bias),)
        return weight, bias, lora
    return None


__all__ = ["LMHead", "LoraColumns", "PARTITIONED_HINT", "full_shape", "is_partitioned", "logit_transform",
           "unwrap_causal_lm"]
