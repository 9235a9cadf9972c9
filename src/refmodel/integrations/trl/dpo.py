"""``DPOTrainer``: TRL's ``DPOTrainer`` with a refmodel reference (``reference=``).

Same name, arguments and behaviour as ``trl.DPOTrainer``, plus:

- ``reference=``: any refmodel reference (``Precomputed`` / a store path, ``Remote`` / a service URL,
  ``Frozen`` incl. quantized, ``AdapterDisabled``, ``Synced``) or a ``ReferenceConfig``. TRL then loads
  no reference model and runs no reference forward; each step, the reference log-probs of TRL's own
  collated (tokenized, truncated, padded) ``[2B, T]`` batch come from refmodel and enter TRL's loss
  as its precomputed ``ref_chosen_logps`` / ``ref_rejected_logps`` (sums over the completion tokens,
  LD-weighted when ``ld_alpha`` is set, exactly as TRL sums its own).
- ``sync_ref_model=True`` on a PEFT model (which TRL refuses): the reference is refmodel's ``Synced``
  LoRA reference adapter (exact rank concatenation; bound it with
  ``reference=ReferenceConfig(sync_ref_model=True, max_rank=k)``), updated every
  ``ref_model_sync_steps`` optimizer steps with ``ref_model_mixup_alpha``, TRL's rule.
- a dataset that already has ``ref_chosen_logps`` and ``ref_rejected_logps`` columns (what
  ``refmodel store export-trl`` writes): used as the reference, no reference model is loaded.
"""

from __future__ import annotations

import torch
import trl

from ._reference import patched
from ._trainer import AfterTrainerInit, RefmodelTrainerMixin

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def sequence_logps(per_token: torch.Tensor, completion_mask: torch.Tensor, ld_alpha: float | None) -> torch.Tensor:
    """``[2B]`` sums of ``per_token`` ``[2B, T]`` (aligned as ``model_logprobs``) as TRL's DPO sums them.

    TRL sums the shifted per-token log-probs over the completion; with ``ld_alpha`` (LD-DPO, Liu et
    al. 2024) the tokens past the shorter completion of each pair are weighted by ``ld_alpha``
    (``trl/trainer/dpo_trainer.py``, ``_compute_loss``).
    """
    logps = per_token[:, 1:]
    if ld_alpha is None:
        return logps.sum(dim=1)
    shift_mask = completion_mask[:, 1:]
    comp_pos = shift_mask.cumsum(dim=1)
    chosen_lens, rejected_lens = shift_mask.sum(dim=1).long().chunk(2, dim=0)
    shared = torch.minimum(chosen_lens, rejected_lens)
    shared = torch.cat([shared, shared], dim=0).to(logps.device)
    shared_mask = (comp_pos > 0) & (comp_pos <= shared.unsqueeze(1))
    tail_mask = comp_pos > shared.unsqueeze(1)
    return (logps * shared_mask).sum(dim=1) + ld_alpha * (logps * tail_mask).sum(dim=1)


class DPOTrainer(RefmodelTrainerMixin, trl.DPOTrainer, AfterTrainerInit):
    """``trl.DPOTrainer`` whose reference is refmodel's (see the module docstring).

    Args:
        *args, **kwargs: exactly ``trl.DPOTrainer``'s.
        reference: a refmodel reference, a ``ReferenceConfig``, a store path or a service URL; ``None``
            keeps TRL's own reference (except PEFT + ``sync_ref_model`` and ``ref_*_logps`` columns).
    """

    def __init__(self, *args, reference=None, **kwargs):
        mode, cfg, _ = self._refmodel_init_precomputing(trl.DPOTrainer, trl.DPOConfig, "DPO", args, kwargs,
                                                        reference, REF_COLUMNS)
        if mode not in (None, "columns"):
            ref = self._refmodel_build(mode, reference, cfg, temperature=1.0, who="DPOTrainer")
            hint = f" (max_length={cfg.max_length}, truncation_mode={cfg.truncation_mode!r})"
            self._refmodel_attach(ref, hint=hint)

    def _compute_loss(self, model, inputs, return_outputs):
        if self._refmodel_mode is None:
            return super()._compute_loss(model, inputs, return_outputs)
        if self._refmodel_runner is not None:
            inputs = dict(inputs)
            ids, attn, comp = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
            pairs = ids.shape[0] // 2
            names = [f"chosen of pair {i}" for i in range(pairs)] + [f"rejected of pair {i}" for i in range(pairs)]
            score = comp.bool() & attn.bool()
            if self.ld_alpha is None:  # plain sums: a store's exact float32 sums where it has them
                sums = self._refmodel_runner.sequence_logps(ids, attn, score, names)
            else:
                sums = sequence_logps(self._refmodel_runner.logprobs(ids, attn, score, names), comp, self.ld_alpha)
            ref_chosen, ref_rejected = sums.chunk(2, dim=0)
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref_chosen, ref_rejected
        with patched(self, precompute_ref_logps=True):
            return super()._compute_loss(model, inputs, return_outputs)


__all__ = ["DPOTrainer", "sequence_logps"]
