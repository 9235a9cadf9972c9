"""``ReferenceFree``: no pi_ref at all (ORPO, SimPO, GRPO with beta=0)."""

from __future__ import annotations

from ..errors import ConfigError


class ReferenceFree:
    """The reference of a reference-free loss: holds nothing, and refuses to be asked for log-probs."""

    fingerprint = "reference-free"
    memory_bytes = 0

    def logprobs(self, input_ids, attention_mask=None, score_mask=None):
        raise ConfigError(
            "this reference is ReferenceFree: reference-free losses (ORPO, SimPO, GRPO with beta=0) never "
            "need pi_ref log-probs. A reference-based loss (DPO, IPO, KTO, a KL penalty) needs another "
            "strategy: Frozen, AdapterDisabled, Precomputed, Synced or Remote (or ReferenceConfig("
            "reference_free=False) with refmodel.reference.auto)")

    def on_step(self, step: int, policy) -> None:
        """Nothing to keep in step."""

    def __repr__(self) -> str:
        return "ReferenceFree()"


__all__ = ["ReferenceFree"]
