"""Lazy imports of optional extras with an error that names the extra to install.

Some extras announce at import time what this machine lacks: torchao logs ``Failed to load ...
_C_mxfp8`` and ``Detected no triton`` on CPU-only machines, torch's pytree logs deprecations for
torchao's enums, bitsandbytes logs missing CPU kernels. transformers imports torchao (when installed)
as soon as its modeling code is imported, so these lines would appear on every model load, even with
no quantization in sight. :func:`quiet_imports` raises those loggers to ERROR while such an import
runs; warnings they log later, at run time, still show.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from types import ModuleType

from .errors import MissingDependency

# Loggers that only report missing optional kernels / deprecations of third-party code at import.
IMPORT_NOISE_LOGGERS = ("torchao", "bitsandbytes", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """Inside the block, :data:`IMPORT_NOISE_LOGGERS` log ERROR and above only (levels restored after)."""
    loggers = [logging.getLogger(name) for name in IMPORT_NOISE_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.ERROR))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def import_quietly(module: str) -> ModuleType:
    """``importlib.import_module(module)`` under :func:`quiet_imports`."""
    with quiet_imports():
        return importlib.import_module(module)


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependency` naming ``pip install 'refmodel[extra]'``."""
    try:
        return import_quietly(module)
    except ImportError as exc:
        raise MissingDependency(
            f"this feature needs the optional package {module!r}, which is not installed: "
            f"pip install 'refmodel[{extra}]'"
        ) from exc


def available(module: str) -> bool:
    """True when ``module`` can be imported (used to pick optional fast paths)."""
    try:
        import_quietly(module)
    except ImportError:
        return False
    return True
