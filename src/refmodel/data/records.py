"""Records: loading (JSONL, Parquet, a ``datasets`` folder or ``Dataset``, lists of dicts) and their type.

The record types are TRL's dataset types (https://huggingface.co/docs/trl/dataset_formats), each in
its *standard* form (text) or its *conversational* form (a list of ``{"role", "content"}`` messages,
rendered with the tokenizer's chat template), plus the pre-tokenized forms TRL's trainers produce:

========================  ===========================================  ================
type                      fields                                       TRL trainer
========================  ===========================================  ================
``preference``            ``prompt``, ``chosen``, ``rejected``         DPOTrainer
``implicit_preference``   ``chosen``, ``rejected`` (prompt inside)     DPOTrainer
``unpaired_preference``   ``prompt``, ``completion``, ``label``        KTOTrainer
``prompt_completion``     ``prompt``, ``completion``                   SFTTrainer
``prompt_only``           ``prompt``                                   GRPOTrainer
``language_modeling``     ``text`` or ``messages``                     SFTTrainer
``tokenized_preference``  ``prompt_ids``, ``chosen_ids``, ``rejected_ids``
``tokenized_completion``  ``prompt_ids``, ``completion_ids`` (``label`` optional)
``tokenized_sequence``    ``input_ids`` (``completion_mask`` / ``score_mask`` optional, 0/1 per token)
========================  ===========================================  ================

Other fields (ids, metadata, ``tools``, ``chat_template_kwargs``) are carried along and ignored here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import DataFormatError

RECORD_TYPES: tuple[str, ...] = (
    "preference", "implicit_preference", "unpaired_preference", "prompt_completion", "prompt_only",
    "language_modeling", "tokenized_preference", "tokenized_completion", "tokenized_sequence",
)

# Field sets of the text types, as TRL's ``apply_chat_template`` lists them (``text`` is SFT's default
# ``dataset_text_field``).
_TEXT_TYPES: dict[frozenset, str] = {
    frozenset({"prompt", "chosen", "rejected"}): "preference",
    frozenset({"chosen", "rejected"}): "implicit_preference",
    frozenset({"prompt", "completion", "label"}): "unpaired_preference",
    frozenset({"prompt", "completion"}): "prompt_completion",
    frozenset({"prompt"}): "prompt_only",
    frozenset({"messages"}): "language_modeling",
    frozenset({"text"}): "language_modeling",
}
_TEXT_FIELDS = frozenset({"prompt", "chosen", "rejected", "completion", "label", "messages", "text"})

ACCEPTED = ("prompt+chosen+rejected (preference), chosen+rejected (implicit-prompt preference), "
            "prompt+completion+label (unpaired preference, KTO), prompt+completion, prompt (prompt-only), "
            "text or messages (language modeling), prompt_ids+chosen_ids+rejected_ids, "
            "prompt_ids+completion_ids, input_ids(+completion_mask)")


def load_records(data) -> list[tuple[str, dict]]:
    """``[(location, record)]`` from a path, a ``datasets.Dataset`` or an iterable of dicts: all of
    :func:`iter_records`, in a list."""
    return list(iter_records(data))


def iter_records(data) -> Iterator[tuple[str, dict]]:
    """``(location, record)`` pairs, one at a time, from a path, a ``datasets.Dataset`` or an iterable of dicts.

    Paths: a ``.jsonl``/``.json``/``.ndjson`` file (one JSON object per line), a ``.parquet`` file (read
    one batch of rows at a time), or a folder written by ``datasets``' ``save_to_disk`` (memory-mapped; a
    ``DatasetDict`` needs a ``train`` split). ``location`` is ``"FILE:LINE"`` (JSONL), ``"FILE:row N"`` or
    ``"record N"`` (in memory); malformed lines raise :class:`~refmodel.errors.DataFormatError` naming
    the line. Nothing but the current record (and a Parquet batch) is held, so a caller that streams can
    bound its memory; iterating again reads the data again (a one-shot iterator gives its records once).
    """
    if isinstance(data, (str, Path)):
        yield from _iter_path(Path(data))
        return
    if _is_hf_dataset(data):
        for i, row in enumerate(data):
            yield f"row {i}", dict(row)
        return
    if isinstance(data, dict):
        raise DataFormatError("data is one dict; pass a list of records (dicts), a path or a datasets.Dataset")
    if not isinstance(data, Iterable):
        raise DataFormatError(f"data must be a path, a datasets.Dataset or a list of records, got "
                              f"{type(data).__name__}")
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataFormatError(f"record {i}: expected a record (dict), got {type(record).__name__}")
        yield f"record {i}", record


def is_reiterable(data) -> bool:
    """True unless ``data`` is a one-shot iterator (a generator, ``iter(list)``): paths, lists, datasets and
    objects whose ``__iter__`` starts afresh can be read twice by :func:`iter_records`."""
    return isinstance(data, (str, Path)) or not isinstance(data, Iterator)


def _is_hf_dataset(data) -> bool:
    mod = type(data).__module__
    return mod.startswith("datasets.") and hasattr(data, "column_names") and hasattr(data, "__getitem__")


def _iter_path(path: Path) -> Iterator[tuple[str, dict]]:
    if not path.exists():
        raise DataFormatError(f"data path {path} does not exist")
    if path.is_dir():
        yield from _iter_hf_dir(path)
        return
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        yield from _iter_jsonl(path)
        return
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
            i = 0
            for batch in batches:
                for row in batch.to_pylist():
                    yield f"{path}:row {i}", row
                    i += 1
        except DataFormatError:
            raise
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise DataFormatError(f"{path}: not a readable Parquet file ({exc})") from exc
        return
    raise DataFormatError(f"{path}: unknown data format {suffix!r}; expected .jsonl, .parquet or a "
                          "folder written by datasets' save_to_disk")


def _iter_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                      "expected one JSON object per line") from None
            if not isinstance(record, dict):
                raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield f"{path}:{lineno}", record


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """Write ``rows`` as JSON lines (UTF-8, non-ASCII kept) that :func:`load_records` reads back; returns the path.

    The parent folder is created. Written to a temporary file and renamed into place, so an interrupted
    write never leaves a truncated file that later loads as a shorter dataset.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def _iter_hf_dir(path: Path) -> Iterator[tuple[str, dict]]:
    from .._optional import require

    datasets = require("datasets", "trl")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataFormatError(f"{path}: not a dataset folder written by save_to_disk ({exc})") from exc
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataFormatError(f"{path}: a DatasetDict without a 'train' split (splits: {list(ds)})")
        ds = ds["train"]
    for i, row in enumerate(ds):
        yield f"{path}:row {i}", row


def is_conversation(value: Any) -> bool:
    """True for a non-empty list of ``{"role", "content", ...}`` messages (TRL's conversational form)."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value)


def record_type(record: dict, where: str = "record") -> str:
    """The record's type (one of :data:`RECORD_TYPES`); raises DataFormatError naming the record otherwise.

    Pre-tokenized fields win over text fields, as in TRL (a dataset with ``input_ids`` is not tokenized
    again). ``None`` values count as absent (Parquet and ``datasets`` fill missing columns with null).
    """
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected a record (dict), got {type(record).__name__}")
    present = {k for k, v in record.items() if v is not None}
    if "input_ids" in present:
        return "tokenized_sequence"
    if "prompt_ids" in present:
        if {"chosen_ids", "rejected_ids"} <= present:
            return "tokenized_preference"
        if "completion_ids" in present:
            return "tokenized_completion"
        raise DataFormatError(f"{where}: 'prompt_ids' needs 'chosen_ids' and 'rejected_ids', or 'completion_ids'; "
                              f"the record has fields {sorted(record)}")
    kind = _TEXT_TYPES.get(frozenset(present & _TEXT_FIELDS))
    if kind is None:
        raise DataFormatError(f"{where}: the record fits no accepted type: it has fields {sorted(record)}; "
                              f"accepted: {ACCEPTED}")
    return kind


__all__ = ["ACCEPTED", "RECORD_TYPES", "is_conversation", "is_reiterable", "iter_records", "load_records", "record_type",
           "write_jsonl"]
