"""Reference strategies behind one interface (:class:`Reference`), :func:`auto` to choose one, and
:func:`resolve` to turn any ``reference=`` argument (a strategy, a config, a path, a URL) into one.

``Remote`` (the reference service client) is imported lazily from ``.remote``; nothing here imports
peft, fastapi or httpx at import time.
"""

from .adapter import AdapterDisabled
from .auto import auto
from .base import Reference
from .config import ReferenceConfig
from .free import ReferenceFree
from .frozen import Frozen
from .precomputed import Precomputed
from .resolve import resolve
from .synced import Synced


def __getattr__(name: str):
    if name in ("Remote", "choose_placement"):
        from . import remote

        return getattr(remote, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AdapterDisabled", "Frozen", "Precomputed", "Reference", "ReferenceConfig", "ReferenceFree",
           "Remote", "Synced", "auto", "choose_placement", "resolve"]
