"""``refmodel.kl``: the public namespace of :mod:`refmodel.losses.kl` (KL estimators, exact KL, the
monitor and the controllers), so that ``from refmodel.kl import KLMonitor`` works as the docs write it."""

from .losses.kl import *  # noqa: F403  (the namespace is exactly that module's __all__)
from .losses.kl import __all__ as _all

__all__ = list(_all)
