"""Request and response bodies of the JSON endpoints (pydantic v2).

Token ids are strict integers (``1.0``, ``"1"`` and ``true`` are rejected); masks accept 0/1.
Shape rules that pydantic cannot express (row lengths, vocabulary range, limits) are checked in
:mod:`refmodel.serve.validate`, which names the offending field.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictInt


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LogprobsRequest(_Body):
    """``input_ids`` ``[B][L_b]`` (rows may differ in length); masks, when given, match row by row.

    ``score_mask`` marks the positions to score; ``score_start`` (one int, or one per row) scores
    positions ``>= score_start`` instead. Neither: every real token is scored.
    """

    model: str = Field(min_length=1, max_length=256)
    input_ids: list[list[StrictInt]]
    attention_mask: list[list[int]] | None = None
    score_mask: list[list[int]] | None = None
    score_start: int | list[int] | None = None
    # The sampler's temperature (RL references): log-probs of softmax(logits / temperature). Strict (no
    # `true`, no "1"); its range is the one rule, refmodel.validation.temperature, applied in serve.validate.
    temperature: float = Field(default=1.0, strict=True)


class LogprobsResponse(_Body):
    """``logprobs[b][t] = log p(input_ids[b][t] | input_ids[b][:t])``; 0 at t = 0 and where not scored.

    ``fingerprint`` names the model *at the requested temperature* (it is part of the identity).
    """

    model: str
    fingerprint: str
    logprobs: list[list[float]]


class RewardsRequest(_Body):
    """Sequences to score with a reward model; the score is read at each row's last real token."""

    model: str = Field(min_length=1, max_length=256)
    input_ids: list[list[StrictInt]]
    attention_mask: list[list[int]] | None = None


class RewardsResponse(_Body):
    model: str
    fingerprint: str
    scores: list[float]


class ModelInfo(_Body):
    name: str
    kind: str  # "logprobs" or "rewards"
    fingerprint: str
    vocab_size: int
    dtype: str
    parameters: int
    max_seq_len: int  # min(the server's max_seq_len, the model's position limit)


class ModelsResponse(_Body):
    models: list[ModelInfo]
    max_seq_len: int
    max_sequences: int


class ErrorResponse(_Body):
    """Every error: a message saying what was wrong and what was expected, and the field if any.

    ``field`` names the offending request part (``input_ids``, ``score_mask``, ``body``, ``headers``...)
    or is null when the error concerns no single field (auth, unknown model, queue full).
    """

    detail: str
    field: str | None = None


__all__ = ["ErrorResponse", "LogprobsRequest", "LogprobsResponse", "ModelInfo", "ModelsResponse",
           "RewardsRequest", "RewardsResponse"]
