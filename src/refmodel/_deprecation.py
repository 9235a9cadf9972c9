"""Old names kept for one release: module attributes and keyword arguments that moved or were renamed.

Each use warns once per call site with a ``FutureWarning`` (shown by default, unlike ``DeprecationWarning``)
that names the new path, so users' code keeps running while it tells them what to change.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

REMOVED_IN = "0.3"


def warn_deprecated(old: str, new: str, *, stacklevel: int = 3) -> None:
    """The one deprecation warning: ``old`` goes in :data:`REMOVED_IN`; ``new`` says what to use instead."""
    warnings.warn(f"{old} is deprecated and goes in refmodel {REMOVED_IN}; use {new}", FutureWarning,
                  stacklevel=stacklevel)


def moved_attribute(module: str, name: str, aliases: dict[str, str]) -> Any:
    """The object an old ``module.name`` stood for, with a warning; ``aliases`` maps an old name to the
    dotted path of its new home (``"refmodel.losses.policy_loss"``). AttributeError for any other name."""
    if name not in aliases:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new = aliases[name]
    warn_deprecated(f"{module}.{name}", new, stacklevel=4)
    owner, _, attr = new.rpartition(".")
    return getattr(importlib.import_module(owner), attr)


def renamed_keywords(**renames: str) -> Callable[[F], F]:
    """Accept each old keyword (``old="new"``) for one release: it is passed on as the new one, with a
    warning; giving both is a TypeError naming them."""

    def wrap(fn: F) -> F:
        params = inspect.signature(fn).parameters
        missing = [new for new in renames.values() if new not in params]
        assert not missing, f"{fn.__qualname__} has no parameter {missing}"  # internal invariant

        @functools.wraps(fn)
        def call(*args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__qualname__}() got both {old!r} (deprecated) and {new!r}; "
                                        f"pass only {new!r}")
                    warn_deprecated(f"{fn.__qualname__}({old}=...)", f"{new}=...")
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return call  # type: ignore[return-value]

    return wrap


def renamed_fields(**renames: str) -> Callable[[type], type]:
    """Class decorator: each old attribute name (``old="new"``) reads the new field, with a warning."""

    def wrap(cls: type) -> type:
        for old, new in renames.items():
            def read(self, old=old, new=new):
                warn_deprecated(f"{type(self).__name__}.{old}", f".{new}")
                return getattr(self, new)

            setattr(cls, old, property(read, doc=f"Deprecated: ``{new}``."))
        return cls

    return wrap
