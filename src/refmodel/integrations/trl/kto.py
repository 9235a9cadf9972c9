"""``KTOTrainer``: TRL's ``KTOTrainer`` with a refmodel reference (``reference=``).

Same name, arguments and behaviour as ``trl.KTOTrainer``, plus ``reference=`` (see
:mod:`refmodel.integrations.trl.dpo`). The reference covers both sequences TRL scores per example: the
completion (``input_ids``) and, when the loss estimates the KL term, TRL's KL completion
(``KL_input_ids``: the in-batch mismatched pair, prompt ``x_i`` with completion ``y_{i-1}``), from a
store (precompute both with the trainer's batch size) or live. They enter TRL's loss as its precomputed
``ref_logps`` / ``ref_KL_logps``. A dataset with a ``ref_logps`` column (``refmodel store export-trl``)
is used as the reference when the loss needs no KL term.
"""

from __future__ import annotations

import trl

from ...errors import ConfigError
from ._reference import patched
from ._trainer import AfterTrainerInit, RefmodelTrainerMixin, dataset_columns


class KTOTrainer(RefmodelTrainerMixin, trl.KTOTrainer, AfterTrainerInit):
    """``trl.KTOTrainer`` whose reference is refmodel's (see the module docstring).

    Args:
        *args, **kwargs: exactly ``trl.KTOTrainer``'s.
        reference: a refmodel reference, a ``ReferenceConfig``, a store path or a service URL.
    """

    def __init__(self, *args, reference=None, **kwargs):
        mode, cfg, bound = self._refmodel_init_precomputing(trl.KTOTrainer, trl.KTOConfig, "KTO", args, kwargs,
                                                            reference, ("ref_logps",))
        if mode is None:
            return
        if mode == "columns":
            if self.calculate_KL and "ref_KL_logps" not in dataset_columns(bound["train_dataset"]):
                raise ConfigError(f"KTOTrainer: the dataset has a ref_logps column but loss_type={cfg.loss_type!r} "
                                  "also needs the reference log-probs of TRL's KL completions (the in-batch "
                                  "mismatched pairs), which depend on the batch; pass reference=STORE_PATH (or a "
                                  "live reference) instead of the exported column")
            return
        ref = self._refmodel_build(mode, reference, cfg, temperature=1.0, who="KTOTrainer")
        self._refmodel_attach(ref, hint=f" (max_length={cfg.max_length})")

    def _compute_loss(self, model, inputs, return_outputs):
        if self._refmodel_mode is None:
            return super()._compute_loss(model, inputs, return_outputs)
        if self._refmodel_runner is not None:
            inputs = dict(inputs)
            inputs["ref_logps"] = self._ref_sums(inputs, "", "completion")
            if self.calculate_KL:
                inputs["ref_KL_logps"] = self._ref_sums(inputs, "KL_", "KL completion")
        with patched(self, precompute_ref_logps=True):
            return super()._compute_loss(model, inputs, return_outputs)

    def _ref_sums(self, inputs, prefix: str, what: str):
        """``[B]`` reference sums over the completion tokens, as TRL sums its own (``compute_ref_log_probs``)."""
        ids, attn = inputs[f"{prefix}input_ids"], inputs[f"{prefix}attention_mask"]
        comp = inputs[f"{prefix}completion_mask"]
        names = [f"{what} of example {i}" for i in range(ids.shape[0])]
        runner = self._refmodel_runner
        assert runner is not None  # only called with a refmodel reference
        return runner.sequence_logps(ids, attn, comp.bool() & attn.bool(), names)


__all__ = ["KTOTrainer"]
