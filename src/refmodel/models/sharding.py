"""A sharded model seen whole: the one owner of "the full parameters of a sharded model".

Training frameworks keep each parameter in pieces, one per rank: FSDP2 (``torch.distributed.fsdp.fully_shard``)
as ``DTensor`` shards, DeepSpeed ZeRO-3 as flat partitions (``ds_id``, ``ds_status``). refmodel reads or writes
parameters directly in a few places (a frozen copy of the policy, a TR-DPO sync, fingerprints, memory
reports); each goes through this module, never behind the framework's back:

- :func:`sharding_kind` says which framework sharded a model (``"none"``, ``"fsdp2"``, ``"zero3"``) and
  refuses the layouts refmodel cannot see through (FSDP1, DTensors without ``fully_shard``);
- :func:`full_parameters`: a context in which the parameters are full tensors (no gradient: direct reads
  and writes; *running* a model goes through its own hooked forward, :func:`refmodel.logprobs.model.run_in_forward`,
  which gathers one layer at a time and works with gradients);
- :func:`full_state_dict` / :func:`full_tensors`: the plain model's state dict, the latter one tensor at a
  time (fingerprints of a 70B policy must not gather it whole; FSDP2 and ZeRO-3 alike);
- :func:`local_parameter_bytes`: the bytes a rank actually holds;
- :func:`local_like`, :func:`local_tensor`: values laid out like another model's shards (a sync from shards
  to shards); :func:`sharded_copy` (:func:`shard_like`): a frozen copy of an FSDP2 policy, sharded like it.

Every function that gathers is a collective: call it on every rank, in the same order. DeepSpeed is never
imported here; the ZeRO-3 branches dispatch to :mod:`refmodel.models.zero3`.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Iterable, Iterator
from typing import Any, Literal, cast

import torch
from torch import nn

from ..errors import ConfigError
from ..logprobs.model import run_in_forward
from . import zero3
from .quantize import tensors_nbytes

ShardingKind = Literal["none", "fsdp2", "zero3"]

_FSDP1_HELP = ("FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel) keeps flat parameters that refmodel "
               "cannot read; shard the policy with FSDP2 instead: torch.distributed.fsdp.fully_shard (accelerate: "
               "fsdp_version: 2), or use DeepSpeed ZeRO-3")


def _fsdp():
    """``torch.distributed.fsdp`` if it is loaded (nothing can be FSDP-sharded before it is)."""
    return sys.modules.get("torch.distributed.fsdp")


def _dtensor_type():
    tensor_mod = sys.modules.get("torch.distributed.tensor")
    return None if tensor_mod is None else tensor_mod.DTensor


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (without importing torch.distributed when unused)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def _unwrap_ddp(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def sharding_kind(module: nn.Module) -> ShardingKind:
    """``"zero3"`` (a parameter has ``ds_id``/``ds_status``), ``"fsdp2"`` (a submodule is ``fully_shard``-ed)
    or ``"none"`` (plain, or DDP-wrapped: every rank holds every weight).

    Raises:
        ConfigError: an FSDP1 wrapper, or DTensor parameters without ``fully_shard`` (tensor parallel).
    """
    if zero3.is_zero3(module):
        return "zero3"
    params = list(module.parameters())
    fsdp = _fsdp()
    if fsdp is not None:
        for m in module.modules():
            if isinstance(m, fsdp.FullyShardedDataParallel):
                raise ConfigError(f"{type(module).__name__} is wrapped in FSDP1: {_FSDP1_HELP}")
            if isinstance(m, fsdp.FSDPModule):
                return "fsdp2"
    if any(is_dtensor(p) for p in params):
        raise ConfigError(f"{type(module).__name__} has DTensor parameters but no fully_shard module (tensor "
                          "parallel?); refmodel supports plain, DDP, FSDP2 (fully_shard) and DeepSpeed ZeRO-3 models")
    return "none"


def _fsdp_modules(module: nn.Module) -> list[Any]:  # FSDPModule: unshard(), reshard()
    """Every ``fully_shard``-ed module in ``module``, outermost first (``modules()`` is pre-order)."""
    fsdp = _fsdp()
    return [m for m in module.modules() if fsdp is not None and isinstance(m, fsdp.FSDPModule)]


def _own_parameters(module: nn.Module) -> Iterator[torch.Tensor]:
    """The parameters one FSDP module manages: its subtree's, less those of nested FSDP modules."""
    fsdp = _fsdp()
    yield from module.parameters(recurse=False)
    for child in module.children():
        if fsdp is None or not isinstance(child, fsdp.FSDPModule):
            yield from _own_parameters(child)


def _is_sharded(module: nn.Module) -> bool:
    return any(is_dtensor(p) for p in _own_parameters(module))


@contextlib.contextmanager
def full_parameters(module: nn.Module, *, writable: bool = False) -> Iterator[nn.Module]:
    """Inside the block, every parameter of ``module`` is a full, unsharded tensor on each rank; on exit each
    is sharded again as it was. For direct reads (and, with ``writable=True``, writes: every rank writing the
    same values) under ``torch.no_grad()``; to *run* the model call it (or
    :func:`refmodel.logprobs.model.run_in_forward`), which gathers one layer at a time. A collective: enter it
    on every rank.

    FSDP2: the root is initialised first by a call through its hooked forward (torch makes the first module
    that runs the root; a nested layer run first would claim it), then every ``fully_shard``-ed module that
    holds shards is ``unshard()``-ed and ``reshard()``-ed on exit (which drops the gathered copies: with
    ``writable=True`` each rank's piece of them is first copied into its shards). Costs the full model per
    rank while open. ZeRO-3: :func:`refmodel.models.zero3.full_parameters`. Plain or DDP: nothing to do.
    """
    kind = sharding_kind(module)
    if kind == "zero3":
        with zero3.full_parameters(module, writable=writable):
            yield module
        return
    if kind == "none":
        yield module
        return
    modules = _fsdp_modules(module)
    sharded = [m for m in modules if _is_sharded(m)]
    shards = {name: p for name, p in module.named_parameters() if is_dtensor(p)} if writable else {}
    with torch.no_grad():
        run_in_forward([modules[0]], lambda: None)
    for m in sharded:
        m.unshard()
    try:
        yield module
        if shards:
            with torch.no_grad():
                gathered = dict(module.named_parameters())
                for name, shard in shards.items():
                    local_tensor(shard).copy_(local_like(gathered[name], shard))
    finally:
        for m in reversed(sharded):
            m.reshard()


def full_tensor(t: Any) -> torch.Tensor:  # DTensor methods (full_tensor, to_local, device_mesh) are untyped here
    """``t`` whole: an FSDP2 shard gathered (a collective: every rank in the same order), else ``t`` itself."""
    return t.full_tensor() if is_dtensor(t) else t


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain model: full tensors under the same keys (a DDP wrapper's ``module.``
    prefix left out). Holds the whole model on each rank: prefer :func:`full_tensors` to stream it."""
    if sharding_kind(module) == "zero3":
        return zero3.full_state_dict(module)
    return dict(full_tensors(module))


def full_tensors(module: nn.Module, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` of ``module``'s state dict in ``names``' order (default: sorted names), one
    gathered at a time and dropped by the caller before the next, so a rank never holds the whole model.
    FSDP2 shards are gathered (``DTensor.full_tensor()``, a collective: the same order on every rank);
    ZeRO-3 partitions likewise, one at a time (:func:`refmodel.models.zero3.full_tensors`)."""
    module = _unwrap_ddp(module)
    if sharding_kind(module) == "zero3":
        yield from zero3.full_tensors(module, names)
        return
    state = module.state_dict()
    for name in sorted(state) if names is None else names:
        yield name, full_tensor(state[name]).detach()


def local_parameter_bytes(module: nn.Module) -> int:
    """Bytes of parameters and buffers this rank holds for ``module``: its FSDP2 shards (``to_local()``) or
    ZeRO-3 partitions (``ds_tensor``), else the whole tensors; shared storage counted once."""
    return local_bytes(list(module.parameters()) + list(module.buffers()))


def local_bytes(tensors: Iterable[Any]) -> int:
    """:func:`local_parameter_bytes` of some tensors (e.g. one adapter's): what this rank holds of each (a
    ZeRO-3 partition's ``ds_tensor``, plus its full data where DeepSpeed keeps it persistent)."""
    held = []
    for t in tensors:
        if is_dtensor(t):
            held.append(t.to_local())
        elif getattr(t, "ds_tensor", None) is not None:
            held.append(t.ds_tensor)
            if t.data.numel():  # DeepSpeed keeps small parameters full too (stage3_param_persistence_threshold)
                held.append(t.data)
        else:
            held.append(t)
    return tensors_nbytes(held)


def local_like(src: Any, like: Any) -> torch.Tensor:
    """``src``'s values laid out like ``like``'s local tensor (what this rank holds of it), in its dtype.

    Shards of the same layout (mesh, placements, shape) are used as they are: no communication, the sync of
    a sharded reference from a policy sharded the same way. Otherwise ``src`` is gathered when sharded and,
    when ``like`` is sharded, this rank's piece is cut out of it (``distribute_tensor`` without a source rank:
    each rank holds the full value already).
    """
    if is_dtensor(like):
        if is_dtensor(src) and src.device_mesh == like.device_mesh and src.placements == like.placements \
                and src.shape == like.shape:
            return src.to_local().to(device=like.device, dtype=like.dtype)
        from torch.distributed.tensor import distribute_tensor

        full = full_tensor(src).detach().to(device=like.to_local().device, dtype=like.dtype)
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
    return full_tensor(src).detach().to(device=like.device, dtype=like.dtype)


def local_tensor(t: Any) -> torch.Tensor:
    """What this rank holds of ``t``: its FSDP2 shard, or ``t`` itself; writes to it change ``t``."""
    return t.to_local() if is_dtensor(t) else t


def shard_like(model: nn.Module, policy: nn.Module) -> nn.Module:
    """``fully_shard`` ``model`` the way ``policy`` is: the same modules (by name), on the same device mesh,
    innermost first. Every module, the root included, reshards after its forward: a reference has no
    backward to keep the root's gathered weights for, so it holds only its shards between calls."""
    from torch.distributed.fsdp import fully_shard

    named = [(name, m) for name, m in policy.named_modules() if m in set(_fsdp_modules(policy))]
    if not named:
        raise ConfigError(f"shard_like: {type(policy).__name__} has no fully_shard module to copy the layout of")
    mesh = next(cast(Any, p).device_mesh for p in policy.parameters() if is_dtensor(p))
    for name, _ in sorted(named, key=lambda nm: -nm[0].count(".") - (nm[0] != "")):
        fully_shard(model.get_submodule(name), mesh=mesh, reshard_after_forward=True)
    return model


def _plain_class(module: nn.Module) -> type:
    """The model's own class under FSDP2's ``FSDP<Name>`` subclass."""
    fsdp = _fsdp()
    return next(c for c in type(module).__mro__ if fsdp is None or not issubclass(c, fsdp.FSDPModule))


def sharded_copy(policy: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen copy of the FSDP2-sharded ``policy``, sharded the same way, built from its shards: the model
    is built from ``policy.config`` on the meta device (no weights), ``fully_shard``-ed like the policy
    (:func:`shard_like`), given empty shards on the policy's device, and each rank copies its own shards in
    (no communication, no full copy anywhere). Buffers (rotary tables) are copied from the policy.

    ``deepcopy`` cannot do this (FSDP modules refuse it), and a full copy would cost every rank the whole model.
    """
    if sharding_kind(policy) != "fsdp2":
        raise ConfigError(f"sharded_copy needs an FSDP2 (fully_shard) model, got {type(policy).__name__}")
    config = getattr(policy, "config", None)
    cls = _plain_class(policy)
    if config is None or not hasattr(cls, "_from_config"):
        raise ConfigError(f"a sharded copy is built from the model's config: {cls.__name__} is not a transformers "
                          "model; pass Frozen a model (or folder) of its own, sharded as you like")
    dtypes = {p.dtype for p in policy.parameters()}
    if dtype is None and len(dtypes) != 1:
        raise ConfigError(f"the policy's parameters have several dtypes {sorted(map(str, dtypes))}; pass dtype= "
                          "for the frozen copy")
    with torch.device("meta"):
        model = cls._from_config(copy.deepcopy(config))
    model.to(dtype or dtypes.pop())
    model.eval()
    model.requires_grad_(False)
    shard_like(model, policy)
    device = next(local_tensor(p).device for p in policy.parameters())
    model.to_empty(device=device)
    source = dict(policy.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            local_tensor(param).copy_(local_like(source[name], param))
        for name, buffer in policy.named_buffers():
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = buffer.detach().clone()
    return model


__all__ = ["ShardingKind", "full_parameters", "full_state_dict", "full_tensor", "full_tensors", "is_dtensor",
           "local_bytes", "local_like", "local_parameter_bytes", "local_tensor", "shard_like", "sharded_copy", "sharding_kind"]
