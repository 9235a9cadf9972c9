"""``resolve(reference, policy, *, temperature)``: the one rule that turns a ``reference=`` argument into a
:class:`~refmodel.reference.Reference`.

The TRL trainers (``refmodel.integrations.trl``), the DPO loop (``refmodel.recipes.train``) and the GRPO
loop (``refmodel.recipes.grpo``) all take ``reference=`` and call this; so they accept the same inputs and
check the temperature the same way. Accepted, first match wins:

========================================  =====================================================================
``reference``                              result
========================================  =====================================================================
a Reference (``Frozen``, ``Synced``, ...)  itself (anything with a callable ``logprobs``)
``None``                                   :func:`~refmodel.reference.auto` on ``ReferenceConfig()``: the
                                           adapter-off base for a PEFT policy, else a frozen copy
a :class:`~refmodel.ReferenceConfig`       :func:`~refmodel.reference.auto` on it (its ``temperature`` is taken
                                           from the caller when left at 1.0)
``"none"``                                 :class:`ReferenceFree` (ORPO, SimPO: no pi_ref)
``"adapter"``                              :class:`AdapterDisabled` (a PEFT policy's base, adapters off)
``"http://..."`` / ``"https://..."``       ``Remote``: the service's one log-prob model; its token is the
                                           ``REFMODEL_TOKEN`` environment variable (or pass ``Remote(url,
                                           model, token=...)`` / ``ReferenceConfig(remote_url=, remote_token=)``)
a folder with ``manifest.json``            :class:`Precomputed` on that log-prob store (a miss raises)
a folder with ``config.json``              :class:`Frozen` loaded from that model folder
a ``torch.nn.Module`` (not the policy)     :class:`Frozen` on it (frozen in place)
========================================  =====================================================================

Every result that knows its temperature (``Frozen``, ``AdapterDisabled``, ``Synced``, ``Remote``, a
``Precomputed`` fallback) must compute log-probs at ``temperature``, the caller's sampling temperature;
one built for another temperature is refused with a :class:`~refmodel.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from ..errors import ConfigError
from .adapter import AdapterDisabled
from .auto import auto
from .base import Reference
from .config import ReferenceConfig
from .free import ReferenceFree
from .frozen import Frozen
from .peft_policy import is_peft_model
from .precomputed import Precomputed

KEYWORDS: tuple[str, ...] = ("none", "adapter")
STORE_MARKER, MODEL_MARKER = "manifest.json", "config.json"


def is_reference(obj) -> bool:
    """True for anything that answers ``logprobs(input_ids, attention_mask, score_mask)`` (duck-typed)."""
    return not isinstance(obj, (str, Path, ReferenceConfig)) and callable(getattr(obj, "logprobs", None))


def reference_temperature(reference) -> float | None:
    """The temperature ``reference`` computes log-probs at, when it says (a ``Precomputed`` through its
    fallback); ``None`` when it does not know (a store without fallback, ``ReferenceFree``)."""
    value = getattr(reference, "temperature", None)
    if value is None and isinstance(reference, Precomputed) and reference.fallback is not None:
        value = getattr(reference.fallback, "temperature", None)
    return None if value is None else float(value)


def _config_at(cfg: ReferenceConfig, policy, temperature: float, who: str) -> ReferenceConfig:
    """``cfg`` at the caller's temperature, with TRL's pretrained-adapter rule for PEFT policies."""
    if cfg.temperature != temperature:
        if cfg.temperature != 1.0:
            raise ConfigError(f"{who}: ReferenceConfig(temperature={cfg.temperature}) but the policy samples at "
                              f"temperature={temperature}; the reference must be evaluated at the sampling "
                              "temperature. Drop temperature from the ReferenceConfig (it is taken from the "
                              "trainer's config) or make them equal")
        cfg = dataclasses.replace(cfg, temperature=temperature)
    if is_peft_model(policy) and cfg.ref_adapter_name is None and not cfg.sync_ref_model \
            and "ref" in policy.peft_config and not cfg.ref_model_path and not cfg.remote_url:
        # TRL copies a pretrained adapter to "ref" and uses it as the reference (model_adapter_name /
        # ref_adapter_name); a policy that carries one gets it here too.
        cfg = dataclasses.replace(cfg, ref_adapter_name="ref")
    return cfg


def _from_text(text: str, policy, temperature: float, who: str) -> Reference:
    if text.lower() == "none":
        return ReferenceFree()
    if text.lower() == "adapter":
        return AdapterDisabled(policy, temperature=temperature)
    if text.startswith(("http://", "https://")):
        from .remote import Remote

        return Remote(text, temperature=temperature)
    path = Path(text)
    if (path / STORE_MARKER).is_file():
        from ..store import LogprobStore

        return Precomputed(LogprobStore.open(path))
    if (path / MODEL_MARKER).is_file():  # sharded like an FSDP2 policy: each rank keeps its shards
        return Frozen(path, temperature=temperature, shard_like=policy)
    found = f"a folder without {STORE_MARKER} or {MODEL_MARKER}" if path.is_dir() else "no such folder"
    raise ConfigError(f"{who}: reference={text!r} is neither a log-prob store folder (with {STORE_MARKER}; make "
                      f"one with `refmodel precompute`) nor a model folder (with {MODEL_MARKER}), a service URL "
                      f"(http://HOST:PORT) or one of {list(KEYWORDS)}; found {found}")


def resolve(reference, policy, *, temperature: float = 1.0, who: str = "reference") -> Reference:
    """The :class:`Reference` that ``reference`` names, for ``policy`` sampling at ``temperature``.

    Args:
        reference: see the module table (a Reference, ``None``, a ``ReferenceConfig``, ``"none"``,
            ``"adapter"``, a URL, a store or model folder (``str`` or ``Path``), or a module).
        policy: the (unwrapped) policy being trained; ``auto`` and ``AdapterDisabled`` build on it.
        temperature: the sampling temperature (logits are divided by it) the reference log-probs must
            be computed at; 1.0 for DPO-family losses.
        who: how error messages name the caller (e.g. ``"DPOTrainer"``).
    Raises:
        ConfigError: an input of another kind, a path that is no store or model, the policy itself as
            its own reference, or a reference built for another temperature.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ConfigError(f"{who}: temperature must be a number > 0, got {temperature!r}")
    ref: Reference
    if reference is None:
        ref = auto(policy, _config_at(ReferenceConfig(temperature=temperature), policy, temperature, who))
    elif isinstance(reference, ReferenceConfig):
        ref = auto(policy, _config_at(reference, policy, temperature, who))
    elif isinstance(reference, (str, Path)):
        ref = _from_text(str(reference), policy, temperature, who)
    elif is_reference(reference):
        ref = reference
    elif isinstance(reference, nn.Module):
        if reference is policy:
            raise ConfigError(f"{who}: reference= is the policy itself, so it would move with every step; pass a "
                              "separate model, or None for a frozen copy (AdapterDisabled for a PEFT policy)")
        ref = Frozen(reference, temperature=temperature)
    else:
        raise ConfigError(f"{who}: reference= takes a refmodel Reference (Frozen, AdapterDisabled, Synced, "
                          "Precomputed, Remote), None, a ReferenceConfig, a log-prob store or model folder, a "
                          f"service URL, a model, or one of {list(KEYWORDS)}; got {type(reference).__name__}")
    ref_temperature = reference_temperature(ref)
    if ref_temperature is not None and ref_temperature != float(temperature):
        raise ConfigError(f"{who}: the reference computes log-probs at temperature {ref_temperature}, but the "
                          f"policy samples at temperature={temperature}; build it with temperature={temperature} "
                          "(e.g. Frozen(model, temperature=...), Remote(url, model, temperature=...))")
    return ref


__all__ = ["KEYWORDS", "is_reference", "reference_temperature", "resolve"]
