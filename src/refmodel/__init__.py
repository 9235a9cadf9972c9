"""refmodel: the reference model for LLM preference and RL training, cheap, exact and shareable.

The public API, by job (everything else is importable from its module):

- Log-probs: :func:`token_logprobs` (hidden states and an LM head, fused: no ``[B, T, V]`` logits),
  :func:`model_logprobs` / :func:`head_logprobs` (any Hugging Face causal LM, PEFT included),
  :class:`LMHead` (a model's head with its logit transform and LoRA folded in).
- References, one interface (:class:`Reference`): :class:`Frozen`, :class:`AdapterDisabled`,
  :class:`Precomputed`, :class:`Synced`, :class:`Remote`, :class:`ReferenceFree`; :class:`ReferenceConfig`
  and :func:`auto` to choose one; :func:`refmodel.reference.resolve` turns any ``reference=`` argument
  into one.
- Store and precompute: :class:`LogprobStore`, :func:`precompute` with :class:`PrecomputeConfig`.
- The reference service's client: :class:`ReferenceClient` (extra ``serve``; ``refmodel serve`` is the
  server).
- Models: :func:`fingerprint`, :class:`ReferenceModelCache` and :func:`get_global_reference_cache`.
- Namespaces: :mod:`refmodel.losses` (every loss: DPO family, KTO, ORPO, SimPO, the GRPO/PPO policy
  losses, advantages), :mod:`refmodel.kl` (estimators, exact KL, monitor, controllers), :mod:`refmodel.rl`
  (rollouts, scoring, ``forward_backward``).
- Errors: :class:`RefModelError`, the base of everything in :mod:`refmodel.errors`.

TRL: :mod:`refmodel.integrations.trl` has ``DPOTrainer``, ``KTOTrainer`` and ``GRPOTrainer`` that take any
refmodel reference (``reference=``), and a callback for the metrics.

``import refmodel`` touches no GPU, network or environment variable; heavy optional parts are
imported on first use.
"""

from __future__ import annotations

from typing import Any

from . import kl, losses, rl
from ._deprecation import moved_attribute
from ._version import __version__
from .errors import RefModelError
from .logprobs.head import token_logprobs
from .logprobs.lm_head import LMHead
from .logprobs.model import head_logprobs, model_logprobs
from .models.cache import ReferenceModelCache, get_global_reference_cache
from .models.fingerprint import fingerprint
from .precompute.config import PrecomputeConfig
from .precompute.job import precompute
from .reference import (  # imports no peft/fastapi/httpx; Remote stays lazy
    AdapterDisabled,
    Frozen,
    Precomputed,
    Reference,
    ReferenceConfig,
    ReferenceFree,
    Synced,
    auto,
)
from .store import LogprobStore

__all__ = [
    "__version__",
    # log-probs
    "token_logprobs",
    "model_logprobs",
    "head_logprobs",
    "LMHead",
    # references
    "Reference",
    "ReferenceConfig",
    "auto",
    "Frozen",
    "AdapterDisabled",
    "Precomputed",
    "Synced",
    "Remote",
    "ReferenceFree",
    # store and precompute
    "LogprobStore",
    "PrecomputeConfig",
    "precompute",
    # the service's client
    "ReferenceClient",
    # models
    "fingerprint",
    "ReferenceModelCache",
    "get_global_reference_cache",
    # namespaces
    "losses",
    "kl",
    "rl",
    # errors
    "RefModelError",
]

# Names this package exported before 0.2, each with its home now: they still work, with a FutureWarning.
_MOVED = {
    **{name: f"refmodel.errors.{name}" for name in (
        "ConfigError", "DataFormatError", "FingerprintMismatch", "InvalidBatch", "InvalidInput",
        "MissingDependency", "ModelNotAllowed", "RequestTooLarge", "ServiceError", "ServiceOverloaded",
        "StorageError", "StoreCorrupt", "StoreMiss", "Unauthorized")},
    "TokenLogprobs": "refmodel.logprobs.head.TokenLogprobs",
    "naive_token_logprobs": "refmodel.logprobs.head.naive_token_logprobs",
    "ModelRegistry": "refmodel.models.cache.ModelRegistry",
    "load_reference_model": "refmodel.models.cache.load_reference_model",
    "load_model": "refmodel.models.loading.load_model",
    "load_tokenizer": "refmodel.models.loading.load_tokenizer",
    "QUANT_MODES": "refmodel.models.quantize.QUANT_MODES",
    "quantize_model": "refmodel.models.quantize.quantize_model",
    "position_limit": "refmodel.models.limits.position_limit",
    "key_of": "refmodel.store.key_of",
    "repair_store": "refmodel.precompute.job.repair_store",
    "precompute_on_ray": "refmodel.precompute.ray.precompute_on_ray",
    "Example": "refmodel.data.Example",
    "collate_examples": "refmodel.data.collate_examples",
    "load_examples": "refmodel.data.load_examples",
    "tokenize_record": "refmodel.data.tokenize_record",
    **{name: f"refmodel.losses.{name}" for name in (
        "AdaptiveKLController", "FixedKLController", "GAE", "KLPenalizedRewards", "PolicyLoss",
        "fused_policy_loss", "gae_advantages", "group_advantages", "kl_penalized_rewards", "policy_loss",
        "rloo_advantages")},
}


def __getattr__(name: str) -> Any:
    # Remote and ReferenceClient need httpx (extra "serve"): imported on first use, not with the package.
    if name == "ReferenceClient":
        from .remote.client import ReferenceClient

        return ReferenceClient
    if name == "Remote":
        from .reference.remote import Remote

        return Remote
    return moved_attribute(__name__, name, _MOVED)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
