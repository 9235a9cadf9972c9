"""Helpers for PEFT policies, public because ``reference``, ``rl`` and ``integrations`` share them; by duck
typing, so that ``refmodel.reference`` never imports peft itself."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..models.fingerprint import digest_in_order, finish_fingerprint
from ..models.sharding import full_tensors
from .base import eval_mode, restore_requires_grad


def is_peft_model(model) -> bool:
    """True for a ``peft.PeftModel`` (it has adapter configs and ``disable_adapter()``)."""
    return hasattr(model, "peft_config") and callable(getattr(model, "disable_adapter", None)) \
        and isinstance(getattr(model, "peft_config", None), dict)


def require_peft_model(model, who: str) -> None:
    """Refuse a model without PEFT adapters, saying which strategy to use instead."""
    if not is_peft_model(model) or not model.peft_config:
        raise ConfigError(
            f"{who} needs a PEFT model (peft.PeftModel) with at least one adapter, got "
            f"{type(model).__name__} without adapters; for a fully fine-tuned policy use "
            "Frozen.from_policy(policy) (a frozen copy) or Synced(policy) (TR-DPO)")


def _is_adapter_param(name: str, adapter_names) -> bool:
    parts = name.split(".")
    return any(p == "modules_to_save" or (p.startswith("lora_") and i + 1 < len(parts)
                                            and parts[i + 1] in adapter_names)
               for i, p in enumerate(parts))


def require_shared_base_frozen(model, who: str) -> None:
    """Refuse a PEFT policy that trains base weights: a reference that shares them would move with them."""
    names = set(model.peft_config)
    trained = [n for n, p in model.named_parameters() if p.requires_grad and not _is_adapter_param(n, names)]
    if trained:
        raise ConfigError(
            f"{who} shares the base weights with the policy, but the policy trains base parameters "
            f"({', '.join(trained[:3])}{', ...' if len(trained) > 3 else ''}), so the reference would move with "
            "them; freeze them (LoraConfig(bias='none')), or use a frozen copy: "
            "Frozen(copy.deepcopy(policy).merge_and_unload())")


_CANONICAL = [(re.compile(r"\.base_layer(?=\.|$)"), ""), (re.compile(r"\.original_module(?=\.|$)"), "")]


def reference_fingerprint(model, adapter_name: str | None = None, **settings) -> str:
    """Fingerprint of the PEFT model's base as if loaded alone (adapters left out, PEFT's ``base_layer`` /
    ``original_module`` names made plain), plus the weights and LoRA scalings of ``adapter_name`` if given
    (under ``<ref>`` names, so a reference adapter's fingerprint does not depend on its name).

    A sharded policy (FSDP2, ZeRO-3) gives the plain model's fingerprint: its tensors are gathered one at a
    time in name order (:func:`refmodel.models.sharding.full_tensors`; a collective: call on every rank).
    """
    names = set(model.peft_config)
    causal = model.get_base_model()
    stored: dict[str, str] = {}  # fingerprint name -> state-dict name
    for name in causal.state_dict():
        parts = name.split(".")
        if adapter_name is not None and adapter_name in parts and \
                ("modules_to_save" in parts or any(p.startswith("lora_") for p in parts)):
            stored[name.replace(f".{adapter_name}.", ".<ref>.")] = name
            continue
        if _is_adapter_param(name, names) or ".lora_magnitude_vector." in f".{name}.":
            continue
        plain = name
        for pattern, repl in _CANONICAL:
            plain = pattern.sub(repl, plain)
        stored[plain] = name
    scalings: dict[str, torch.Tensor] = {}
    if adapter_name is not None:
        for mname, module in causal.named_modules():
            scaling = getattr(module, "scaling", None)
            if isinstance(scaling, dict) and adapter_name in scaling:
                scalings[f"{mname}.<ref>.scaling"] = torch.tensor(float(scaling[adapter_name]))
    order = sorted(stored.keys() | scalings.keys())
    gathered = full_tensors(causal, [stored[n] for n in order if n in stored])

    def items() -> Iterator[tuple[str, torch.Tensor]]:
        for name in order:
            yield name, scalings[name] if name in scalings else next(gathered)[1]

    return finish_fingerprint(digest_in_order(items()), **settings)


@contextlib.contextmanager
def reference_view(model, adapter_name: str | None) -> Iterator[None]:
    """Run ``model`` as the reference: eval mode, and adapters off or ``adapter_name`` active.

    Restores the active adapter, every module's train/eval flag and every ``requires_grad``.
    """
    with eval_mode(model), restore_requires_grad(model):
        if adapter_name is None:
            with model.disable_adapter():
                yield
            return
        previous = model.active_adapter
        model.set_adapter(adapter_name)
        try:
            yield
        finally:
            model.set_adapter(previous)


def lora_layers(model) -> list[tuple[str, Any]]:  # PEFT layers: adapters are dynamic attributes
    """``(name, layer)`` of every LoRA layer (modules holding ``lora_A`` / ``lora_B`` dicts)."""
    return [(n, m) for n, m in model.get_base_model().named_modules()
            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and hasattr(m, "scaling")]


def modules_to_save(model) -> list[tuple[str, Any]]:
    """``(name, wrapper)`` of every PEFT ``ModulesToSaveWrapper`` (fully trained copies, e.g. a head)."""
    return [(n, m) for n, m in model.get_base_model().named_modules()
            if isinstance(getattr(m, "modules_to_save", None), nn.ModuleDict) and hasattr(m, "original_module")]


__all__ = ["is_peft_model", "require_peft_model", "require_shared_base_frozen", "reference_fingerprint",
           "reference_view", "lora_layers", "modules_to_save"]
