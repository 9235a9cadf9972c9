"""Preference and prompt/completion data: loading (JSONL, Parquet, HF ``save_to_disk``) and tokenization.

Accepted records (one per line / row):

- preference pairs ``{"prompt", "chosen", "rejected"}``, as text or as conversations (lists of
  ``{"role", "content"}``, rendered with the tokenizer's chat template);
- prompt/completion ``{"prompt", "completion"}`` (text or conversational);
- pre-tokenized ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` / ``{"prompt_ids", "completion_ids"}``
  or ``{"input_ids", "score_mask"}`` (``score_mask`` optional, 0/1 per token; alias ``completion_mask``).

Tokenization follows TRL: the prompt with the tokenizer's default special tokens, completions without,
concatenated; the score mask marks the completion tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataFormatError


@dataclass(frozen=True)
class Example:
    """One tokenized record: a prompt shared by one or more completions.

    ``completion_masks[i][j]`` says whether token ``j`` of completion ``i`` is scored (all True for
    text data). ``names`` gives each completion's role (``chosen``/``rejected``/``completion``).
    """

    prompt_ids: tuple[int, ...]
    completions: tuple[tuple[int, ...], ...]
    completion_masks: tuple[tuple[bool, ...], ...]
    names: tuple[str, ...]
    where: str = ""

    def sequences(self) -> list[tuple[list[int], list[bool]]]:
        """``[(input_ids [T], score_mask [T])]``, one per completion: prompt + completion, completion scored."""
        out = []
        for comp, mask in zip(self.completions, self.completion_masks, strict=True):
            out.append((list(self.prompt_ids) + list(comp), [False] * len(self.prompt_ids) + list(mask)))
        return out


def load_records(path) -> list[tuple[str, dict]]:
    """``[(location, record)]`` from a ``.jsonl``/``.json`` file, a ``.parquet`` file or an HF dataset folder.

    ``location`` is ``"FILE:LINE"`` (JSONL) or ``"FILE:row N"``; malformed lines raise DataFormatError.
    """
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"data path {path} does not exist")
    if path.is_dir():
        return _load_hf_dir(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _load_jsonl(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise DataFormatError(f"{path}: not a readable Parquet file ({exc})") from exc
        return [(f"{path}:row {i}", row) for i, row in enumerate(rows)]
    raise DataFormatError(f"{path}: unknown data format {suffix!r}; expected .jsonl, .parquet or a "
                          "folder written by datasets' save_to_disk")


def _load_jsonl(path: Path) -> list[tuple[str, dict]]:
    out = []
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
            out.append((f"{path}:{lineno}", record))
    return out


def _load_hf_dir(path: Path) -> list[tuple[str, dict]]:
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
    return [(f"{path}:row {i}", row) for i, row in enumerate(ds)]


def _is_conversation(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _int_list(value, where: str, field: str) -> tuple[int, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise DataFormatError(f"{where}: field {field!r} must be a list of non-negative token ids")
    return tuple(value)


def tokenize_record(record: dict, tokenizer=None, where: str = "record") -> Example:
    """Tokenize one record (see the module docstring for the accepted shapes)."""
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected a record (dict), got {type(record).__name__}")
    if "input_ids" in record:
        ids = _int_list(record["input_ids"], where, "input_ids")
        mask_field = "score_mask" if "score_mask" in record else "completion_mask"
        mask = record.get(mask_field)
        mask = [True] * len(ids) if mask is None else [bool(m) for m in _int_list(mask, where, mask_field)]
        if len(mask) != len(ids) or len(ids) < 2:
            raise DataFormatError(f"{where}: input_ids needs >= 2 tokens and {mask_field} the same length "
                                  f"(got {len(ids)} ids, {len(mask)} mask values)")
        first = max(1, next((i for i, m in enumerate(mask) if m), len(ids)))  # token 0 has no prefix
        return Example(ids[:first], (ids[first:],), (tuple(mask[first:]),), ("completion",), where)
    if "prompt_ids" in record:
        names = [n for n in ("chosen", "rejected", "completion") if f"{n}_ids" in record]
        if not names:
            raise DataFormatError(f"{where}: prompt_ids needs chosen_ids/rejected_ids or completion_ids")
        comps = tuple(_int_list(record[f"{n}_ids"], where, f"{n}_ids") for n in names)
        return Example(_int_list(record["prompt_ids"], where, "prompt_ids"), comps,
                       tuple((True,) * len(c) for c in comps), tuple(names), where)
    if "prompt" not in record:
        raise DataFormatError(f"{where}: expected fields prompt+chosen+rejected, prompt+completion, "
                              f"prompt_ids+..., or input_ids; got {sorted(record)}")
    if "chosen" in record and "rejected" in record:
        names = ("chosen", "rejected")
    elif "completion" in record:
        names = ("completion",)
    else:
        raise DataFormatError(f"{where}: a record with 'prompt' needs 'chosen' and 'rejected', or "
                              f"'completion'; got {sorted(record)}")
    if tokenizer is None:
        raise DataFormatError(f"{where}: text records need a tokenizer (pass tokenizer= or a model path)")
    prompt = record["prompt"]
    if _is_conversation(prompt):
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        comps = []
        for n in names:
            value = record[n]
            msgs = value if _is_conversation(value) else [{"role": "assistant", "content": _text(value, where, n)}]
            full = tokenizer.apply_chat_template(prompt + msgs, tokenize=False)
            if not full.startswith(prompt_text):
                raise DataFormatError(f"{where}: the chat template renders the prompt differently alone and "
                                      f"with the {n!r} reply, so the completion cannot be split off")
            comps.append(tokenizer(full[len(prompt_text):], add_special_tokens=False)["input_ids"])
    else:
        prompt_ids = tokenizer(_text(prompt, where, "prompt"))["input_ids"]
        comps = [tokenizer(_text(record[n], where, n), add_special_tokens=False)["input_ids"] for n in names]
    if not prompt_ids:
        raise DataFormatError(f"{where}: the prompt tokenizes to no tokens; the first completion token "
                              "would have no prefix to be scored against")
    comps = tuple(tuple(c) for c in comps)
    return Example(tuple(prompt_ids), comps, tuple((True,) * len(c) for c in comps), names, where)


def _text(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: field {field!r} must be a string or a list of "
                              f"{{role, content}} messages, got {type(value).__name__}")
    return value


def load_examples(data, tokenizer=None) -> list[Example]:
    """Tokenized examples from a path (see :func:`load_records`) or an in-memory list of records."""
    if isinstance(data, (str, Path)):
        records = load_records(data)
    else:
        records = [(f"record {i}", r) for i, r in enumerate(data)]
    return [tokenize_record(r, tokenizer, where) for where, r in records]


__all__ = ["Example", "load_examples", "load_records", "tokenize_record"]
