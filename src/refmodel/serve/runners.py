"""Load the allow-listed models at start-up and run padded batches of checked sequences.

Causal LMs come through the model cache (:class:`refmodel.models.cache.ReferenceModelCache`), whose registry
is exactly the server's allow-list; reward models (sequence classification, one label) load through the
same safe loader (:func:`refmodel.models.loading.load_model`: safetensors only, never the folder's own
code). No path or hub id ever comes from a request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..data.collate import pad
from ..errors import ConfigError, RefModelError
from ..logprobs.model import model_logprobs, position_ids_from_mask
from ..models.fingerprint import finish_fingerprint, weights_digest
from ..models.limits import position_limit
from .validate import Sequence

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """A loaded model and what ``GET /v1/models`` says about it."""

    name: str
    kind: str  # "logprobs" | "rewards"
    model: torch.nn.Module
    fingerprint: str
    vocab_size: int
    dtype: str
    parameters: int
    device: torch.device
    # (value, config field) from refmodel.models.limits.position_limit, e.g. (256, "max_position_embeddings"):
    # the limit precompute checks too; None when the config names none
    position_limit: tuple[int, str] | None = None
    digest: Any = None  # the weights' running hash, finished once per requested temperature
    _fingerprints: dict = field(default_factory=dict, repr=False)

    def fingerprint_at(self, temperature: float = 1.0) -> str:
        """The fingerprint of this model's log-probs at ``temperature`` (the plain one at 1.0: the identity
        rule of :func:`refmodel.models.fingerprint.fingerprint_settings`, like every other path)."""
        if self.digest is None:
            return self.fingerprint
        if temperature not in self._fingerprints:
            self._fingerprints[temperature] = finish_fingerprint(self.digest, temperature=temperature)
        return self._fingerprints[temperature]

    def run(self, seqs: list[Sequence]) -> list:
        """Run one batch: per-sequence float32 log-prob arrays, or per-sequence float scores."""
        return run_logprobs(self, seqs) if self.kind == "logprobs" else run_rewards(self, seqs)


def _pad(seqs: list[Sequence], device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Right-pad to the longest row: ids 0, masks False there (positions come from the mask).

    Masks are None when no row needs them (same length, no masks): the model then stays on its
    causal fast path.
    """
    length = max(s.ids.numel() for s in seqs)
    same_length = all(s.ids.numel() == length for s in seqs)
    if same_length and all(s.attn is None and s.score is None for s in seqs):
        return torch.stack([s.ids for s in seqs]).to(device), None, None
    ids = pad([s.ids for s in seqs], 0)
    attn_rows = [torch.ones(s.ids.numel(), dtype=torch.bool) if s.attn is None else s.attn.bool() for s in seqs]
    attn = pad(attn_rows, False, dtype=torch.bool)
    score = pad([a if s.score is None else s.score for a, s in zip(attn_rows, seqs, strict=True)], False,
                dtype=torch.bool)
    return ids.to(device), attn.to(device), score.to(device)


def run_logprobs(served: ServedModel, seqs: list[Sequence]) -> list[np.ndarray]:
    """``model_logprobs`` of a padded batch, cut back to each sequence's own length (float32).

    Sequences asked at different temperatures (merged from several requests) run as one sub-batch each.
    """
    temperatures = {s.temperature for s in seqs}
    if len(temperatures) > 1:
        out: list = [None] * len(seqs)
        for t in temperatures:
            idx = [i for i, s in enumerate(seqs) if s.temperature == t]
            for i, row in zip(idx, run_logprobs(served, [seqs[i] for i in idx]), strict=True):
                out[i] = row
        return out
    temperature = seqs[0].temperature if seqs else 1.0
    ids, attn, score = _pad(seqs, served.device)
    if attn is not None and bool(attn.all()):  # all-ones masks sent explicitly: same fast path
        assert score is not None  # _pad returns both masks or neither
        attn, score = None, None if bool(score.all()) else score
    with torch.inference_mode():
        lp = model_logprobs(served.model, ids, attn, score, temperature=temperature).float().cpu().numpy()
    return [lp[i, :s.ids.numel()] for i, s in enumerate(seqs)]


def run_rewards(served: ServedModel, seqs: list[Sequence]) -> list[float]:
    """The reward head's output at each sequence's last real token (float)."""
    ids, attn, _ = _pad(seqs, served.device)
    if attn is None:
        attn = torch.ones_like(ids, dtype=torch.bool)
    model: Any = served.model  # a transformers *ForSequenceClassification: base_model, score
    with torch.inference_mode():
        hidden = model.base_model(input_ids=ids, attention_mask=attn.long(),
                                  position_ids=position_ids_from_mask(attn), use_cache=False)[0]
        positions = torch.arange(ids.shape[1], device=ids.device)
        last = (positions * attn).argmax(dim=1)
        rows = hidden[torch.arange(len(seqs), device=ids.device), last]
        scores = model.score(rows)[:, 0].float().cpu()
    return scores.tolist()


def _describe(name: str, kind: str, model: torch.nn.Module, device) -> ServedModel:
    config: Any = model.config  # a transformers PretrainedConfig
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    first = next(model.parameters())
    digest = weights_digest(model.state_dict().items())
    return ServedModel(name=name, kind=kind, model=model, fingerprint=finish_fingerprint(digest),
                       vocab_size=int(cfg.vocab_size), dtype=str(first.dtype).removeprefix("torch."),
                       parameters=sum(p.numel() for p in model.parameters()), device=first.device,
                       position_limit=position_limit(model), digest=digest)


def load_logprob_models(models: dict[str, str], device: str) -> tuple[Any, dict[str, ServedModel]]:
    """Load every allow-listed causal LM through the model cache; returns ``(cache, {name: model})``."""
    if not models:
        return None, {}
    from ..models.cache import ReferenceModelCache

    cache = ReferenceModelCache(max_models=len(models), device=device, registry=dict(models))
    served = {}
    for name in models:
        model = cache.get_or_load(name)
        served[name] = _describe(name, "logprobs", model, device)
        log.info("serving %s from %s: %s, %d parameters, fingerprint %s", name, models[name],
                 served[name].dtype, served[name].parameters, served[name].fingerprint)
    return cache, served


def load_reward_model(name: str, path: str, device: str) -> ServedModel:
    """Load a one-label sequence-classification model from a local safetensors checkpoint."""
    from ..models.loading import load_model

    try:
        model = load_model(path, task="sequence-classification", device=device, what=f"reward model {name!r}")
    except (OSError, ValueError) as exc:
        if isinstance(exc, RefModelError):
            raise
        raise ConfigError(f"cannot load reward model {name!r} from {path}: {exc}") from exc
    config: Any = model.config  # a transformers PretrainedConfig
    if config.num_labels != 1 or not hasattr(model, "score"):
        raise ConfigError(f"reward model {name!r} must be a *ForSequenceClassification with num_labels=1 "
                          f"and a `score` head, got {type(model).__name__} with {config.num_labels} labels")
    served = _describe(name, "rewards", model, device)
    log.info("serving reward model %s from %s, fingerprint %s", name, path, served.fingerprint)
    return served


def warm_up(served: ServedModel) -> None:
    """One small batch so that the first request does not pay for lazy initialisation."""
    n = min(4, served.vocab_size)
    served.run([Sequence(torch.arange(n)), Sequence(torch.arange(n))])


__all__ = ["ServedModel", "load_logprob_models", "load_reward_model", "run_logprobs", "run_rewards",
           "warm_up"]
