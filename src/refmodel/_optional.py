"""Lazy imports of optional extras with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependency


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependency` naming ``pip install 'refmodel[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(
            f"this feature needs the optional package {module!r}, which is not installed: "
            f"pip install 'refmodel[{extra}]'"
        ) from exc


def available(module: str) -> bool:
    """True when ``module`` can be imported (used to pick optional fast paths)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
