"""The one set of value rules shared by every entry point (arguments, configs, the wire format, the service).

Each rule takes the value, the name to put in the message, and ``error``: the exception class (or any
callable ``message -> exception``) the caller raises, so a config raises :class:`~refmodel.errors.ConfigError`,
a batch :class:`~refmodel.errors.InvalidBatch` and the service its field error, all with the same rule and the
same message.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

from .errors import InvalidInput

ErrorFactory = Callable[[str], Exception]

# The log-prob math runs in float32 (the kernel's tiles, bf16/fp16 upcast): 1 / temperature must be a float32
# number, else ``logits / temperature`` is inf and the log-softmax NaN (1e-300 gave a 500 in the service).
_FLOAT32_MAX = 3.4028234663852886e38


def is_real(value) -> bool:
    """True for a real number (int, float, numpy scalar); False for ``bool``, strings, tensors, None."""
    # numbers.Real admits numpy scalars (np.float32 is no float subclass); a bool is a flag, never a setting.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive_finite(value, name: str, *, error: ErrorFactory = InvalidInput, hint: str = "",
                    above: float = 0.0) -> float:
    """``float(value)`` when it is a real number, finite and > ``above`` (default 0), else ``error(message)``.

    Args:
        value: the number to check (``bool`` and strings are refused, not coerced).
        name: how the message names it (``"temperature"``, ``"logit_scale"``).
        error: the exception class (or ``message -> exception`` callable) to raise.
        hint: a sentence appended to the message (what the value means, how to fix it).
        above: the exclusive lower bound (e.g. 1.0 for a ratio cap).
    """
    if not (is_real(value) and math.isfinite(value) and value > above):
        raise error(f"{name} must be a finite number > {above:g}, got {value!r}{'; ' + hint if hint else ''}")
    return float(value)


def temperature(value, name: str = "temperature", *, error: ErrorFactory = InvalidInput) -> float:
    """The one temperature rule: a real number, finite, > 0, whose reciprocal is a finite float32; returns float.

    Log-probs at temperature ``T`` are those of ``softmax(logits / T)`` (1.0: the model's own distribution).
    A ``T`` below ~3e-39 is refused: ``1 / T`` overflows float32, the precision the logits are scaled in.
    """
    value = positive_finite(value, name, error=error,
                            hint="the sampling temperature; 1.0 = the model's own distribution")
    if not 1.0 / value <= _FLOAT32_MAX:
        raise error(f"{name}={value!r} is too small: 1/{name} overflows float32 (the logits are divided by it); "
                    f"use a {name} >= {1.0 / _FLOAT32_MAX:.3g}")
    return value


__all__ = ["ErrorFactory", "is_real", "positive_finite", "temperature"]
