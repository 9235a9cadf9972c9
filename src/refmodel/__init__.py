"""refmodel: the reference model for LLM preference and RL training, cheap, exact and shareable.

``import refmodel`` touches no GPU, network or environment variable; heavy optional parts are
imported on first use.
"""

from . import losses, rl  # noqa: E402  (torch only; rl: rollouts, scoring, forward_backward)
from ._version import __version__
from .data import Example, collate_examples, load_examples, tokenize_record  # noqa: E402
from .errors import (  # noqa: E402
    ConfigError,
    DataFormatError,
    FingerprintMismatch,
    InvalidBatch,
    InvalidInput,
    MissingDependency,
    ModelNotAllowed,
    RefModelError,
    RequestTooLarge,
    ServiceError,
    ServiceOverloaded,
    StorageError,
    StoreCorrupt,
    StoreMiss,
    Unauthorized,
)
from .logprobs.head import TokenLogprobs, naive_token_logprobs, token_logprobs  # noqa: E402
from .logprobs.model import head_logprobs, model_logprobs  # noqa: E402
from .losses import kl  # noqa: E402
from .losses.advantages import GAE, gae_advantages, group_advantages, rloo_advantages  # noqa: E402
from .losses.fused_policy import fused_policy_loss  # noqa: E402
from .losses.kl import AdaptiveKLController, FixedKLController, KLPenalizedRewards, kl_penalized_rewards  # noqa: E402
from .losses.policy import PolicyLoss, policy_loss  # noqa: E402
from .models.cache import (  # noqa: E402
    ModelRegistry,
    ReferenceModelCache,
    get_global_reference_cache,
    load_reference_model,
)
from .models.fingerprint import fingerprint  # noqa: E402
from .models.limits import position_limit  # noqa: E402
from .models.loading import load_model, load_tokenizer  # noqa: E402  (imports transformers only when called)
from .models.quantize import QUANT_MODES, quantize_model  # noqa: E402
from .precompute.config import PrecomputeConfig  # noqa: E402
from .precompute.job import precompute, repair_store  # noqa: E402
from .precompute.ray import precompute_on_ray  # noqa: E402  (imports ray only when called)
from .reference import (  # noqa: E402  (imports no peft/fastapi/httpx; Remote stays lazy)
    AdapterDisabled,
    Frozen,
    Precomputed,
    Reference,
    ReferenceConfig,
    ReferenceFree,
    Synced,
)
from .store import LogprobStore, key_of  # noqa: E402

__all__ = [
    "kl",
    "losses",
    "rl",
    "__version__",
    "ReferenceClient",
    "ConfigError",
    "DataFormatError",
    "FingerprintMismatch",
    "InvalidBatch",
    "InvalidInput",
    "MissingDependency",
    "ModelNotAllowed",
    "RefModelError",
    "RequestTooLarge",
    "ServiceError",
    "ServiceOverloaded",
    "StoreCorrupt",
    "StorageError",
    "StoreMiss",
    "Unauthorized",
    "TokenLogprobs",
    "ModelRegistry",
    "QUANT_MODES",
    "ReferenceModelCache",
    "get_global_reference_cache",
    "load_reference_model",
    "load_model",
    "load_tokenizer",
    "quantize_model",
    "LogprobStore",
    "key_of",
    "precompute",
    "repair_store",
    "position_limit",
    "precompute_on_ray",
    "PrecomputeConfig",
    "Example",
    "collate_examples",
    "load_examples",
    "tokenize_record",
    "fingerprint",
    "head_logprobs",
    "model_logprobs",
    "naive_token_logprobs",
    "token_logprobs",
    "AdapterDisabled",
    "Frozen",
    "Precomputed",
    "Reference",
    "ReferenceConfig",
    "ReferenceFree",
    "Synced",
    "AdaptiveKLController",
    "FixedKLController",
    "GAE",
    "KLPenalizedRewards",
    "PolicyLoss",
    "fused_policy_loss",
    "gae_advantages",
    "group_advantages",
    "kl_penalized_rewards",
    "policy_loss",
    "rloo_advantages",
]


def __getattr__(name: str):
    # ReferenceClient needs httpx (extra "serve"): import it on first use, not with the package.
    if name == "ReferenceClient":
        from .remote.client import ReferenceClient

        return ReferenceClient
    raise AttributeError(f"module 'refmodel' has no attribute {name!r}")
