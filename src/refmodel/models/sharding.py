"""Which framework shards a model, and the four things refmodel needs from it, dispatched by kind.

``sharding_kind(module)`` is ``"none"``, ``"fsdp2"`` or ``"zero3"`` (DeepSpeed ZeRO-3, :mod:`.zero3`).
Minimal version (the zero3 branches only); merged with the FSDP2 branches by hand.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from . import zero3
from .quantize import model_nbytes


def sharding_kind(module: nn.Module) -> str:
    """``"zero3"`` when ``module`` holds DeepSpeed ZeRO-3 partitions, else ``"none"``."""
    if zero3.is_zero3(module):
        return "zero3"
    return "none"


@contextlib.contextmanager
def full_parameters(module: nn.Module, *, writable: bool = False) -> Iterator[None]:
    """Inside the block the parameters of ``module`` that the caller touches directly are full on every rank;
    ``writable=True`` keeps what is written to them (every rank writing the same)."""
    if sharding_kind(module) == "zero3":
        with zero3.full_parameters(module, writable=writable):
            yield
        return
    yield


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict with every tensor full (gathered where sharded)."""
    if sharding_kind(module) == "zero3":
        return zero3.full_state_dict(module)
    return module.state_dict()


def local_parameter_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers held on this rank."""
    if sharding_kind(module) == "zero3":
        return zero3.local_parameter_bytes(module)
    return model_nbytes(module)


__all__ = ["full_parameters", "full_state_dict", "local_parameter_bytes", "sharding_kind"]
