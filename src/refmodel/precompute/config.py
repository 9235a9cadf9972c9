"""``PrecomputeConfig``: every precompute setting, each default written once.

:func:`refmodel.precompute`, :func:`refmodel.precompute.ray.precompute_on_ray`, the Ray scorer and ``refmodel precompute``
(whose ``--help`` shows these defaults) all take their settings from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .. import validation
from ..data import DEFAULT_MAX_LENGTH, DEFAULT_TRUNCATION_MODE, check_settings
from ..errors import ConfigError
from ..models.dtypes import DTYPE_NAMES

MODEL_DTYPES: tuple[str, ...] = ("auto", *DTYPE_NAMES)  # "auto": as saved


@dataclass(frozen=True)
class PrecomputeConfig:
    """Settings of one precompute job.

    Tokenization (TRL's names and rule, :mod:`refmodel.data`): ``max_length``, ``truncation_mode``; the
    store then holds exactly the sequences a TRL trainer (or ``refmodel.recipes.train``) with the same
    settings asks for. Storage: ``dtype`` (float32 / bfloat16 / float16 token values; sums are float32
    always). Scoring: ``max_tokens_per_batch`` padded tokens per forward, ``share_prompt`` (one prompt
    pass with a KV cache for all its completions), ``temperature`` (log-probs of ``logits / T``; part of
    the fingerprint when != 1), ``device`` (``cpu``, ``cuda``, ``cuda:N`` or ``auto``: a loaded
    model stays where it is, a model folder goes to CUDA when present; under a launcher ``cuda`` / ``auto``
    mean ``cuda:LOCAL_RANK``; Ray actors use ``gpus_per_worker``), ``model_dtype`` (the weights' dtype when loading a model folder; ``auto``: as saved).
    KTO: ``kto_kl_batch_size`` (``None``: off) also scores the KL completions TRL's ``KTOTrainer`` builds
    with that ``per_device_train_batch_size`` (:func:`refmodel.data.kto_kl_examples`), so that a KTO
    loss with a KL term trains from the store.
    Job: ``shard_examples`` examples per shard (the unit of crash recovery), ``resume``, ``progress``.
    Ray (:func:`refmodel.precompute.ray.precompute_on_ray` only): ``ray_address``, ``num_workers``, ``gpus_per_worker``,
    ``cpus_per_worker``, ``max_task_retries``.
    """

    dtype: str = "bfloat16"
    max_tokens_per_batch: int = 4096
    shard_examples: int = 2048
    temperature: float = 1.0
    share_prompt: bool = True
    max_length: int | None = DEFAULT_MAX_LENGTH
    truncation_mode: str = DEFAULT_TRUNCATION_MODE
    device: str = "auto"
    model_dtype: str = "auto"
    resume: bool = False
    progress: bool = True
    ray_address: str | None = None
    num_workers: int | None = None
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_task_retries: int = 3
    kto_kl_batch_size: int | None = None

    def __post_init__(self):
        from ..errors import InvalidInput
        from ..store.format import normalize_dtype

        try:
            normalize_dtype(self.dtype)
        except InvalidInput as exc:
            raise ConfigError(str(exc)) from None
        check_settings(self.max_length, self.truncation_mode)
        for name in ("max_tokens_per_batch", "shard_examples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        validation.temperature(self.temperature, error=ConfigError)
        if self.model_dtype not in MODEL_DTYPES:
            raise ConfigError(f"unknown model_dtype {self.model_dtype!r}; expected one of {list(MODEL_DTYPES)}")
        if not (self.device in ("cpu", "cuda", "auto") or self.device.startswith("cuda:")):
            raise ConfigError(f"unknown device {self.device!r}; expected cpu, cuda, cuda:N or auto")
        if self.kto_kl_batch_size is not None and self.kto_kl_batch_size < 2:
            raise ConfigError(f"kto_kl_batch_size must be >= 2 (TRL's KTOTrainer refuses a KL term with a batch of "
                              f"one), got {self.kto_kl_batch_size}")
        if self.num_workers is not None and self.num_workers < 1:
            raise ConfigError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ConfigError(f"gpus_per_worker must be >= 0 and cpus_per_worker > 0, got {self.gpus_per_worker}, "
                              f"{self.cpus_per_worker}")

    def with_overrides(self, **overrides) -> PrecomputeConfig:
        """A copy with ``overrides`` (field names) applied; ConfigError naming an unknown field."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown precompute setting(s) {unknown}; PrecomputeConfig has {sorted(names)}")
        return dataclasses.replace(self, **overrides) if overrides else self

    def resolved_device(self, local_rank: int | None = None) -> str:
        """``device`` with ``auto`` resolved (``cuda`` when torch sees a GPU, else ``cpu``).

        ``local_rank``: this process's GPU slot under a launcher (``LOCAL_RANK``): ``cuda`` and ``auto`` then
        mean ``cuda:LOCAL_RANK``, one GPU per rank (an explicit ``cuda:N`` stays as given). ConfigError when
        that GPU does not exist.
        """
        import torch

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device != "cuda" or local_rank is None:
            return device
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ConfigError(f"LOCAL_RANK {local_rank} has no GPU of its own: torch sees {count} CUDA device(s); "
                              "launch at most one process per GPU (--nproc_per_node), or pass --device cpu")
        return f"cuda:{local_rank}"

    def model_kwargs(self) -> dict:
        """``from_pretrained`` keyword arguments implied by ``model_dtype``."""
        if self.model_dtype == "auto":
            return {}
        import torch

        return {"dtype": getattr(torch, self.model_dtype)}


__all__ = ["MODEL_DTYPES", "PrecomputeConfig"]
