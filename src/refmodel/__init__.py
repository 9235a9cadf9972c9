"""refmodel: the reference model for LLM preference and RL training, cheap, exact and shareable.

``import refmodel`` touches no GPU, network or environment variable; heavy optional parts are
imported on first use.
"""

from . import losses  # noqa: E402  (torch only)
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
    StoreCorrupt,
    StoreMiss,
    Unauthorized,
)
from .logprobs.head import TokenLogprobs, naive_token_logprobs, token_logprobs  # noqa: E402
from .logprobs.model import head_logprobs, model_logprobs  # noqa: E402
from .losses import kl  # noqa: E402
from .models.cache import (  # noqa: E402
    ModelRegistry,
    ReferenceModelCache,
    get_global_reference_cache,
    load_reference_model,
)
from .models.fingerprint import fingerprint  # noqa: E402
from .models.quantize import QUANT_MODES, quantize_model  # noqa: E402
from .precompute.config import PrecomputeConfig  # noqa: E402
from .precompute.job import precompute  # noqa: E402
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
    "StoreMiss",
    "Unauthorized",
    "TokenLogprobs",
    "ModelRegistry",
    "QUANT_MODES",
    "ReferenceModelCache",
    "get_global_reference_cache",
    "load_reference_model",
    "quantize_model",
    "LogprobStore",
    "key_of",
    "precompute",
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
]


def __getattr__(name: str):
    # ReferenceClient needs httpx (extra "serve"): import it on first use, not with the package.
    if name == "ReferenceClient":
        from .remote.client import ReferenceClient

        return ReferenceClient
    raise AttributeError(f"module 'refmodel' has no attribute {name!r}")
