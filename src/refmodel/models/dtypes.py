"""The one dtype parser: a name, an alias or a ``torch.dtype`` -> ``torch.dtype``.

Used for model load / compute dtypes (:func:`refmodel.models.loading.load_model`, ``Frozen``) and for
store storage dtypes (:func:`refmodel.store.format.normalize_dtype`), so ``"bf16"`` means the same
everywhere and every refusal lists the same spellings.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

# Canonical names (as ``str(torch.float32)`` without the prefix) and the aliases users type.
FLOAT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                        "float16": torch.float16, "float64": torch.float64}
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


__all__ = ["ALIASES", "FLOAT_DTYPES", "dtype_name", "parse_dtype"]
