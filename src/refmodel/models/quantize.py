"""Weight-only 8-bit and 4-bit quantization of a frozen reference model.

Modes (``QUANT_MODES``):

- ``"int8"``: torchao ``Int8WeightOnlyConfig`` (per-row int8 weights, float activations). CPU and GPU.
- ``"int4"``: torchao int4 weight-only, group size 32. torchao 0.18 has no CPU kernel for its
  ``Int4WeightOnlyConfig`` (``plain`` needs the GPU-only ``mslk`` package, ``plain_int32`` refuses
  CPU, ``tile_packed_to_4d`` needs CUDA, the old ``opaque`` CPU format is gone), so on CPU and on
  CUDA alike this mode uses ``IntxWeightOnlyConfig(weight_dtype=torch.int4)``: the rounding is 4-bit
  (so is the quality), but the values are stored unpacked in int8, so the memory is that of int8.
  For real 4-bit memory use ``"bnb-nf4"``.
- ``"bnb-int8"``: bitsandbytes LLM.int8 (``Linear8bitLt``, outlier threshold 6.0), as
  ``load_in_8bit``. Runs on CPU with bitsandbytes >= 0.49.
- ``"bnb-nf4"``: bitsandbytes NF4 (``Linear4bit``, packed 4-bit), as ``load_in_4bit``.

The LM head (output embeddings) is never quantized. Two reasons: (1) the fused head
(:func:`refmodel.token_logprobs`) needs a plain weight tensor it can slice, transpose and cast;
torchao's ``Int8Tensor`` implements no ``aten.t`` and fails there; (2) the head decides the
log-softmax directly, and on tied models it is the input embedding too. bitsandbytes' own
``load_in_8bit`` / ``load_in_4bit`` skip the head by default for the same reason. The head is a
small share of the bytes of any model bigger than a toy.

Quantization changes log-probs, so it belongs in the fingerprint:
``refmodel.fingerprint(model, quantization=mode)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from .._optional import require
from ..errors import ConfigError

log = logging.getLogger(__name__)

QUANT_MODES: tuple[str, ...] = ("int8", "int4", "bnb-int8", "bnb-nf4")
TORCHAO_MODES = ("int8", "int4")
BNB_MODES = ("bnb-int8", "bnb-nf4")
INT4_GROUP_SIZE = 32


def check_mode(mode: str | None) -> str | None:
    """Return ``mode`` if it is ``None`` or one of :data:`QUANT_MODES`, else raise :class:`ConfigError`."""
    if mode is None or mode in QUANT_MODES:
        return mode
    raise ConfigError(f"unknown quantization mode {mode!r}; expected one of {QUANT_MODES} (or None)")


def _head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _targets(model: nn.Module, group_size: int | None) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` layers to quantize: all but the head (and, for grouped modes, divisible ones)."""
    head = _head(model)
    out = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear or mod is head:
            continue
        if group_size and mod.in_features % group_size:
            log.info("not quantizing %s: in_features %d is not a multiple of group size %d",
                     name, mod.in_features, group_size)
            continue
        out.append((name, mod))
    return out


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Quantize the linear layers of ``model`` (head excepted) in place for inference; returns it.

    Args:
        model: a float model (any ``nn.Module``; Hugging Face causal LMs keep their head float).
        mode: one of :data:`QUANT_MODES`.
    """
    if check_mode(mode) is None:
        raise ConfigError(f"quantize_model needs a mode, one of {QUANT_MODES}; got None")
    model.eval()
    _conv1d_to_linear(model)
    if mode in TORCHAO_MODES:
        _quantize_torchao(model, mode)
    else:
        _quantize_bnb(model, mode)
    model.requires_grad_(False)
    return model


def _conv1d_to_linear(model: nn.Module) -> None:
    """Swap GPT-2 style ``Conv1D`` layers (weight ``[in, out]``) for the equivalent ``nn.Linear``.

    Both libraries only quantize ``nn.Linear``; without this a GPT-2 model would silently stay float.
    """
    head = _head(model)
    for name, mod in list(model.named_modules()):
        if type(mod).__name__ != "Conv1D" or mod is head or not hasattr(mod, "nf"):
            continue
        weight = mod.weight.detach()
        lin = nn.Linear(weight.shape[0], weight.shape[1], bias=mod.bias is not None,
                        device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(weight.T)
            if mod.bias is not None:
                lin.bias.copy_(mod.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, lin)


def _quantize_torchao(model: nn.Module, mode: str) -> None:
    require("torchao", "quant")
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    group = INT4_GROUP_SIZE if mode == "int4" else None
    chosen = {id(mod) for _, mod in _targets(model, group)}
    if mode == "int8":
        config = Int8WeightOnlyConfig()
    else:
        # torch.int4 exists at run time (torch >= 2.3) but not in torch's type stubs
        config = IntxWeightOnlyConfig(weight_dtype=torch.int4,  # type: ignore[attr-defined]
                                      granularity=PerGroup(INT4_GROUP_SIZE))
    quantize_(model, config, filter_fn=lambda mod, fqn: id(mod) in chosen)
    log.info("torchao %s: quantized %d linear layers", mode, len(chosen))


class _CastNoticeOnce(logging.Filter):
    """Passes bitsandbytes' "MatMul8bitLt: inputs will be cast ... to float16" once per process.

    LLM.int8 quantizes its activations from float16, so every ``Linear8bitLt`` logs this WARNING on every
    eval forward whose input is not float16: 14 lines per forward of a 2-layer model, thousands per
    precompute. It is one fact about the mode, worth saying once; other bitsandbytes records pass.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "will be cast" not in record.getMessage():
            return True
        first, self.seen = not self.seen, True
        return first


def bnb_cast_notice_once() -> None:
    """Install :class:`_CastNoticeOnce` (idempotent); every path that builds bitsandbytes layers calls it."""
    cast_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _CastNoticeOnce) for f in cast_logger.filters):
        cast_logger.addFilter(_CastNoticeOnce())


def _quantize_bnb(model: nn.Module, mode: str) -> None:
    bnb = require("bitsandbytes", "quant")
    bnb_cast_notice_once()
    targets = _targets(model, None)
    for name, lin in targets:
        device, dtype = lin.weight.device, lin.weight.dtype
        data = lin.weight.data.detach().clone()
        if mode == "bnb-int8":
            new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      has_fp16_weights=False, threshold=6.0, device="meta")
            new.weight = bnb.nn.Int8Params(data.to("cpu"), requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    compute_dtype=dtype, quant_type="nf4", device="meta")
            new.weight = bnb.nn.Params4bit(data.to("cpu"), requires_grad=False, quant_type="nf4",
                                                compress_statistics=False)  # as load_in_4bit
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.data.detach().clone().to("cpu"), requires_grad=False)
        new = new.to(device)  # bitsandbytes quantizes when the weight is moved to its device
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    log.info("bitsandbytes %s: quantized %d linear layers", mode, len(targets))


def _storage_key(t: torch.Tensor) -> tuple:
    """What identifies the memory behind plain tensor ``t``: its storage, so tied or viewed weights count once."""
    if t.device.type == "meta":
        return ("id", id(t))
    try:
        return (t.device.type, t.untyped_storage().data_ptr())
    except RuntimeError:  # a wrapper without storage of its own that does not flatten: count it by object
        return ("id", id(t))


def tensor_nbytes(t: torch.Tensor, seen: set | None = None) -> int:
    """Bytes really held by ``t``: the inner tensors of a quantized tensor subclass, recursively.

    A torchao weight (``Int8Tensor``, ...) is a wrapper whose own "storage" is not real memory, so asking
    for its data pointer raises; its ``__tensor_flatten__`` names the plain tensors that hold the bytes
    (int8 data, scales). bitsandbytes 4-bit weights add their quantization constants (absmax, code).
    ``seen``: storage keys already counted (shared across calls to count each storage once).
    """
    seen = set() if seen is None else seen
    flatten = getattr(t, "__tensor_flatten__", None)
    if type(t) not in (torch.Tensor, nn.Parameter) and callable(flatten):
        names, _ = flatten()
        return sum(tensor_nbytes(getattr(t, n), seen) for n in names if getattr(t, n, None) is not None)
    key = _storage_key(t)
    if key in seen:
        return 0
    seen.add(key)
    total = t.numel() * t.element_size()
    state = getattr(t, "quant_state", None)  # bitsandbytes 4-bit constants (absmax, code)
    for extra in (getattr(state, "absmax", None), getattr(state, "code", None)):
        if isinstance(extra, torch.Tensor):
            total += tensor_nbytes(extra, seen)
    return total


def tensors_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held by ``tensors`` together, each storage counted once (see :func:`tensor_nbytes`)."""
    seen: set = set()
    return sum(tensor_nbytes(t, seen) for t in tensors)


def model_nbytes(model: nn.Module) -> int:
    """Parameter + buffer bytes of ``model`` as stored (packed sizes for quantized weights); shared storage once.

    The one byte counter: the model cache's budget, ``quantize-report``'s memory column and every
    reference strategy's ``memory_bytes`` (:func:`refmodel.reference.base.module_bytes` is this function).
    """
    return tensors_nbytes(list(model.parameters()) + list(model.buffers()))


__all__ = ["QUANT_MODES", "check_mode", "model_nbytes", "quantize_model", "tensor_nbytes", "tensors_nbytes"]
