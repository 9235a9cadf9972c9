"""``forward_backward``: one policy-gradient forward + backward with a *named* reference, in the style
of hosted RL training clients (Tinker's ``forward_backward(data, loss_fn)``).

    out = refmodel.rl.forward_backward(policy, batch, loss_fn="grpo",
                                       loss_kwargs={"reference_model": "sft-base", "beta": 0.01})
    out.loss, out.metrics["kl_divergence"]        # policy.grad is populated; step the optimizer yourself
    # or with the options built once per run:
    cfg = refmodel.losses.PolicyLossConfig(loss_type="grpo", beta=0.01)
    out = refmodel.rl.forward_backward(policy, batch, config=cfg, loss_kwargs={"reference_model": "sft-base"})

The reference is a name, resolved through the process-wide :func:`refmodel.get_global_reference_cache`
registry: loaded once (quantized per the cache's ``quantize_by_default``, or ``loss_kwargs["quantize"]``),
pinned for the call, evicted by the cache's LRU rule like any other model. With a reference service
configured (:func:`configure_reference_service`, or ``remote_url`` in ``loss_kwargs``) the placement
rule of :func:`refmodel.reference.choose_placement` sends models whose weights exceed
``max_local_bytes`` to the service instead. A name the registry does not know is refused before any
work, with the registered names in the message.

``batch`` is a dict of ``[B, T]`` tensors: ``input_ids``, ``attention_mask`` (optional),
``completion_mask`` (aliases ``score_mask``, ``loss_mask``), ``advantages`` (``[B]`` or ``[B, T]``), and
optionally ``old_logprobs`` (the PPO anchor; ``None``: on-policy), ``sampler_logprobs`` (for truncated IS) and
``ref_logprobs`` (skips the reference). A :class:`~refmodel.rl.Rollouts` plus ``advantages`` also works.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from .._deprecation import renamed_fields, warn_deprecated
from ..cluster import get_logger
from ..errors import ConfigError, InvalidBatch, ModelNotAllowed
from ..logprobs.model import model_logprobs
from ..losses import kl as kl_mod
from ..losses.policy import policy_loss
from ..losses.policy_config import LOSS_TYPES, OPTION_NAMES, PolicyLossConfig, build_config
from ..models.cache import get_global_reference_cache
from ..models.loading import weights_bytes

log = get_logger(__name__)  # shared warnings: main process only (refmodel.cluster)

LOSS_FNS: tuple[str, ...] = LOSS_TYPES
# the options of refmodel.losses.policy_loss (PolicyLossConfig's fields; the loss type is loss_fn), and its per-step input
_LOSS_KEYS = set(OPTION_NAMES) - {"loss_type"}
_CALL_KEYS = {"num_items_in_batch"}
_OWN_KEYS = {"reference_model", "temperature", "quantize", "kl_threshold", "remote_url", "remote_token",
             "max_local_bytes"}
DEFAULT_KL_THRESHOLD = 1.0  # nats/token: well above healthy RL runs (verl logs 0.02-0.13, research note 9.3)


@renamed_fields(logps="logprobs", ref_logps="ref_logprobs")
@dataclass
class ForwardBackwardOutput:
    """``loss`` (float, the value that was backpropagated), ``metrics`` (floats), and the ``[B, T]``
    float32 log-probs used: ``logprobs`` (policy, detached) and ``ref_logprobs`` (None when ``beta == 0``)."""

    loss: float
    metrics: dict[str, float]
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor | None = None


@dataclass
class _Service:
    url: str | None = None
    max_local_bytes: int | None = None
    token: str | None = None
    remotes: dict = field(default_factory=dict)


_SERVICE = _Service()
_MONITORS: dict[str, kl_mod.KLMonitor] = {}
_LOCK = threading.Lock()


def configure_reference_service(url: str | None, *, max_local_bytes: int | None = None,
                                token: str | None = None) -> None:
    """Route named references whose weights exceed ``max_local_bytes`` to the service at ``url``
    (``max_local_bytes=None``: every named reference goes there); ``url=None`` turns routing off."""
    if max_local_bytes is not None and (not isinstance(max_local_bytes, int) or max_local_bytes < 0):
        raise ConfigError(f"max_local_bytes must be a byte count >= 0 or None, got {max_local_bytes!r}")
    with _LOCK:
        for remote in _SERVICE.remotes.values():
            remote.close()
        _SERVICE.url, _SERVICE.max_local_bytes, _SERVICE.token, _SERVICE.remotes = url, max_local_bytes, token, {}


def kl_monitor(reference_model: str) -> kl_mod.KLMonitor | None:
    """The KL monitor ``forward_backward`` keeps for ``reference_model`` (None before its first call)."""
    return _MONITORS.get(reference_model)


def _resolve(name: str, quantize, url: str | None, max_local_bytes: int | None, token: str | None,
             temperature: float = 1.0):
    """``("local", None)`` or ``("remote", Remote)`` for the registered ``name`` (refused if unknown).

    A ``Remote`` is bound to one temperature (part of its fingerprint), so one is kept per temperature.
    """
    cache = get_global_reference_cache()
    try:
        path = cache.registry.resolve(name)
    except ModelNotAllowed as exc:
        raise ModelNotAllowed(f"reference_model {name!r} is not registered in the global reference cache (known: "
                              f"{cache.registry.names()}); register it first with "
                              f"refmodel.get_global_reference_cache().registry.add({name!r}, '/path/to/model')"
                              ) from exc
    if url is None:
        return "local", None
    from ..reference.remote import Remote, choose_placement

    size = weights_bytes(path)  # None: not a local folder, so it cannot run here
    if size is not None and choose_placement(size, max_local_bytes, name=name, remote_url=url) == "local":
        return "local", None
    with _LOCK:
        key = (url, name, float(temperature))
        remote = _SERVICE.remotes.get(key)
        if remote is None:
            remote = _SERVICE.remotes[key] = Remote(url, name, token=token, temperature=temperature)
    return "remote", remote


def named_reference_logprobs(name: str, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          score_mask: torch.Tensor, *, temperature: float = 1.0, quantize=None,
                          remote_url: str | None = None, max_local_bytes: int | None = None,
                          remote_token: str | None = None) -> torch.Tensor:
    """``[B, T]`` float32 log-probs of the registered reference ``name`` (no grad), local or served."""
    url = remote_url if remote_url is not None else _SERVICE.url
    budget = max_local_bytes if remote_url is not None else _SERVICE.max_local_bytes
    token = remote_token if remote_token is not None else _SERVICE.token
    where, remote = _resolve(name, quantize, url, budget, token, temperature)
    if where == "remote":  # the service divides the logits by the temperature, as model_logprobs does
        return remote.logprobs(input_ids, attention_mask, score_mask).to(input_ids.device, torch.float32)
    cache = get_global_reference_cache()
    with torch.no_grad(), cache.use(name, quantize=quantize) as model:
        device = next(model.parameters()).device
        out = model_logprobs(model, input_ids.to(device), attention_mask.to(device), score_mask.to(device),
                             temperature=temperature)
    return out.to(input_ids.device)


# Batch keys renamed to the vocabulary's "...logprobs" (CONTRIBUTING): the old ones work for one release.
_OLD_KEYS = {"old_logprobs": "old_logps", "ref_logprobs": "ref_logps", "sampler_logprobs": "sampler_logps"}


def _get(batch, *names, required=True):
    for n in names:
        for key in (n, _OLD_KEYS.get(n)):
            value = None if key is None else batch.get(key) if isinstance(batch, dict) else getattr(batch, key, None)
            if value is not None:
                if key != n:
                    warn_deprecated(f"forward_backward's batch key {key!r}", f"{n!r}")
                return value
    if required:
        raise InvalidBatch(f"forward_backward's batch needs {names[0]!r}"
                           + (f" (or {', '.join(map(repr, names[1:]))})" if len(names) > 1 else ""))
    return None


def forward_backward(policy: nn.Module, batch, loss_fn: str | None = None, loss_kwargs: dict | None = None, *,
                     config: PolicyLossConfig | None = None) -> ForwardBackwardOutput:
    """Policy forward, the policy loss against the named reference, and ``loss.backward()``.

    Gradients *accumulate* into the policy's ``.grad`` (zero them yourself between steps, as with
    ``loss.backward()``). The loss's options are ``config`` (a :class:`~refmodel.losses.PolicyLossConfig`,
    whose ``beta`` decides whether the reference is asked), or ``loss_fn`` (its ``loss_type``; default
    ``"grpo"``) plus the options in ``loss_kwargs`` (``beta``, default 0.0, ``epsilon``, ``epsilon_high``,
    ``kl_estimator``, ``loss_agg_mode``, ...; not both). ``loss_kwargs`` also holds ``reference_model`` (a
    registered name; needed when ``beta != 0``), ``temperature`` (the sampling temperature, 1.0),
    ``quantize`` (None: the cache's default), ``kl_threshold`` (nats/token, warn above; default 1.0),
    ``remote_url`` / ``max_local_bytes`` / ``remote_token`` (per-call service routing) and
    ``num_items_in_batch`` (as :func:`refmodel.losses.policy_loss`).
    ``metrics``: ``loss``, ``pg_loss``, ``kl_divergence`` (per completion token, on the sampled tokens),
    ``clip_fraction``, ``entropy``, ``tokens``.
    """
    if loss_fn is not None and loss_fn not in LOSS_FNS:
        raise ConfigError(f"unknown loss_fn {loss_fn!r}; expected one of {list(LOSS_FNS)}")
    kw = dict(loss_kwargs or {})
    unknown = set(kw) - _OWN_KEYS - _LOSS_KEYS - _CALL_KEYS
    if unknown:
        raise ConfigError(f"unknown loss_kwargs {sorted(unknown)}; expected some of "
                          f"{sorted(_OWN_KEYS | _LOSS_KEYS | _CALL_KEYS)}")
    options = {k: kw[k] for k in _LOSS_KEYS if k in kw}
    if config is None:
        options["loss_type"] = loss_fn or "grpo"
    config = build_config(config, options, "forward_backward")
    if loss_fn is not None and loss_fn != config.loss_type:
        raise ConfigError(f"forward_backward: loss_fn={loss_fn!r} but config.loss_type={config.loss_type!r}; pass "
                          "one of them (the config alone, or loss_fn with the options in loss_kwargs)")
    beta = config.beta_value
    temperature = float(kw.get("temperature", 1.0))
    name = kw.get("reference_model")
    ids = _get(batch, "input_ids")
    attn = _get(batch, "attention_mask", required=False)
    attn = torch.ones_like(ids, dtype=torch.bool) if attn is None else attn.bool()
    mask = _get(batch, "completion_mask", "score_mask", "loss_mask").bool()
    advantages = torch.as_tensor(_get(batch, "advantages"), dtype=torch.float32, device=ids.device)
    if advantages.shape not in (ids.shape[:1], ids.shape):
        raise InvalidBatch(f"advantages must be [B] = [{ids.shape[0]}] or [B, T] = {list(ids.shape)}, got "
                           f"{list(advantages.shape)}")
    ref_logprobs = _get(batch, "ref_logprobs", required=False)
    if beta != 0 and ref_logprobs is None:
        if name is None:
            raise ConfigError(f"beta={beta} needs a reference: pass loss_kwargs['reference_model'] (a name "
                              "registered in refmodel.get_global_reference_cache()) or batch['ref_logprobs'], "
                              "or set beta=0")
        ref_logprobs = named_reference_logprobs(name, ids, attn, mask, temperature=temperature,
                                          quantize=kw.get("quantize"), remote_url=kw.get("remote_url"),
                                          max_local_bytes=kw.get("max_local_bytes"),
                                          remote_token=kw.get("remote_token"))
    elif name is not None:
        _resolve(name, kw.get("quantize"), None, None, None)  # an unknown name is refused even at beta=0
    out = model_logprobs(policy, ids, attn, mask, temperature=temperature, return_entropy=True)
    res = policy_loss(out.logprobs, _get(batch, "old_logprobs", required=False), advantages, mask, config=config,
                      ref_logprobs=ref_logprobs, rollout_logprobs=_get(batch, "sampler_logprobs", required=False),
                      num_items_in_batch=kw.get("num_items_in_batch"))
    res.loss.backward()
    tokens = int(mask.sum())
    lp = out.logprobs.detach()
    metrics = {"loss": float(res.loss.detach()), "pg_loss": float(res.pg_loss),
               "clip_fraction": float(res.clip_fraction), "tokens": float(tokens),
               "entropy": float((out.entropy.detach() * mask).sum()) / max(tokens, 1)}
    if ref_logprobs is not None:
        kl = float(kl_mod.estimate(lp, ref_logprobs, config.kl_estimator, mask=mask, reduction="batch"))
        metrics["kl_loss"] = float(res.kl_loss)
        metrics["kl_divergence"] = kl
        key = name or "<batch ref_logprobs>"
        with _LOCK:
            monitor = _MONITORS.get(key)
            if monitor is None:
                threshold = kw.get("kl_threshold", DEFAULT_KL_THRESHOLD)
                monitor = _MONITORS[key] = kl_mod.KLMonitor(threshold=threshold, name=f"kl_divergence to {key}")
            elif "kl_threshold" in kw and kw["kl_threshold"] != monitor.threshold:  # a new threshold re-arms it
                monitor.threshold, monitor.warned = kw["kl_threshold"], False
        monitor.update(kl)
    else:
        metrics["kl_divergence"] = float("nan")
    return ForwardBackwardOutput(loss=metrics["loss"], metrics=metrics, logprobs=lp, ref_logprobs=ref_logprobs)


__all__ = ["DEFAULT_KL_THRESHOLD", "ForwardBackwardOutput", "LOSS_FNS", "configure_reference_service",
           "forward_backward", "kl_monitor", "named_reference_logprobs"]
