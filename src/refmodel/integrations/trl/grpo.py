"""``GRPOTrainer``: TRL's ``GRPOTrainer`` with a refmodel reference (``reference=``).

Same name, arguments and behaviour as ``trl.GRPOTrainer``, plus ``reference=`` (see
:mod:`refmodel.integrations.trl.dpo`). TRL then builds no reference model (it would load a second copy
and run a full-logits forward per generation batch); once per generation batch, the reference
log-probs of the sampled completions come from refmodel, on TRL's own ``prompt + completion`` ids:

- at the sampling temperature ``args.temperature`` (TRL divides the policy's logits by it, so the
  reference must too, or the k3 KL is spurious: refmodel checks that the reference's temperature
  equals it; ``Remote(..., temperature=)`` asks the service for it);
- only the completion positions are scored, so prompt tokens never enter the head.

With ``sync_ref_model=True`` on a PEFT model (refused by TRL) the reference is refmodel's ``Synced``
LoRA adapter, updated with TRL's ``ref_model_sync_steps`` / ``ref_model_mixup_alpha``.

Positions: refmodel derives position ids from the attention mask, TRL's forward uses ``0..T-1`` for
its left-padded prompts. With rotary embeddings (Llama, Qwen, Mistral, ...) attention depends only
on position differences, so the two agree to float rounding; models with absolute position
embeddings (GPT-2) see the shifted positions in TRL's policy pass only.
"""

from __future__ import annotations

import torch
import trl

from ...errors import ConfigError
from ...reference.peft_policy import is_peft_model
from ._reference import patched
from ._trainer import RefmodelTrainerMixin, bind_arguments, default_config


class _ReferenceStandIn:
    """Takes the place of TRL's ``self.ref_model``: TRL hands it to ``_get_per_token_logps_and_entropies``,
    which this trainer answers with refmodel. Calling it as a model is a bug, and says so."""

    def __init__(self, runner):
        self.runner = runner

    def __call__(self, *args, **kwargs):
        raise RuntimeError("refmodel's GRPOTrainer: TRL tried to run its reference model directly; the reference "
                           "is answered by refmodel in _get_per_token_logps_and_entropies (please report this)")

    def __repr__(self) -> str:
        return f"refmodel reference {self.runner.reference!r}"


class GRPOTrainer(RefmodelTrainerMixin, trl.GRPOTrainer):
    """``trl.GRPOTrainer`` whose reference is refmodel's (see the module docstring).

    Args:
        *args, **kwargs: exactly ``trl.GRPOTrainer``'s.
        reference: a refmodel reference at the sampling temperature, a ``ReferenceConfig`` (its
            temperature is taken from ``args.temperature``), or a service URL.
        kl_threshold: nats; :class:`RefmodelCallback` warns once when TRL's logged ``kl`` exceeds it.
    """

    def __init__(self, *args, reference=None, kl_threshold: float | None = None, **kwargs):
        bound = bind_arguments(trl.GRPOTrainer.__init__, self, args, kwargs)
        cfg = bound["args"] or default_config(trl.GRPOConfig, bound["model"], "GRPO")
        bound["args"] = cfg
        if reference is not None and cfg.beta == 0.0:
            raise ConfigError("GRPOTrainer: beta=0.0 means no KL term, so the reference would never be used; "
                              "set beta > 0 (e.g. 0.04) or drop reference=")
        mode = self._refmodel_plan(reference, cfg, bound, "GRPOTrainer")
        self._refmodel_mode = mode
        if mode is None:
            super().__init__(**bound)
            return
        beta = cfg.beta
        # A full model: beta=0.0 during TRL's __init__, so that TRL loads no reference copy. A PEFT model
        # gets none anyway, and keeps beta so that TRL copies a pretrained adapter to "ref" as it would.
        peft = bound.get("peft_config") is not None or is_peft_model(bound["model"])
        with patched(cfg, beta=beta if peft else 0.0, sync_ref_model=False):
            super().__init__(**bound)
        self.beta = beta
        ref = self._refmodel_build(mode, reference, cfg, temperature=float(cfg.temperature), who="GRPOTrainer")
        self._refmodel_attach(ref, kl_threshold=kl_threshold)
        self.ref_model = _ReferenceStandIn(self._refmodel_runner)  # type: ignore[assignment]

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        if not isinstance(model, _ReferenceStandIn):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal)
        given = sorted(k for k, v in multimodal.items() if v is not None and k != "num_images")
        if given:
            raise ConfigError(f"GRPOTrainer: refmodel references score text only, but this batch has {given}; "
                              "use TRL's own reference for vision-language models (reference=None)")
        score = completion_score_mask(attention_mask, logits_to_keep)
        rows = input_ids.shape[0]
        names = [f"completion {i} of this generation batch" for i in range(rows)]
        per_token = model.runner.logprobs(input_ids, attention_mask, score, names)
        return per_token[:, -logits_to_keep:], None, None


def completion_score_mask(attention_mask: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
    """``[B, T]`` bool: real tokens among the last ``logits_to_keep`` positions (GRPO's completions)."""
    score = attention_mask.bool().clone()
    score[:, : attention_mask.shape[1] - logits_to_keep] = False
    return score


__all__ = ["GRPOTrainer", "completion_score_mask"]
