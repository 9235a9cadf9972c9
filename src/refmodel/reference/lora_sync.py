"""Exact TR-DPO updates of a LoRA reference adapter that lives on the policy's own base model.

With a shared frozen base ``W0``, the policy is ``W0 + s_p B_p A_p`` and the reference
``W0 + s_r B_r A_r``. The TR-DPO rule ``ref <- alpha * policy + (1 - alpha) * ref`` is then a rule on
the deltas only, and rank concatenation makes it exact (Gorbatovski et al. 2024, eq. 6, applied to
the deltas):

    alpha s_p B_p A_p + (1 - alpha) s_r B_r A_r
        = [sqrt(alpha s_p) B_p, sqrt((1 - alpha) s_r) B_r] @ [sqrt(alpha s_p) A_p ; sqrt((1 - alpha) s_r) A_r]

with the reference's scaling set to 1. The rank grows by ``r_p`` per soft sync; ``max_rank`` bounds
it with the best rank-k approximation of the delta (QR + SVD of the small core, never the full
``out x in`` matrix), and records the relative Frobenius error it discarded. ``alpha = 1`` copies the
policy adapter bit for bit, scaling included. Modules trained in full (``modules_to_save``) are
mixed parameter by parameter.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn

from ..errors import ConfigError
from ..logprobs.lm_head import full_shape
from ..models import zero3
from ..models.sharding import full_tensor, local_bytes, local_like, local_tensor
from .base import restore_requires_grad
from .peft_policy import lora_layers, modules_to_save

log = logging.getLogger(__name__)


def check_lora_supported(policy, adapter: str) -> None:
    """Refuse adapter kinds whose update cannot be made exact here, saying what to use instead."""
    cfg = policy.peft_config[adapter]
    kind = str(getattr(cfg, "peft_type", ""))
    problems = []
    if "LORA" not in kind.upper():
        problems.append(f"peft_type {kind} (only LoRA)")
    if getattr(cfg, "use_dora", False):
        problems.append("DoRA (its weight norm makes a mix of adapters non-linear)")
    if getattr(cfg, "target_parameters", None):
        problems.append("target_parameters")
    if getattr(cfg, "lora_bias", False):
        problems.append("lora_bias")
    for name, layer in lora_layers(policy):
        emb = getattr(layer, "lora_embedding_A", None)
        if adapter in layer.lora_A and type(layer.lora_A[adapter]) is not torch.nn.Linear:
            problems.append(f"{name}: {type(layer.lora_A[adapter]).__name__} LoRA (only Linear)")
        elif emb is not None and adapter in emb:
            problems.append(f"{name}: embedding LoRA")
    if problems:
        raise ConfigError("Synced cannot keep an exact reference adapter for this PEFT policy: "
                          + "; ".join(problems[:4]) + ". Use Synced(policy.merge_and_unload()) on a full model, "
                          "or AdapterDisabled(policy) for a fixed reference")


def _factors(layer, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A [r, in], B [out, r], scaling)`` of adapter ``name`` as full tensors: under FSDP2 the policy's factors
    are shards, gathered here (a collective); the reference adapter, added later, holds plain tensors."""
    return (full_tensor(layer.lora_A[name].weight), full_tensor(layer.lora_B[name].weight), float(layer.scaling[name]))


def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param <- value`` where ``param`` may be a shard (this rank's piece of ``value`` is written)."""
    local_tensor(param).copy_(local_like(value, param))


def _truncate(b: torch.Tensor, a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``k`` factors of ``b @ a`` and the relative Frobenius error dropped (float64 math)."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = min(k, s.numel())
    root = s[:k].sqrt()
    total = float(s.square().sum())
    err = math.sqrt(float(s[k:].square().sum()) / total) if total > 0 else 0.0
    return (qb @ u[:, :k]) * root, (root[:, None] * vh[:k]) @ qa.T, err


class LoraReference:
    """The reference as its own LoRA adapter ``ref_name`` next to the policy adapter ``policy_name``."""

    def __init__(self, policy, ref_name: str, max_rank: int | None):
        self.policy = policy
        self.policy_name = policy.active_adapter
        self.ref_name = ref_name
        self.max_rank = max_rank
        self.rank = int(policy.peft_config[self.policy_name].r)
        self.max_truncation_error = 0.0  # largest relative Frobenius error dropped by max_rank
        check_lora_supported(policy, self.policy_name)
        self._create(copy.deepcopy(policy.peft_config[self.policy_name]))
        self.hard_copy()

    def _create(self, cfg) -> None:
        cfg.inference_mode = True
        cfg.lora_dropout = 0.0
        with restore_requires_grad(self.policy), torch.no_grad():
            if self.ref_name in self.policy.peft_config:
                self.policy.delete_adapter(self.ref_name)
            self.policy.add_adapter(self.ref_name, cfg)
        for n, p in self.policy.named_parameters():
            if f".{self.ref_name}." in n:
                p.requires_grad_(False)
        if zero3.is_zero3(self.policy):  # added after deepspeed.initialize: partitioned like the rest
            zero3.partition_new_parameters(self.adapter_modules(self.ref_name))
        missing = [n for n, layer in lora_layers(self.policy)
                   if (self.policy_name in layer.lora_A) != (self.ref_name in layer.lora_A)]
        missing += [n for n, w in modules_to_save(self.policy)
                    if (self.policy_name in w.modules_to_save) != (self.ref_name in w.modules_to_save)]
        if missing:
            raise ConfigError(f"could not give the reference adapter the policy adapter's layout ({missing[0]}); "
                              "use Synced on a merged full model instead")
        if self.policy.active_adapter != self.policy_name:  # add_adapter must not switch the policy
            self.policy.set_adapter(self.policy_name)

    def adapter_modules(self, name: str) -> nn.ModuleList:
        """The modules of adapter ``name`` (its LoRA factors and full copies), the only parameters a sync touches:
        under ZeRO-3 they are gathered (:func:`~refmodel.models.zero3.full_parameters`), not the whole model.

        Gathered with ``zero3.full_parameters``, not ``sharding.full_parameters``: under FSDP2 these modules hold
        DTensor shards without being ``fully_shard`` roots themselves, which ``sharding_kind`` refuses (tensor
        parallel); there ``zero3.full_parameters`` does nothing and :func:`_factors` reads the shards full."""
        mods = [m for _, layer in lora_layers(self.policy) if name in layer.lora_A
                for m in (layer.lora_A[name], layer.lora_B[name])]
        mods += [w.modules_to_save[name] for _, w in modules_to_save(self.policy) if name in w.modules_to_save]
        return nn.ModuleList(mods)

    @torch.no_grad()
    def hard_copy(self) -> None:
        """ref <- policy, bit for bit (weights and scalings)."""
        if any(full_shape(layer.lora_A[self.ref_name].weight) != full_shape(layer.lora_A[self.policy_name].weight)
               for _, layer in lora_layers(self.policy) if self.ref_name in layer.lora_A):
            self._create(copy.deepcopy(self.policy.peft_config[self.policy_name]))
        with zero3.full_parameters(self.adapter_modules(self.policy_name)), \
                zero3.full_parameters(self.adapter_modules(self.ref_name), writable=True):
            self._copy_policy_adapter()
        self.rank = int(self.policy.peft_config[self.policy_name].r)

    def _copy_policy_adapter(self) -> None:
        for _, layer in lora_layers(self.policy):
            if self.policy_name not in layer.lora_A:
                continue
            a_p, b_p, s_p = _factors(layer, self.policy_name)
            _assign(layer.lora_A[self.ref_name].weight, a_p)
            _assign(layer.lora_B[self.ref_name].weight, b_p)
            layer.scaling[self.ref_name] = s_p
        for _, wrapper in modules_to_save(self.policy):
            for p_r, p_p in zip(wrapper.modules_to_save[self.ref_name].parameters(),
                                wrapper.modules_to_save[self.policy_name].parameters(), strict=True):
                _assign(p_r, p_p)

    def _mixed(self, alpha: float):
        """``({layer: (A, B)}, rank, [module values])`` of the mix, from the (full) factors of both adapters."""
        new, rank = {}, 0
        for name, layer in lora_layers(self.policy):
            if self.policy_name not in layer.lora_A:
                continue
            a_p, b_p, s_p = _factors(layer, self.policy_name)
            a_r, b_r, s_r = _factors(layer, self.ref_name)
            wp, wr = math.sqrt(alpha * s_p), math.sqrt((1.0 - alpha) * s_r)
            b = torch.cat([b_p * wp, b_r * wr], dim=1)
            a = torch.cat([a_p * wp, a_r * wr], dim=0)
            if self.max_rank is not None and a.shape[0] > self.max_rank:
                b64, a64, err = _truncate(b, a, self.max_rank)
                b, a = b64.to(b.dtype), a64.to(a.dtype)
                self.max_truncation_error = max(self.max_truncation_error, err)
            new[name] = (a, b)
            rank = max(rank, a.shape[0])
        mixed_modules = [[(1.0 - alpha) * full_tensor(p_r) + alpha * full_tensor(p_p).to(p_r.dtype)
                          for p_r, p_p in zip(w.modules_to_save[self.ref_name].parameters(),
                                              w.modules_to_save[self.policy_name].parameters(), strict=True)]
                         for _, w in modules_to_save(self.policy)]
        return new, rank, mixed_modules

    @torch.no_grad()
    def mix(self, alpha: float) -> None:
        """ref <- alpha * policy + (1 - alpha) * ref, exactly (rank concatenation, optional max_rank)."""
        with zero3.full_parameters(self.adapter_modules(self.policy_name)), \
                zero3.full_parameters(self.adapter_modules(self.ref_name)):
            new, rank, mixed_modules = self._mixed(alpha)
        cfg = copy.deepcopy(self.policy.peft_config[self.policy_name])
        cfg.r, cfg.lora_alpha, cfg.use_rslora, cfg.rank_pattern, cfg.alpha_pattern = rank, rank, False, {}, {}
        self._create(cfg)
        with zero3.full_parameters(self.adapter_modules(self.ref_name), writable=True):
            for name, layer in lora_layers(self.policy):
                if name not in new:
                    continue
                a, b = new[name]
                ref_a, ref_b = layer.lora_A[self.ref_name].weight, layer.lora_B[self.ref_name].weight
                full_a, full_b = a.new_zeros(ref_a.shape), b.new_zeros(ref_b.shape)  # zero padding to the common rank
                full_a[: a.shape[0]] = a
                full_b[:, : b.shape[1]] = b
                _assign(ref_a, full_a)
                _assign(ref_b, full_b)
                layer.scaling[self.ref_name] = 1.0
            for (_, w), values in zip(modules_to_save(self.policy), mixed_modules, strict=True):
                for p_r, v in zip(w.modules_to_save[self.ref_name].parameters(), values, strict=True):
                    _assign(p_r, v)
        self.rank = rank

    @property
    def bytes(self) -> int:
        """This rank's bytes of the reference adapter (its shards when sharded)."""
        return local_bytes(p for n, p in self.policy.named_parameters() if f".{self.ref_name}." in n)


__all__ = ["LoraReference", "check_lora_supported"]
