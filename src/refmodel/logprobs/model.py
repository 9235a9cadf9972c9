"""Token log-probs of a Hugging Face causal LM, aligned as in DESIGN.md.

``model_logprobs(model, input_ids, attention_mask, score_mask)`` runs the model's backbone, then the
fused head (:func:`refmodel.token_logprobs`) on the scored positions only:

    out[b, t] = log p(input_ids[b, t] | input_ids[b, :t])   (nats, float32, [B, T])

``out[:, 0] = 0``, and so is every position outside ``score_mask`` and every sequence's first real
token (it has no prefix). Position ids are derived from the attention mask, so a sequence's
log-probs do not depend on its padding side or on its batch-mates.

A model wrapped or sharded for training (DDP, PEFT, FSDP2's ``fully_shard``) is run through its own
hooked forward (:func:`run_in_forward`), so the framework gathers the weights and arms the gradient
reduction exactly as for the model's own forward; the fused head reads the head weight inside it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from .. import validation
from .._optional import available
from ..errors import ConfigError, InvalidBatch
from .head import TokenLogprobs, logprobs_from_logits, token_logprobs
from .lm_head import (
    PARTITIONED_HINT,
    HFModule,
    LMHead,
    full_shape,
    is_partitioned,
    logit_transform,
    unwrap_causal_lm,
)
from .transform import LogitTransform, full_log_softmax

log = logging.getLogger(__name__)

T = TypeVar("T")
_UNSET = object()


def run_in_forward(modules: Sequence[nn.Module], fn: Callable[[], T]) -> T:
    """``fn()`` run as the forward of each of ``modules`` in turn (outermost first), through their ``__call__``.

    Why: a sharding or data-parallel framework acts in a module's call, not in its weights. FSDP2 gathers a
    module's parameters in its forward pre-hook (and, with gradients, arms their reduce-scatter around the
    outputs), DeepSpeed ZeRO-3 gathers each module's own parameters the same way, and DDP's forward arms its
    gradient all-reduce. Calling the backbone or reading ``lm_head.weight`` directly would do so behind
    their back (shards instead of weights: ``aten.embedding got mixed torch.Tensor and DTensor``). Here
    each module's ``forward`` is replaced, for this call only, by "call the next one" (the last one runs
    ``fn``), so every hook runs around ``fn`` as around the model's own forward, with or without gradients.
    A DDP wrapper keeps its own forward, which calls its ``.module`` (the next one in ``modules``). On
    modules without hooks this is ``fn()``.
    """
    modules = list(modules)
    if not modules:
        return fn()
    saved = {id(m): (m, m.__dict__.get("forward", _UNSET)) for m in modules}

    def restore(m: nn.Module) -> None:
        module, forward = saved[id(m)]
        if forward is _UNSET:
            module.__dict__.pop("forward", None)
        else:
            module.forward = forward

    def step(i: int):
        # Each module gets its own forward back as soon as its hooks ran: `fn` may call it (a LoRA layer's
        # lora_A). The framework's pre-hooks may pass (cast) arguments; the closure has its own.
        restore(modules[i])
        return modules[i + 1]() if i + 1 < len(modules) else fn()

    try:
        for i, m in enumerate(modules):
            if isinstance(m, nn.parallel.DistributedDataParallel):  # its forward calls its .module: the next
                if i + 1 == len(modules) or m.module is not modules[i + 1]:
                    raise ConfigError(f"run_in_forward: a DDP wrapper must be followed by its .module, got "
                                      f"{[type(x).__name__ for x in modules]}")
                continue
            m.forward = lambda *_args, _i=i, **_kwargs: step(_i)
        return modules[0]()
    finally:
        for m, _ in saved.values():
            restore(m)


def wrapper_chain(model: nn.Module) -> list[nn.Module]:
    """``[model, ..., causal]``: ``model`` and every wrapper down to its ``*ForCausalLM`` (DDP, PEFT's
    ``PeftModel`` and ``LoraModel``), so :func:`run_in_forward` runs the hooks of whichever of them a
    framework sharded (``fully_shard(peft_model)`` or ``fully_shard(peft_model.base_model.model)``)."""
    causal = unwrap_causal_lm(model)
    if causal is model:
        return [model]
    for name, module in model.named_modules():
        if module is causal:
            chain, current = [model], model
            for part in name.split("."):
                current = getattr(current, part)
                chain.append(current)
            return chain
    return [model, causal]


def backbone_of(causal: HFModule) -> HFModule:
    """The transformer under a ``*ForCausalLM``'s head (``model.model``, ``transformer``, ...).

    ``base_model`` is transformers' name for it (``base_model_prefix``); some classes leave the prefix
    unset, so ``base_model`` is the causal LM itself and the backbone sits at ``.model``.
    """
    return causal.base_model if causal.base_model is not causal else causal.model


def validate_batch(input_ids, attention_mask=None, score_mask=None, vocab_size: int | None = None):
    """Check shapes, dtypes and id ranges; return ``(attention_mask, score_mask)`` as bool ``[B, T]``."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise InvalidBatch(f"input_ids must be a [B, T] integer tensor, got {shape}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise InvalidBatch(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    masks: list[torch.Tensor | None] = []
    for name, mask in (("attention_mask", attention_mask), ("score_mask", score_mask)):
        if mask is None:
            masks.append(None)
            continue
        if tuple(mask.shape) != tuple(input_ids.shape):
            raise InvalidBatch(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                               f"got {tuple(mask.shape)}")
        if not mask.dtype == torch.bool and ((mask != 0) & (mask != 1)).any():
            raise InvalidBatch(f"{name} must hold only 0/1 (or booleans)")
        masks.append(mask.bool())
    attn, score = masks
    attn = torch.ones_like(input_ids, dtype=torch.bool) if attn is None else attn
    if vocab_size is not None and input_ids.numel():
        real = input_ids[attn]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab_size):
            bad = real[(real < 0) | (real >= vocab_size)][0].item()
            raise InvalidBatch(f"input_ids holds token id {bad}, outside the vocabulary [0, {vocab_size})")
    if score is None:
        score = attn.clone()
    elif (score & ~attn).any():
        raise InvalidBatch("score_mask marks padded positions (attention_mask == 0); "
                           "scored positions must be real tokens")
    # A sequence's first real token has no prefix: it is never scored.
    score = score & (attn.long().cumsum(1) >= 2)
    return attn, score


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` positions counting real tokens only, so left and right padding give the same result."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def shifted_hidden_states(causal: HFModule, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T - 1, H]`` final hidden states of ``causal``'s backbone; position ``t`` predicts token ``t + 1``.

    Padded positions (``attention_mask`` False) are embedded as id 0, since they may hold -100 or ids past
    the vocabulary; position ids count real tokens only (:func:`position_ids_from_mask`).
    """
    attn = attention_mask.bool()
    out = backbone_of(causal)(input_ids=torch.where(attn, input_ids, torch.zeros_like(input_ids)),
                              attention_mask=attn.long(), position_ids=position_ids_from_mask(attn), use_cache=False)
    return out[0][:, :-1]


def shifted_logits(model: HFModule, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T - 1, V]`` the model's own logits (its head, logit scale and soft-cap; no temperature); position
    ``t`` predicts token ``t + 1``, padded positions embedded as id 0 and position ids from the mask, as
    :func:`shifted_hidden_states`. The full-logits form of the alignment, for oracles and fallbacks."""
    attn = attention_mask.bool()
    return model(input_ids=torch.where(attn, input_ids, torch.zeros_like(input_ids)), attention_mask=attn.long(),
                 position_ids=position_ids_from_mask(attn), use_cache=False).logits[:, :-1]


def model_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    score_mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    use_fused_linear_logprobs: bool = True,
    cast_logprobs_to_fp32: bool = True,
    use_liger: bool = False,
    return_entropy: bool = False,
):
    """``[B, T]`` float32 log-probs of ``input_ids`` under ``model`` (see module docstring).

    Args:
        model: any Hugging Face ``*ForCausalLM``, also wrapped in PEFT (LoRA on the head included).
        input_ids: ``[B, T]`` token ids; attention_mask / score_mask: ``[B, T]`` 0/1 or bool.
            ``score_mask`` defaults to every real token.
        temperature: sampling temperature the log-probs should match (logits / temperature).
        use_fused_linear_logprobs: False runs the model's own head and ``log_softmax`` (full logits).
        cast_logprobs_to_fp32: float32 logits and accumulation whatever the compute dtype.
        use_liger: use Liger's fused kernel when installed and on CUDA (else the built-in op).
        return_entropy: return a :class:`~refmodel.logprobs.TokenLogprobs` with per-position entropy too.
    """
    temperature = validation.temperature(temperature)  # also on the paths that skip token_logprobs' check
    causal = unwrap_causal_lm(model)
    head_module = causal.get_output_embeddings()
    weight = getattr(head_module, "weight", None)
    if weight is not None and is_partitioned(weight) and not hasattr(head_module, "ds_id"):
        # zero.Init (e.g. from_pretrained under an HfDeepSpeedConfig) partitions; only deepspeed.initialize hooks.
        raise ConfigError(f"the model's parameters are DeepSpeed ZeRO-3 partitions that no DeepSpeed engine gathers "
                          f"({PARTITIONED_HINT}); prepare it with deepspeed.initialize, or use Frozen(model), which "
                          "prepares a partitioned reference")
    vocab = full_shape(weight)[0] if weight is not None else None
    attn, score = validate_batch(input_ids, attention_mask, score_mask, vocab)
    batch, length = input_ids.shape
    if batch == 0 or length < 2 or not score.any():
        zeros = torch.zeros(batch, length, dtype=torch.float32, device=input_ids.device)
        return TokenLogprobs(zeros, zeros.clone()) if return_entropy else zeros
    targets = torch.where(score[:, 1:], input_ids[:, 1:], torch.full_like(input_ids[:, 1:], -100))

    if not use_fused_linear_logprobs:
        logits = shifted_logits(model, input_ids, attn)
        return _pad_first(logprobs_from_logits(logits, targets, temperature=temperature, return_entropy=return_entropy))

    def backbone_and_head():
        hidden = shifted_hidden_states(causal, input_ids, attn)
        # Padded inside: a fresh tensor, not a view, leaves the forward (FSDP2 hooks its backward on it).
        return _pad_first(head_logprobs(causal, hidden, targets, temperature=temperature, chunk_size=chunk_size,
                                        fp32_accumulation=cast_logprobs_to_fp32, use_liger=use_liger,
                                        return_entropy=return_entropy))

    # Inside the hooked forward of `model` and its wrappers: gathered weights, gradients reduced (DDP, FSDP2).
    return run_in_forward(wrapper_chain(model), backbone_and_head)


def head_logprobs(
    model: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    fp32_accumulation: bool = True,
    use_liger: bool = False,
    return_entropy: bool = False,
):
    """Log-probs of ``targets`` ``[B, T]`` (-100 = skip, 0 there) from final hidden states ``[B, T, H]``.

    Goes through ``model``'s LM head the way its own forward would: PEFT adapters on the head folded in
    exactly, the config's logit scale and final soft-cap applied; the ``[B, T, V]`` logits are never
    built. A head that is not a linear map (DoRA, a quantized layer) runs as a module on the scored
    rows only. Returns ``[B, T]`` float32 (or :class:`~refmodel.logprobs.TokenLogprobs` with entropy), in nats.
    """
    temperature = validation.temperature(temperature)  # the module-head and Liger paths skip token_logprobs
    causal = unwrap_causal_lm(model)
    # Through the head module's own call (hooks of a separately sharded head gather its weight), read inside.
    return run_in_forward(_weight_modules(causal.get_output_embeddings()), lambda: _head_logprobs(
        causal, hidden, targets, temperature=temperature, chunk_size=chunk_size, fp32_accumulation=fp32_accumulation,
        use_liger=use_liger, return_entropy=return_entropy))


def _head_logprobs(causal: HFModule, hidden: torch.Tensor, targets: torch.Tensor, *, temperature: float,
                   chunk_size: int | None, fp32_accumulation: bool, use_liger: bool, return_entropy: bool):
    head = LMHead.from_model_or_none(causal)
    if head is None:
        module = causal.get_output_embeddings()
        log.info("LM head %s is not a linear map; running it as a module on the scored rows only",
                 type(module).__name__)
        tf = logit_transform(causal.config)
        rows = targets != -100
        scored = logprobs_from_logits(module(hidden[rows]).unsqueeze(0), targets[rows].unsqueeze(0),
                                      temperature=temperature, logit_scale=tf.logit_scale, softcap=tf.softcap,
                                      return_entropy=return_entropy)
        return _scatter_rows(scored, rows)
    hidden, weight, bias = head.fold(hidden)
    kwargs: dict[str, Any] = dict(bias=bias, temperature=temperature, logit_scale=head.logit_scale,
                                  softcap=head.softcap, chunk_size=chunk_size, return_entropy=return_entropy,
                                  fp32_accumulation=fp32_accumulation)
    if use_liger:
        from .liger import liger_token_logprobs

        return liger_token_logprobs(hidden, weight, targets, **kwargs)
    return token_logprobs(hidden, weight, targets, **kwargs)


def head_log_softmax(model: nn.Module, hidden: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """``[..., V]`` full next-token log-probabilities (float32, nats) of ``model``'s head on ``hidden [..., H]``.

    The naive counterpart of :func:`head_logprobs` for callers that need whole distributions (a full-softmax
    KL): the head as an :class:`LMHead` (adapters folded) or, when it is not a linear map, run as its module;
    the model's logit transform then ``temperature``. Holds ``[..., V]``: pass row chunks.
    """
    causal = unwrap_causal_lm(model)
    head = LMHead.from_model_or_none(causal)
    if head is not None:  # float32 logits whatever the head's dtype, as the fused kernels compute them
        return head.full_log_softmax(hidden.to(torch.promote_types(hidden.dtype, torch.float32)),
                                     temperature=temperature)
    tf = logit_transform(causal.config)
    return full_log_softmax(causal.get_output_embeddings()(hidden), scale=tf.logit_scale, softcap=tf.softcap,
                            temperature=temperature)


def _weight_modules(head: nn.Module) -> list[nn.Module]:
    """``head`` and its submodules that hold parameters of their own (PEFT's base layer, ``lora_A``/``lora_B``
    linears), whose calls a framework hooks to gather those; containers (``ParameterDict``) have no call."""
    return [head] + [m for m in list(head.modules())[1:] if not isinstance(m, (nn.ParameterDict, nn.ParameterList))
                     and next(m.parameters(recurse=False), None) is not None]


def _scatter_rows(scored, rows):
    def place(vals):
        return vals.new_zeros(rows.shape).index_put((rows.nonzero(as_tuple=True)), vals[0])

    if isinstance(scored, torch.Tensor):
        return place(scored)
    return type(scored)(*(place(v) for v in scored))


def _pad_first(out):
    """Prepend the column for position 0 (no prefix: log-prob 0)."""
    def pad(t):
        return torch.nn.functional.pad(t, (1, 0))

    if isinstance(out, torch.Tensor):
        return pad(out)
    return type(out)(*(pad(t) for t in out))


def liger_available() -> bool:
    """True when Liger's kernels are installed and a CUDA device is present."""
    return torch.cuda.is_available() and available("liger_kernel")


__all__ = [
    "LMHead",
    "LogitTransform",
    "backbone_of",
    "head_log_softmax",
    "head_logprobs",
    "logit_transform",
    "model_logprobs",
    "position_ids_from_mask",
    "run_in_forward",
    "shifted_hidden_states",
    "shifted_logits",
    "unwrap_causal_lm",
    "validate_batch",
    "wrapper_chain",
    "liger_available",
]
