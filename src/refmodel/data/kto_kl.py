"""The KL completions TRL 1.16's ``KTOTrainer`` scores for its KL term, built by the one tokenization rule
(:mod:`.tokenize`) so that a precomputed store holds exactly the sequences the trainer asks for
(``trl/trainer/kto_trainer.py``: ``_get_kl_dataset``, applied per batch of ``per_device_train_batch_size``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from ..errors import ConfigError
from .records import iter_records
from .tokenize import DEFAULT_MAX_LENGTH, Example, check_settings, tokenize_record


def iter_kto_kl_examples(data, tokenizer=None, *, batch_size: int,
                         max_length: int | None = DEFAULT_MAX_LENGTH) -> Iterator[Example]:
    """The KL sequences TRL 1.16's ``KTOTrainer`` scores for the KL term, as :class:`Example` s, streamed
    (``batch_size`` records held at a time).

    TRL builds them from the tokenized, filtered train set in its order (``train_sampling_strategy=
    "sequential"``, which those losses require; no seed is involved): in consecutive chunks of
    ``batch_size`` (``per_device_train_batch_size``) the completions are rotated by one, so row ``i``
    pairs its prompt with the *untruncated* completion of row ``i - 1`` (the first row of a chunk with
    the chunk's last), and its collator truncates ``prompt + completion`` to ``max_length`` keeping the
    start. Only unpaired (KTO) records take part; a store holding these sequences serves
    ``KTOTrainer(reference=store)`` with the same ``per_device_train_batch_size`` and ``max_length``.
    """
    if batch_size < 1:
        raise ConfigError(f"the KTO KL batch size must be >= 1 (TRL's per_device_train_batch_size), got {batch_size}")
    check_settings(max_length, "keep_start")

    def rotated(chunk):
        for (where, prompt, _, label), (_, _, other, _) in zip(chunk, chunk[-1:] + chunk[:-1], strict=True):
            record = {"prompt_ids": list(prompt), "completion_ids": list(other), "label": label}
            ex = tokenize_record(record, None, f"{where} (KL completion)", max_length=max_length)
            if ex is not None:
                yield dataclasses.replace(ex, names=("KL completion",))

    chunk: list = []
    for where, record in iter_records(data):
        kept = tokenize_record(record, tokenizer, where, max_length=max_length, truncation_mode="keep_start")
        if kept is None or kept.label is None:
            continue  # dropped by TRL (prompt fills max_length) or not an unpaired record
        full = tokenize_record(record, tokenizer, where, max_length=None, truncation_mode="keep_start")
        assert full is not None  # kept with a limit, so kept without one
        chunk.append((where, full.prompt_ids, full.completions[0], kept.label))
        if len(chunk) == batch_size:
            yield from rotated(chunk)
            chunk = []
    if chunk:
        yield from rotated(chunk)


def kto_kl_examples(data, tokenizer=None, *, batch_size: int,
                    max_length: int | None = DEFAULT_MAX_LENGTH) -> list[Example]:
    """:func:`iter_kto_kl_examples` collected into a list."""
    return list(iter_kto_kl_examples(data, tokenizer, batch_size=batch_size, max_length=max_length))


__all__ = ["iter_kto_kl_examples", "kto_kl_examples"]
