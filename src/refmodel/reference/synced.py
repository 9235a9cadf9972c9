"""``Synced``: a moving reference (TR-DPO, Gorbatovski et al. 2024, "Learn your reference model for
real good alignment"): every ``ref_model_sync_steps`` optimizer steps,

    theta_ref <- alpha * theta_policy + (1 - alpha) * theta_ref      (alpha = ref_model_mixup_alpha)

on every parameter; ``alpha = 1`` is a hard copy. A full policy gets a frozen copy updated in place.
A PEFT policy gets the reference as its own LoRA adapter on the same base model (no second base
copy), updated exactly; see :mod:`refmodel.reference.lora_sync`.

For RL two schedules more: :meth:`Synced.hard_reset` copies the policy into the reference every
``ref_reset_steps`` steps (ProRL, Liu et al. 2025, "ProRL: Prolonged Reinforcement Learning"), and
:meth:`Synced.per_epoch` copies it at the end of every pass over the prompts (AgileRL's
``reference`` adapter update); both with PEFT too. Every sync changes the fingerprint.
"""

from __future__ import annotations

import logging

import torch

from .. import validation
from ..errors import ConfigError
from ..logprobs.model import model_logprobs
from ..models import sharding, zero3
from ..models.sharding import local_like, local_tensor
from .frozen import Frozen
from .lora_sync import LoraReference
from .peft_policy import (
    is_peft_model,
    reference_fingerprint,
    reference_view,
    require_peft_model,
    require_shared_base_frozen,
)

log = logging.getLogger(__name__)


def check_sync_settings(ref_model_sync_steps, ref_model_mixup_alpha, max_rank=None) -> None:
    """Validate the TR-DPO settings with messages that say what is expected."""
    if isinstance(ref_model_sync_steps, bool) or not isinstance(ref_model_sync_steps, int) \
            or ref_model_sync_steps < 1:
        raise ConfigError(f"ref_model_sync_steps must be an integer >= 1 (optimizer steps between syncs), "
                          f"got {ref_model_sync_steps!r}")
    if not isinstance(ref_model_mixup_alpha, (int, float)) or not 0.0 < float(ref_model_mixup_alpha) <= 1.0:
        raise ConfigError(f"ref_model_mixup_alpha must be in (0, 1] (1 = hard copy of the policy; TRL's default "
                          f"is 0.6), got {ref_model_mixup_alpha!r}; for a reference that never moves use "
                          "sync_ref_model=False")
    if max_rank is not None and (not isinstance(max_rank, int) or max_rank < 1):
        raise ConfigError(f"max_rank must be None (exact, rank grows) or an integer >= 1, got {max_rank!r}")


class Synced:
    """A reference that follows the policy every ``ref_model_sync_steps`` steps (TR-DPO).

    Starts as a copy of the policy at construction. Call ``on_step(global_step, policy)`` after each
    optimizer step; it syncs when ``global_step % ref_model_sync_steps == 0``.

    Args:
        policy: a causal LM, or a ``peft.PeftModel`` (LoRA) whose active adapter is trained.
        ref_model_sync_steps: steps between syncs (TRL default 512).
        ref_model_mixup_alpha: weight of the policy in the mix (TRL default 0.6; 1 = hard copy).
        max_rank: PEFT only: bound on the reference adapter's rank; ``None`` keeps the mix exact and
            lets the rank grow by the policy's rank per soft sync. See ``max_truncation_error``.
        adapter_name: PEFT only: the name of the reference adapter created on the policy.
    """

    def __init__(self, policy, *, ref_model_sync_steps: int = 512, ref_model_mixup_alpha: float = 0.6,
                 max_rank: int | None = None, adapter_name: str = "ref", temperature: float = 1.0,
                 use_fused_linear_logprobs: bool = True, cast_logprobs_to_fp32: bool = True):
        check_sync_settings(ref_model_sync_steps, ref_model_mixup_alpha, max_rank)
        temperature = validation.temperature(temperature, error=ConfigError)
        self.sync_steps = int(ref_model_sync_steps)
        self.alpha = float(ref_model_mixup_alpha)
        self.temperature = float(temperature)
        self.syncs = 0
        self.every_epoch = False  # set by per_epoch(): sync in on_epoch_end, not on_step
        self._last_step: int | None = None
        self._fingerprint: str | None = None
        self._kwargs = dict(use_fused_linear_logprobs=use_fused_linear_logprobs,
                            cast_logprobs_to_fp32=cast_logprobs_to_fp32)
        self.lora: LoraReference | None = None
        self.frozen: Frozen | None = None
        if is_peft_model(policy):
            require_peft_model(policy, "Synced")
            require_shared_base_frozen(policy, "Synced")
            if adapter_name in policy.peft_config:
                raise ConfigError(f"the policy already has an adapter named {adapter_name!r}; pass another "
                                  "adapter_name for the synced reference, or use AdapterDisabled(policy, "
                                  f"adapter_name={adapter_name!r}) to keep that adapter as a fixed reference")
            if len(policy.active_adapters) != 1:
                raise ConfigError(f"Synced needs exactly one active (trained) adapter, got {policy.active_adapters}")
            self.policy = policy
            self.lora = LoraReference(policy, adapter_name, max_rank)
        else:
            if max_rank is not None:
                raise ConfigError("max_rank bounds a LoRA reference adapter; a full policy is synced exactly, "
                                  "so leave max_rank=None")
            self.policy = None
            self.frozen = Frozen.from_policy(policy, temperature=temperature, **self._kwargs)

    @classmethod
    def hard_reset(cls, policy, ref_reset_steps: int, **kwargs) -> Synced:
        """ProRL's reference reset: ``ref <- policy`` (a hard copy) every ``ref_reset_steps`` optimizer steps."""
        return cls(policy, ref_model_sync_steps=ref_reset_steps, ref_model_mixup_alpha=1.0, **kwargs)

    @classmethod
    def per_epoch(cls, policy, **kwargs) -> Synced:
        """AgileRL's schedule: ``ref <- policy`` once per epoch, when the loop calls :meth:`on_epoch_end`."""
        ref = cls(policy, ref_model_sync_steps=1, ref_model_mixup_alpha=1.0, **kwargs)
        ref.every_epoch = True
        return ref

    def shard_like(self, policy) -> bool:
        """Full policy: shard the reference copy like ``policy`` now (see :meth:`Frozen.shard_like`); a LoRA
        reference adapter rides on the policy's own model and needs nothing. True when it sharded."""
        return self.frozen is not None and self.frozen.shard_like(policy)

    def on_epoch_end(self, epoch: int, policy) -> None:
        """Called by a loop after each full pass over its data; syncs only for :meth:`per_epoch`."""
        if self.every_epoch:
            self.sync(policy)

    @property
    def max_truncation_error(self) -> float:
        """Largest relative Frobenius error of a reference delta dropped by ``max_rank`` (0 when exact)."""
        return 0.0 if self.lora is None else self.lora.max_truncation_error

    @property
    def fingerprint(self) -> str:
        if self.frozen is not None:
            return self.frozen.fingerprint
        assert self.lora is not None  # exactly one of frozen / lora is set
        if self._fingerprint is None:
            self._fingerprint = reference_fingerprint(self.policy, self.lora.ref_name, temperature=self.temperature)
        return self._fingerprint

    @property
    def memory_bytes(self) -> int:
        """The full copy's bytes, or the reference adapter's bytes (grows with its rank) for PEFT."""
        if self.frozen is not None:
            return self.frozen.memory_bytes
        assert self.lora is not None  # exactly one of frozen / lora is set
        return self.lora.bytes

    @torch.no_grad()
    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 score_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T]`` float32 log-probs under the current reference."""
        if self.frozen is not None:
            return self.frozen.logprobs(input_ids, attention_mask, score_mask)
        assert self.lora is not None  # exactly one of frozen / lora is set
        # The reference adapter has no gather hooks of its own under ZeRO-3 (added after deepspeed.initialize).
        with reference_view(self.policy, self.lora.ref_name), \
                zero3.full_parameters(self.lora.adapter_modules(self.lora.ref_name)):
            return model_logprobs(self.policy, input_ids, attention_mask, score_mask,
                                  temperature=self.temperature, **self._kwargs)

    def on_step(self, step: int, policy) -> None:
        """Sync when ``step`` (the global optimizer step, 1-based) is a multiple of the sync interval."""
        if self.every_epoch or step <= 0 or step % self.sync_steps or step == self._last_step:
            return
        self.sync(policy)
        self._last_step = step

    @torch.no_grad()
    def sync(self, policy) -> None:
        """Apply ``ref <- alpha * policy + (1 - alpha) * ref`` now."""
        if self.lora is not None:
            if policy is not self.policy:
                raise ConfigError("Synced(PEFT) keeps its reference adapter on the policy it was built with; "
                                  "pass that same policy object to on_step")
            if self.alpha == 1.0:
                self.lora.hard_copy()
            else:
                self.lora.mix(self.alpha)
        else:
            self._sync_full(policy)
        self._fingerprint = None
        self.syncs += 1
        log.debug("synced reference (%d): alpha=%s%s", self.syncs, self.alpha,
                  f", adapter rank {self.lora.rank}" if self.lora is not None else "")

    def _sync_full(self, policy) -> None:
        assert self.frozen is not None  # exactly one of frozen / lora is set
        self.frozen._fingerprint = None
        if self.frozen.model is policy:
            raise ConfigError("the synced reference is the policy object itself; build Synced(policy) once")
        if isinstance(policy, torch.nn.parallel.DistributedDataParallel):
            policy = policy.module
        src = dict(policy.named_parameters())
        dst = dict(self.frozen.model.named_parameters())
        if src.keys() != dst.keys():
            extra = sorted(src.keys() ^ dst.keys())[:3]
            raise ConfigError(f"the policy's parameters do not match the reference's (e.g. {extra}); pass the "
                              "policy this Synced reference was built from")
        if sharding.sharding_kind(self.frozen.model) == "zero3":  # inside the gather, one parameter at a time
            zero3.mix_parameters(self.frozen.model, policy, self.alpha)
            return
        for name, ref in dst.items():
            # Shard to shard (a sharded copy holds the policy's layout: no communication), never a full tensor
            # into a DTensor; a policy sharded after the copy was made is gathered here (a collective).
            pol, mine = local_like(src[name], ref), local_tensor(ref)
            if self.alpha == 1.0:
                mine.copy_(pol)
            else:
                mine.mul_(1.0 - self.alpha).add_(pol, alpha=self.alpha)

    def __repr__(self) -> str:
        kind = f"lora rank {self.lora.rank}" if self.lora is not None else "full copy"
        return f"Synced({kind}, every {self.sync_steps} steps, alpha={self.alpha}, syncs={self.syncs})"


__all__ = ["Synced", "check_sync_settings"]
