"""The allow-list of reference models and the one safe way to load them.

A :class:`ModelRegistry` maps names to local folders; :func:`load_reference_model` reads only local
safetensors weights with ``trust_remote_code=False`` and no network, optionally quantized.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, ModelNotAllowed
from .quantize import BNB_MODES, check_mode, quantize_model


class ModelRegistry:
    """The allow-list of reference models: ``name -> local directory`` (safetensors weights)."""

    def __init__(self, models: Mapping[str, str | Path] | None = None):
        self._models: dict[str, Path] = {}
        self._lock = threading.Lock()
        for name, path in (models or {}).items():
            self.add(name, path)

    @classmethod
    def from_pairs(cls, pairs: Iterable[str]) -> ModelRegistry:
        """Build from ``["name=path", ...]`` (CLI / environment style)."""
        models = {}
        for pair in pairs:
            name, sep, path = pair.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ConfigError(f"model entry {pair!r} must look like NAME=PATH")
            models[name.strip()] = path.strip()
        return cls(models)

    def add(self, name: str, path: str | Path) -> None:
        """Allow ``name``, served from the local directory ``path``."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"model names must be non-empty strings, got {name!r}")
        with self._lock:
            self._models[name] = Path(path).expanduser()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def resolve(self, name: str) -> Path:
        """The path of ``name``; :class:`ModelNotAllowed` listing the known names otherwise."""
        with self._lock:
            path = self._models.get(name) if isinstance(name, str) else None
        if path is None:
            raise ModelNotAllowed(f"model {name!r} is not in the registry; known models: {self.names()}. "
                                  "Models are loaded only by registered name, never by path or hub id.")
        return path

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._models


def as_registry(registry) -> ModelRegistry:
    if registry is None:
        return ModelRegistry()
    if isinstance(registry, ModelRegistry):
        return registry
    if isinstance(registry, Mapping):
        return ModelRegistry(registry)
    if callable(getattr(registry, "resolve", None)) and callable(getattr(registry, "names", None)):
        return registry  # duck-typed registry
    raise ConfigError(f"registry must be a ModelRegistry or a {{name: path}} dict, got {type(registry).__name__}")


def _resolve_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"unknown dtype {dtype!r}; expected e.g. 'float32', 'bfloat16', 'float16'")
    return value


def load_reference_model(path: str | Path, dtype=None, device: str | torch.device = "cpu",
                         quantize: str | None = None) -> nn.Module:
    """Load a frozen causal LM from a local directory: safetensors only, no remote code, no network.

    Args:
        path: directory with ``config.json`` and ``*.safetensors`` weights.
        dtype: ``torch.dtype`` or name; ``None`` keeps the stored dtype.
        device: where the model lives.
        quantize: ``None`` or a mode of :data:`refmodel.models.quantize.QUANT_MODES`. bitsandbytes modes
            quantize while loading (``load_in_8bit`` / ``load_in_4bit``), torchao modes right after.
    Returns:
        the model in eval mode with ``requires_grad`` off on every parameter.
    """
    check_mode(quantize)
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ConfigError(f"reference model path {str(path)!r} is not a directory with a config.json")
    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"no *.safetensors weights in {str(path)!r}; refmodel never loads pickled "
                          "(.bin/.pt) weights. Convert them with save_pretrained(safe_serialization=True).")
    # transformers 5.23's from_pretrained is not thread-safe: two concurrent loads of tied-embedding
    # models (GPT-2, Gemma-2) left lm_head "MISSING ... newly initialized" (random!) in our runs, and
    # the lazy `transformers` module raised ImportError on a concurrent first import. So the
    # from_pretrained step runs under a process-wide lock; quantization and the rest run in parallel.
    with _FROM_PRETRAINED_LOCK:
        model = _from_pretrained(path, dtype, device, quantize)
    if quantize is not None and quantize not in BNB_MODES:
        quantize_model(model, quantize)
    model.eval()
    model.requires_grad_(False)
    return model


_FROM_PRETRAINED_LOCK = threading.Lock()


def _from_pretrained(path: Path, dtype, device, quantize: str | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs = dict(use_safetensors=True, trust_remote_code=False, local_files_only=True)
    torch_dtype = _resolve_dtype(dtype)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if quantize in BNB_MODES:
        from transformers import BitsAndBytesConfig

        compute = torch_dtype or torch.float32
        qconfig = (BitsAndBytesConfig(load_in_8bit=True) if quantize == "bnb-int8" else
                   BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute))
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=qconfig, device_map=str(device),
                                                    **kwargs)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device)
