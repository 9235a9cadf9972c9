"""DeepSpeed ZeRO-3: full parameters, state dicts and a reference partitioned like the policy.

Under ZeRO-3 every parameter is a partition: ``p.data`` is an empty ``[0]`` tensor on each rank, the rank's
``1 / world`` slice lives in ``p.ds_tensor``, and the full ``p.ds_shape`` exists only while DeepSpeed gathers
it: in a module's own forward (the hooks ``deepspeed.initialize`` registers) or inside
``deepspeed.zero.GatheredParameters``. refmodel runs models through their hooked forward and reads or writes
parameters only inside a gather (:func:`full_parameters`); :mod:`refmodel.models.sharding` dispatches here.

Every function here is a collective: all ranks call it, in the same order (a fingerprint or a sync asked
on rank 0 alone waits for the others forever).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .._optional import require
from ..errors import ConfigError
from ..logprobs.lm_head import is_partitioned

# The keys of a training config that an inference engine must not see (TRL's prepare_deepspeed drops the
# same): without an optimizer DeepSpeed would still build one from them, or a scheduler with nothing to drive.
TRAINING_ONLY = ("optimizer", "scheduler")


def _deepspeed():
    return require("deepspeed", "distributed")


def is_zero3(module: nn.Module) -> bool:
    """True when ``module`` holds ZeRO-3 partitioned parameters (``zero.Init`` or ``deepspeed.initialize``).
    The one test of "ZeRO-3": :func:`refmodel.models.sharding.sharding_kind` asks it first."""
    return any(hasattr(p, "ds_id") or hasattr(p, "ds_status") for p in module.parameters())


def is_prepared(module: nn.Module) -> bool:
    """True when ``deepspeed.initialize`` registered its gather hooks on ``module`` (its forward then works);
    a model loaded under ``zero.Init`` alone holds partitions without them."""
    return hasattr(module, "ds_external_parameters")


def _partitioned(params) -> list[nn.Parameter]:
    return [p for p in params if hasattr(p, "ds_id")]


@contextlib.contextmanager
def full_parameters(module: nn.Module, *, writable: bool = False) -> Iterator[None]:
    """Inside the block every partitioned parameter of ``module`` is full on every rank.

    ``writable=True``: what rank 0 writes is broadcast and kept when the block ends (every rank must write
    the same, as a sync does); else writes are dropped and the partitions stay as they were. Holds the whole
    model on each rank for the block: for reading a few weights, pass the submodule that holds them.
    """
    params = _partitioned(module.parameters())
    if not params:
        yield
        return
    with _deepspeed().zero.GatheredParameters(params, modifier_rank=0 if writable else None):
        yield


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every partition gathered into a full CPU copy, one parameter at a time (so a
    rank's accelerator holds one full parameter at most; its CPU memory holds the whole model)."""
    return dict(full_tensors(module, list(module.state_dict(keep_vars=True))))


def full_tensors(module: nn.Module, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` of ``module``'s state dict in ``names``' order (default: sorted), each partition
    gathered alone into a CPU copy: a caller that drops each before the next (a fingerprint) never holds the
    whole model. Every rank must consume it in the same order (each gather is a collective)."""
    state = module.state_dict(keep_vars=True)
    for name in sorted(state) if names is None else names:
        tensor = state[name]
        if hasattr(tensor, "ds_id"):
            with _deepspeed().zero.GatheredParameters([tensor], modifier_rank=None):
                full = tensor.detach().to("cpu", copy=True)
            yield name, full  # outside the gather: the caller may run other collectives between items
        else:
            yield name, tensor.detach()


def partition_new_parameters(module: nn.Module) -> None:
    """Make the plain parameters of ``module`` ZeRO-3 partitions like the rest of the model it sits in.

    For modules added after ``deepspeed.initialize`` (a PEFT adapter added later): DeepSpeed's step releases
    every parameter of the model and refuses plain ones. They get no gather hooks: read them, and run
    forwards that use them, inside :func:`full_parameters` of ``module``.
    """
    plain = [p for p in module.parameters() if not hasattr(p, "ds_id")]
    if plain:
        _deepspeed().zero.Init(module=module, dtype=plain[0].dtype)


@torch.no_grad()
def mix_parameters(dst: nn.Module, src: nn.Module, alpha: float) -> None:
    """``dst <- alpha * src + (1 - alpha) * dst`` on every parameter (``alpha = 1``: a copy), ``dst`` and ``src``
    with the same parameter names (a TR-DPO sync of a partitioned reference from a partitioned policy).

    One parameter at a time inside a gather (the policy's read, the reference's written and kept), so a rank
    holds two full parameters at most; DeepSpeed's persistent small parameters stay consistent.
    """
    ds = _deepspeed()
    theirs = dict(src.named_parameters())
    for name, mine in dst.named_parameters():
        with ds.zero.GatheredParameters(_partitioned([theirs[name]]), modifier_rank=None), \
                ds.zero.GatheredParameters(_partitioned([mine]), modifier_rank=0):
            pol = theirs[name].detach().to(device=mine.device, dtype=mine.dtype)
            if alpha == 1.0:
                mine.copy_(pol)
            else:
                mine.mul_(1.0 - alpha).add_(pol, alpha=alpha)


def active_config() -> dict[str, Any] | None:
    """The DeepSpeed config this process runs under, or None: transformers' ``HfDeepSpeedConfig`` (the
    script order of TRL's examples and ``Trainer``), else accelerate's DeepSpeed plugin when its state exists."""
    from ..errors import MissingDependency

    try:
        hf_ds = require("transformers.integrations.deepspeed", "distributed")
    except MissingDependency:
        hf_ds = None
    if hf_ds is not None and hf_ds.deepspeed_config() is not None:
        return hf_ds.deepspeed_config()
    try:
        state = require("accelerate.state", "distributed").AcceleratorState
    except MissingDependency:
        return None
    plugin = state._shared_state.get("deepspeed_plugin") if state._shared_state else None
    return getattr(plugin, "deepspeed_config", None)


def inference_config(config: dict[str, Any] | None, hidden_size: int | None = None) -> dict[str, Any]:
    """``config`` made into a ZeRO-3 inference config, the way TRL's ``prepare_deepspeed`` makes one.

    The training-only blocks (:data:`TRAINING_ONLY`, ``offload_optimizer``) and every unresolved ``"auto"``
    value are dropped, the stage is 3, and with ``hidden_size`` the bucket sizes TRL derives from it fill the
    ones left unset. ``None`` gives a bare stage-3 config. DeepSpeed asks for a batch size even for
    inference: 1 when none is set.
    """
    def resolved(d: dict) -> dict:
        return {k: resolved(v) if isinstance(v, dict) else v for k, v in d.items() if v != "auto"}

    cfg = resolved(copy.deepcopy(config or {}))
    for key in TRAINING_ONLY:
        cfg.pop(key, None)
    zero = cfg.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    zero["stage"] = 3
    if hidden_size:
        for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                           ("stage3_param_persistence_threshold", 10 * hidden_size),
                           ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))):
            zero.setdefault(key, value)
    if "train_batch_size" not in cfg and "train_micro_batch_size_per_gpu" not in cfg:
        cfg["train_micro_batch_size_per_gpu"] = 1
    return cfg


def _hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    sizes = getattr(config, "hidden_sizes", None)
    return max(sizes) if sizes else getattr(config, "hidden_size", None)


def prepare_reference(model: nn.Module, config: dict[str, Any] | None = None) -> tuple[nn.Module, Any]:
    """``(module, engine)``: ``model`` frozen and partitioned at stage 3 by its own DeepSpeed inference engine,
    as TRL's ``prepare_deepspeed`` prepares a reference model; its forward gathers layer by layer.

    ``config``: the policy's DeepSpeed config (default: :func:`active_config`), made into an inference config
    by :func:`inference_config` (its ``bf16`` / ``fp16`` settings apply to the reference too). Keep the engine
    alive as long as the module: it owns the gather hooks.
    """
    ds = _deepspeed()
    model.requires_grad_(False)
    cfg = inference_config(active_config() if config is None else config, _hidden_size(model))
    engine, *_ = ds.initialize(model=model, config=cfg)
    engine.eval()
    return engine.module, engine


def partitioned_copy(policy: nn.Module) -> nn.Module:
    """A new model of ``policy``'s class and config, built partitioned (transformers' own ``zero.Init`` path,
    weights not initialized) and filled with the policy's weights one parameter at a time, so no rank ever holds
    the whole model. (``deepcopy`` would copy DeepSpeed's per-parameter state, which points at the policy's.)"""
    from_config = getattr(type(policy), "_from_config", None)
    if not callable(from_config):
        raise ConfigError(f"cannot build a ZeRO-3 copy of {type(policy).__name__}: it is not a Hugging Face "
                          "model; pass a model folder to Frozen(path) instead")
    ds = _deepspeed()
    hf_ds = require("transformers.integrations.deepspeed", "distributed")
    previous = hf_ds._hf_deepspeed_config_weak_ref  # type: ignore[attr-defined]  # restored below
    # from_config partitions under zero.Init only while a ZeRO-3 HfDeepSpeedConfig is alive (held by reference).
    holder = None if hf_ds.is_deepspeed_zero3_enabled() else hf_ds.HfDeepSpeedConfig(inference_config(None))
    try:
        clone = from_config(copy.deepcopy(policy.config), dtype=next(p.dtype for p in policy.parameters()))
    finally:
        if holder is not None:
            hf_ds._hf_deepspeed_config_weak_ref = previous  # type: ignore[attr-defined]
    mine, theirs = dict(clone.named_parameters()), dict(policy.named_parameters())
    if mine.keys() != theirs.keys():
        raise ConfigError(f"a fresh {type(policy).__name__} has other parameters than the policy "
                          f"(e.g. {sorted(mine.keys() ^ theirs.keys())[:3]}); pass a model folder to Frozen(path)")
    with torch.no_grad():
        for name, dst in mine.items():
            src = theirs[name]
            with ds.zero.GatheredParameters(_partitioned([src]), modifier_rank=None), \
                    ds.zero.GatheredParameters(_partitioned([dst]), modifier_rank=0):
                dst.copy_(src)
        for name, buf in dict(clone.named_buffers()).items():
            buf.copy_(policy.get_buffer(name))
    return clone


__all__ = ["TRAINING_ONLY", "active_config", "full_parameters", "full_state_dict", "full_tensors", "inference_config",
           "is_partitioned", "is_prepared", "is_zero3", "mix_parameters",
           "partition_new_parameters", "partitioned_copy", "prepare_reference"]
