"""The one dtype parser: a name, an alias or a ``torch.dtype`` -> ``torch.dtype``.

Used for model load / compute dtypes (:func:`refmodel.models.loading.load_model`, ``Frozen``) and for
store storage dtypes (:func:`refmodel.store.format.normalize_dtype`), so ``"bf16"`` means the same
everywhere and every refusal lists the same spellings.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

# The one list of dtype names (as ``str(torch.float32)`` without the prefix) refmodel computes in and stores:
# a model's load dtype (precompute's ``model_dtype``, ``--model-dtype``), a store's value dtype (``--dtype``).
DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")
# Every name parse_dtype accepts: float64 too (naive oracles, tests), never stored.
FLOAT_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in (*DTYPE_NAMES, "float64")}
# The safetensors code of each name (the store's shards are safetensors files).
SAFETENSORS_CODES: dict[str, str] = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
# The aliases users type.
ALIASES = {"fp32": "float32", "f32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
           "f16": "float16", "half": "float16", "fp64": "float64", "f64": "float64", "double": "float64"}


def parse_dtype(dtype: str | torch.dtype | None, *, allowed: tuple[str, ...] | None = None,
                what: str = "dtype") -> torch.dtype | None:
    """``torch.dtype`` for ``dtype`` (``None`` stays ``None``), e.g. ``"bf16"`` -> ``torch.bfloat16``.

    Args:
        dtype: a ``torch.dtype``, a canonical name (``"float32"``), ``"torch.float32"`` or an alias
            (``"fp32"``, ``"bf16"``, ``"half"``, ...).
        allowed: canonical names accepted here (default: every floating dtype in :data:`FLOAT_DTYPES`).
        what: how the error message names the value (``"storage dtype"``, ``"--dtype"``).
    Raises:
        ConfigError: listing the accepted names, for anything else.
    """
    if dtype is None:
        return None
    allowed = tuple(FLOAT_DTYPES) if allowed is None else allowed
    name = str(dtype).removeprefix("torch.").lower() if isinstance(dtype, (str, torch.dtype)) else None
    name = ALIASES.get(name, name) if name is not None else None
    if name not in allowed:
        aliases = sorted(a for a, n in ALIASES.items() if n in allowed)
        raise ConfigError(f"{what} {dtype!r} is not supported; expected one of {list(allowed)} "
                          f"(aliases {aliases}) or the matching torch.dtype")
    return FLOAT_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``"float32"`` for ``torch.float32`` (the canonical name :func:`parse_dtype` accepts)."""
    return str(dtype).removeprefix("torch.")


__all__ = ["ALIASES", "DTYPE_NAMES", "FLOAT_DTYPES", "SAFETENSORS_CODES", "dtype_name", "parse_dtype"]
