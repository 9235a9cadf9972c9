"""Old-policy and reference log-probs of a rollout batch, computed once and reused for every pass.

In GRPO/PPO the reference is asked about fresh samples at every step, so nothing can be precomputed
across runs; what matters is that each rollout batch is scored **once** (TRL since PR #3600, verl,
OpenRLHF), cheaply and batch-invariantly:

- completion tokens only (``score_mask = completion_mask``): prompt rows never enter the head matmul;
- through the fused head (:func:`refmodel.model_logprobs`), so no ``[B, T, V]`` logits exist;
- at the sampling temperature (the logits divided by ``T``, as the sampler did; trl#4159);
- in micro-batches whose size does not change the result: every micro-batch keeps the full width
  ``T`` and the reduction is fp32, so micro-batch 1 and 8 agree to 1e-5 (tested), unlike the 8 % of
  tokens outside a [0.9, 1.1] ratio band between bf16 chunk sizes reported in trl#6789;
- the old-policy pass skipped when the update is provably on-policy (one optimizer step per rollout
  batch and no sampler-mismatch correction: TRL's rule), where ``old_logprobs = logprobs.detach()`` gives
  ratio 1 with the policy gradient.

Any refmodel ``Reference`` serves (``Frozen`` incl. quantized/offloaded, ``AdapterDisabled``, a named
adapter, ``Remote``, ``Synced``): only its ``logprobs(ids, attention_mask, score_mask)`` is called.
:func:`exact_kl` is the full-vocabulary ``KL(pi || pi_ref)`` on the rollout's completion tokens, for
references whose weights are local.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .._deprecation import renamed_fields
from ..errors import ConfigError
from ..logprobs.lm_head import LMHead
from ..logprobs.model import head_log_softmax, model_logprobs, unwrap_causal_lm
from .rollout import Rollouts

DEFAULT_MICRO_BATCH = 8


@renamed_fields(old_logps="old_logprobs", ref_logps="ref_logprobs")
@dataclass
class ScoredRollouts:
    """A rollout batch with its no-grad log-probs, each ``[B, T]`` float32 nats (0 off the completion).

    ``old_logprobs`` is ``None`` when the update is on-policy (see :func:`needs_old_logprobs`);
    ``ref_logprobs`` is ``None`` when ``beta == 0`` (no reference is asked at all).
    ``ref_time_s`` / ``old_time_s``: wall time of the two passes; ``ref_calls`` / ``old_calls``: how
    many micro-batch calls each made (once per rollout batch: ``ceil(B / micro_batch_size)``).
    """

    rollouts: Rollouts
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    ref_time_s: float = 0.0
    old_time_s: float = 0.0
    ref_calls: int = 0
    old_calls: int = 0


def needs_old_logprobs(num_iterations: int, steps_per_rollout: int = 1, importance_correction: bool = False) -> bool:
    """Whether the old-policy pass is needed: False only when provably on-policy.

    On-policy means the batch drives exactly one optimizer step (``num_iterations == 1`` and
    ``steps_per_rollout == 1``, gradient accumulation inside that step is fine) and the sampler's
    log-probs are not corrected against (TRL's rule in ``_generate_and_score_completions``).
    """
    for name, v in (("num_iterations", num_iterations), ("steps_per_rollout", steps_per_rollout)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
    return num_iterations * steps_per_rollout > 1 or bool(importance_correction)


def check_reference_temperature(reference, temperature: float) -> None:
    """Refuse a reference built for another temperature than the sampling one (the KL would be off)."""
    ref_t = getattr(reference, "temperature", 1.0)
    if ref_t is None:
        ref_t = 1.0
    if not math.isclose(float(ref_t), float(temperature), rel_tol=0, abs_tol=1e-12):
        raise ConfigError(f"the reference scores at temperature {ref_t}, but the rollouts were sampled at "
                          f"temperature {temperature}; build the reference with temperature={temperature} "
                          f"(e.g. AdapterDisabled(policy, temperature={temperature}) or "
                          f"Frozen.from_policy(policy, temperature={temperature})) so that pi and pi_ref see "
                          "the same tempered distribution")


def _micro_batches(n: int, size: int) -> list[torch.Tensor]:
    if not isinstance(size, int) or size < 1:
        raise ConfigError(f"micro_batch_size must be an integer >= 1, got {size!r}")
    return [torch.arange(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _score(fn, rollouts: Rollouts, micro_batch_size: int) -> tuple[torch.Tensor, int]:
    """``fn(ids, attn, score) -> [b, T]`` over micro-batches; full width kept so rows are batch-invariant."""
    out = torch.zeros(rollouts.input_ids.shape, dtype=torch.float32, device=rollouts.input_ids.device)
    chunks = _micro_batches(rollouts.batch_size, micro_batch_size)
    for rows in chunks:
        rows = rows.to(out.device)
        lp = fn(rollouts.input_ids[rows], rollouts.attention_mask[rows], rollouts.completion_mask[rows])
        out[rows] = lp.to(out.device, torch.float32)
    return out * rollouts.completion_mask, len(chunks)


@torch.no_grad()
def reference_logprobs(reference, rollouts: Rollouts, micro_batch_size: int = DEFAULT_MICRO_BATCH,
                    check_temperature: bool = True) -> tuple[torch.Tensor, int]:
    """``([B, T] float32, calls)``: the reference's log-probs of the completion tokens."""
    if check_temperature:
        check_reference_temperature(reference, rollouts.temperature)
    return _score(reference.logprobs, rollouts, micro_batch_size)


@torch.no_grad()
def policy_logprobs(policy: nn.Module, rollouts: Rollouts, micro_batch_size: int = DEFAULT_MICRO_BATCH,
                 **kwargs) -> tuple[torch.Tensor, int]:
    """``([B, T] float32, calls)``: the (old) policy's log-probs at the sampling temperature, no grad."""
    def fn(ids, attn, score):
        return model_logprobs(policy, ids, attn, score, temperature=rollouts.temperature, **kwargs)

    return _score(fn, rollouts, micro_batch_size)


def score_rollouts(policy: nn.Module, reference, rollouts: Rollouts, *, need_old: bool, beta: float,
                   micro_batch_size: int = DEFAULT_MICRO_BATCH) -> ScoredRollouts:
    """Score a rollout batch once: the old policy (if ``need_old``) and the reference (if ``beta != 0``).

    ``beta == 0`` never touches ``reference`` (it may be ``None``); ``beta != 0`` without one is an error.
    """
    if beta != 0 and reference is None:
        raise ConfigError(f"beta={beta} puts a KL to the reference in the loss, but no reference was given; "
                          "pass a Reference (e.g. AdapterDisabled(policy) for a LoRA policy) or set beta=0")
    scored = ScoredRollouts(rollouts, None, None)
    if need_old:
        t = time.perf_counter()
        scored.old_logprobs, scored.old_calls = policy_logprobs(policy, rollouts, micro_batch_size)
        scored.old_time_s = time.perf_counter() - t
    if beta != 0:
        t = time.perf_counter()
        scored.ref_logprobs, scored.ref_calls = reference_logprobs(reference, rollouts, micro_batch_size)
        scored.ref_time_s = time.perf_counter() - t
    return scored


# ------------------------------------------------------------------------------------------ exact KL
@contextlib.contextmanager
def reference_model(reference) -> Iterator[nn.Module | None]:
    """The module that computes ``reference``'s distribution, set up as the reference (or ``None``).

    Frozen -> its model; AdapterDisabled / PEFT Synced -> the policy with adapters off or the
    reference adapter active; a full Synced -> its frozen copy. Remote, Precomputed: ``None`` (their
    full distribution is not available here).
    """
    from ..reference.peft_policy import reference_view

    frozen = getattr(reference, "frozen", None)
    lora = getattr(reference, "lora", None)
    if frozen is not None:
        reference = frozen
    if type(reference).__name__ == "Frozen":
        yield reference.model
    elif type(reference).__name__ == "AdapterDisabled":
        with reference_view(reference.policy, reference.adapter_name):
            yield reference.policy
    elif lora is not None:
        with reference_view(reference.policy, lora.ref_name):
            yield reference.policy
    else:
        yield None


def _backbone_rows(model: nn.Module, ids, attn, score) -> tuple[torch.Tensor, nn.Module]:
    """Final hidden states ``[N, H]`` at the positions predicting the tokens ``model_logprobs`` scores."""
    from ..logprobs.model import shifted_hidden_states, validate_batch

    causal = unwrap_causal_lm(model)
    attn, scored = validate_batch(ids, attn, score)
    return shifted_hidden_states(causal, ids, attn)[scored[:, 1:]], causal


def _token_kl(c_pol, head_p, h_pol, reference, c_ref, head_r, h_ref, temperature: float,
              row_chunk: int) -> torch.Tensor:
    """``[N]`` KL per row: :func:`refmodel.kl.exact` (vocabulary tiles) for linear heads, LoRA on the head
    included; a row-chunked full softmax (:func:`~refmodel.logprobs.model.head_log_softmax`) for heads that run
    only as a module (DoRA, quantized).

    Runs outside ``reference``'s view, where the policy is itself (an ``AdapterDisabled`` reference is the
    policy's own module with its adapters off): ``head_p`` / ``head_r`` were read in their own settings, and the
    reference's full softmax runs inside its view again.
    """
    from ..losses.kl_exact import exact

    if head_p is not None and head_r is not None:
        return exact(h_pol, head_p, h_ref, head_r, temperature=temperature)
    parts = []
    for lo in range(0, h_pol.shape[0], row_chunk):
        lp = head_log_softmax(c_pol, h_pol[lo:lo + row_chunk], temperature=temperature)
        with reference_model(reference):
            lq = head_log_softmax(c_ref, h_ref[lo:lo + row_chunk], temperature=temperature).to(lp.device)
        parts.append((lp.exp() * (lp - lq)).sum(-1))
    return torch.cat(parts) if parts else h_pol.new_zeros(0)


@torch.no_grad()
def exact_kl(policy: nn.Module, reference, rollouts: Rollouts, micro_batch_size: int = DEFAULT_MICRO_BATCH,
             row_chunk: int = 1024) -> float:
    """Mean over completion tokens of the full-vocabulary ``KL(pi(.|prefix) || pi_ref(.|prefix))`` (nats).

    Sum over the whole vocabulary at every completion position (no estimator, no sampling noise),
    at the rollouts' temperature, through :func:`refmodel.kl.exact` (vocabulary tiles; never ``[B, T, V]``),
    or row chunks of ``row_chunk`` for a head that is not a linear map (DoRA, quantized). ``nan`` when
    the reference's weights are not local (Remote, Precomputed).
    """
    total, count = 0.0, 0
    temperature = rollouts.temperature
    for rows in _micro_batches(rollouts.batch_size, micro_batch_size):
        sub = rollouts.select(rows)
        args = (sub.input_ids, sub.attention_mask, sub.completion_mask)
        was = policy.training
        policy.eval()  # no dropout, in the backbone nor in a LoRA adapter on the head
        try:
            with torch.no_grad():
                kl = _exact_kl_rows(policy, reference, args, temperature, row_chunk)
        finally:
            policy.train(was)
        if kl is None:
            return float("nan")
        total += float(kl.double().sum())
        count += int(kl.shape[0])
    return total / max(count, 1)


def _exact_kl_rows(policy: nn.Module, reference, args, temperature: float, row_chunk: int) -> torch.Tensor | None:
    """``[N]`` exact KL per scored row of one micro-batch; ``None`` when the reference has no local weights.

    Both models run inside their own hooked forwards (:func:`~refmodel.logprobs.model.run_in_forward`), so a
    policy or reference sharded by FSDP2 or DeepSpeed ZeRO-3 (or wrapped in DDP) is gathered by its framework
    one layer at a time, as in its own forward, and the heads are read while their forwards are open (a head
    read after its forward ended would be a freed shard). A reference that is the policy's own module
    (adapter off, a PEFT ``Synced``) runs inside the policy's forward; a separate one (``Frozen``, a full
    ``Synced``) in its own, nested in the policy's.
    """
    from ..logprobs.model import run_in_forward, wrapper_chain

    def policy_side() -> torch.Tensor | None:
        h_pol, c_pol = _backbone_rows(policy, *args)
        # read before the reference's view, which may switch the policy's own adapters off (AdapterDisabled)
        head_p = LMHead.from_model_or_none(c_pol)
        with reference_model(reference) as ref_model:
            if ref_model is None:
                return None
            ref_args = [a.to(next(ref_model.parameters()).device) for a in args]
            if unwrap_causal_lm(ref_model) is not c_pol:  # a separate model: its forward, nested in the policy's
                def reference_side() -> torch.Tensor:
                    h_ref, c_ref = _backbone_rows(ref_model, *ref_args)
                    return _token_kl(c_pol, head_p, h_pol, reference, c_ref, LMHead.from_model_or_none(c_ref),
                                     h_ref.to(h_pol.device), temperature, row_chunk)

                return run_in_forward(wrapper_chain(ref_model), reference_side)
            h_ref, c_ref = _backbone_rows(ref_model, *ref_args)
            head_r = LMHead.from_model_or_none(c_ref)
        # the policy's own module: outside the view, where the policy is itself again (see _token_kl)
        return _token_kl(c_pol, head_p, h_pol, reference, c_ref, head_r, h_ref.to(h_pol.device), temperature,
                         row_chunk)

    return run_in_forward(wrapper_chain(policy), policy_side)


def reference_drift(reference, baseline, rollouts: Rollouts,
                    micro_batch_size: int = DEFAULT_MICRO_BATCH) -> dict[str, float]:
    """How far ``reference``'s completion log-probs are from ``baseline``'s (e.g. a quantized copy vs fp32).

    Returns ``{max_abs, mean_abs, seq_max_abs}`` in nats: per-token max and mean ``|dlogp|`` and the
    largest per-sequence ``|dsum|``.
    """
    a, _ = reference_logprobs(reference, rollouts, micro_batch_size)
    b, _ = reference_logprobs(baseline, rollouts, micro_batch_size)
    d = (a - b).abs() * rollouts.completion_mask
    n = int(rollouts.completion_mask.sum())
    return {"max_abs": float(d.max()) if n else 0.0, "mean_abs": float(d.sum()) / max(n, 1),
            "seq_max_abs": float(((a - b) * rollouts.completion_mask).sum(1).abs().max()) if n else 0.0}


__all__ = ["DEFAULT_MICRO_BATCH", "ScoredRollouts", "check_reference_temperature", "exact_kl", "needs_old_logprobs",
           "policy_logprobs", "reference_drift", "reference_logprobs", "reference_model", "score_rollouts"]
