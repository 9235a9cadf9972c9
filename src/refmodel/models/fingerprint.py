"""Fingerprints: a stable hash that identifies a reference model and every setting that changes its log-probs.

``fingerprint(model, temperature=1.0, quantization="int8")`` hashes each tensor of the state dict in
name order (name, dtype, shape, bytes) plus the settings as canonical JSON. Two models with the
same fingerprint give the same log-probs; stored and served log-probs are bound to it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .sharding import full_tensors

FINGERPRINT_PREFIX = "rm1-"

# Each log-prob setting at its default is left out of the hash, so the plain fingerprint names the model at
# default settings: a store written with ``refmodel.fingerprint(model)`` is the one ``Frozen(model)``, the
# service and precompute at temperature 1.0 all name. Settings without an entry here are left out when None.
SETTING_DEFAULTS: dict[str, object] = {"temperature": 1.0, "quantization": None}


def fingerprint_settings(**settings) -> dict:
    """The one identity rule for settings: ``settings`` as they enter the hash (canonical JSON).

    ``None`` and default values (:data:`SETTING_DEFAULTS`, e.g. ``temperature=1.0``) are dropped and the
    temperature is a float, so ``temperature=2`` and ``temperature=2.0`` name the same log-probs, and
    ``fingerprint(m, temperature=1.0) == fingerprint(m)``. Every path that fingerprints (the reference
    strategies, precompute, the service) goes through :func:`finish_fingerprint`, which applies it.
    """
    out = {}
    for name, value in settings.items():
        if name == "temperature" and value is not None:
            value = float(value)
        if value is None or (name in SETTING_DEFAULTS and value == SETTING_DEFAULTS[name]):
            continue
        out[name] = value
    return out


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach()
    if type(t) is not torch.Tensor and hasattr(t, "dequantize"):  # quantized tensor subclasses
        t = t.dequantize()
    t = t.to("cpu").contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    elif t.dtype == torch.bool:
        t = t.to(torch.uint8)
    try:
        return t.numpy().tobytes()
    except (TypeError, RuntimeError):  # exotic dtypes (fp8, ...): reinterpret as raw bytes
        return t.view(torch.uint8).numpy().tobytes()


def weights_digest(tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor]):
    """The running blake2b digest over named tensors (in name order), before any setting is added.

    Hashing the weights is the expensive part; a server keeps this digest and finishes it once per
    setting (e.g. each requested temperature) with :func:`finish_fingerprint`.
    """
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    return digest_in_order(sorted(items, key=lambda kv: kv[0]))


def digest_in_order(tensors: Iterable[tuple[str, torch.Tensor]]):
    """:func:`weights_digest` of named tensors that come already in name order, consumed one at a time (so a
    sharded model's tensors can be gathered, hashed and dropped one by one)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in tensors:
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_tensor_bytes(tensor))
    return digest


def finish_fingerprint(digest, **settings) -> str:
    """The fingerprint of a :func:`weights_digest` plus ``settings`` (``digest`` itself is not changed).

    ``settings`` go through :func:`fingerprint_settings` (defaults and None left out).
    """
    digest = digest.copy()
    canonical = json.dumps(fingerprint_settings(**settings), sort_keys=True, default=str)
    digest.update(b"settings|" + canonical.encode())
    return FINGERPRINT_PREFIX + digest.hexdigest()


def fingerprint_tensors(tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
                        **settings) -> str:
    """Fingerprint of named tensors (hashed in name order) and ``settings`` (JSON-serialisable)."""
    return finish_fingerprint(weights_digest(tensors), **settings)


def fingerprint(model: nn.Module, **settings) -> str:
    """Fingerprint of ``model``'s weights (state dict) and the log-prob settings.

    Pass every setting that changes log-probs and is not in the weights, e.g. ``temperature``,
    ``quantization``; ``None`` and default values are left out (:func:`fingerprint_settings`), so
    ``fingerprint(m)`` == ``fingerprint(m, temperature=1.0, quantization=None)``.

    A sharded model (FSDP2, DeepSpeed ZeRO-3) or a DDP wrapper has the fingerprint of the plain model: its
    full tensors are gathered one at a time in name order (:func:`refmodel.models.sharding.full_tensors`), so
    this is a collective then: call it on every rank.
    """
    return finish_fingerprint(digest_in_order(full_tensors(model)), **settings)


__all__ = ["digest_in_order", "fingerprint", "fingerprint_settings", "fingerprint_tensors", "finish_fingerprint", "weights_digest",
           "FINGERPRINT_PREFIX", "SETTING_DEFAULTS"]
