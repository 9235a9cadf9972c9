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
import shlex
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from .errors import MissingDependency

# Loggers that only report missing optional kernels / deprecations of third-party code at import.
# "DeepSpeed": transformers imports it (when installed) with its modeling code, and it prints "Setting
# accelerator to CPU" to stdout, ahead of a command's own output.
IMPORT_NOISE_LOGGERS = ("torchao", "bitsandbytes", "torch.utils._pytree", "DeepSpeed")


def below_error(record: logging.LogRecord) -> bool:
    """A logger filter that keeps ERROR and above: for loggers whose library resets their level when it
    is imported (DeepSpeed's ``create_logger``), so that a level set beforehand does not hold."""
    return record.levelno >= logging.ERROR


def hide_import_noise(hide: bool = True) -> None:
    """Keep :data:`IMPORT_NOISE_LOGGERS` at ERROR for the rest of the process (``hide=False``: let them
    through again, as the CLI's ``-vv`` does); what the CLI and the benchmarks set before their work."""
    for name in IMPORT_NOISE_LOGGERS:
        noisy = logging.getLogger(name)
        noisy.setLevel(logging.ERROR if hide else logging.NOTSET)
        if hide:
            noisy.addFilter(below_error)  # holds where the library resets the level on import
        else:
            noisy.removeFilter(below_error)


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


def install_command(extra: str) -> str:
    """The pip command that adds ``extra`` to this install of refmodel.

    refmodel is not on a package index, so ``pip install 'refmodel[extra]'`` cannot work: it is installed
    from its source folder. When this package runs from one (``src/refmodel`` next to ``pyproject.toml``,
    as ``pip install -e .`` leaves it) the command names that folder, so it can be pasted as is; otherwise
    (installed non-editable) it names the folder as a placeholder.
    """
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file():
        return f"pip install -e {shlex.quote(f'{root}[{extra}]')}"
    return f"pip install -e '/path/to/refmodel-source[{extra}]' (the folder you cloned refmodel into)"


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependency` naming the extra and :func:`install_command`."""
    try:
        return import_quietly(module)
    except ImportError as exc:
        raise MissingDependency(
            f"this feature needs the optional package {module!r}, which is not installed; it comes with "
            f"refmodel's {extra!r} extra: {install_command(extra)}"
        ) from exc


def available(module: str) -> bool:
    """True when ``module`` can be imported (used to pick optional fast paths)."""
    try:
        import_quietly(module)
    except ImportError:
        return False
    return True
