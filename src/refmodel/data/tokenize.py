"""THE tokenization rule: TRL 1.16's, token for token, for every record type of :mod:`.records`.

refmodel's store is keyed by exact token ids, so the ids here must be the ones TRL's trainers feed
their model for the same record, tokenizer and settings. The rule, as TRL 1.16 implements it
(``trl/trainer/dpo_trainer.py``, ``kto_trainer.py``, ``sft_trainer.py``: ``_prepare_dataset`` and the
data collators; ``trl/data_utils.py``: ``extract_prompt``, ``_tokenize``, ``common_prefix_length``):

1. implicit-prompt preference (only ``chosen``/``rejected``): the prompt is their longest common
   prefix (characters for text, messages for conversations), ``extract_prompt``;
2. standard (text) data: the tokenizer's EOS *string* is appended to every completion (and to LM
   ``text``) that does not already end with it; conversational data gets no EOS (the template has it);
3. the prompt and prompt+completion are tokenized *separately and jointly*: text with
   ``tokenizer(text=...)`` (default special tokens, so BOS/EOS post-processors apply to both), messages
   with ``apply_chat_template(tokenize=True)`` (``add_generation_prompt=True`` for the prompt alone);
4. the completion starts where the two token lists first differ (``common_prefix_length``; for a
   preference pair the smaller of the chosen and rejected split). Tokens of the prompt beyond that
   point are not part of the training sequence;
5. truncation to ``max_length`` per sequence (prompt + completion): ``keep_start`` keeps the first
   ``max_length`` tokens, ``keep_end`` the last (unpaired/KTO data: always ``keep_start``, as
   KTOTrainer has no ``truncation_mode``);
6. dropping: preference records whose prompt alone has ``>= max_length`` tokens (``keep_start`` only),
   unpaired records whose prompt has ``>= max_length`` tokens (any mode), prompt-completion and LM
   records left with no scored token after truncation.

TRL 1.16 has no ``max_prompt_length`` (it was removed from DPO/KTO in 1.x), so neither has refmodel.
TRL is not imported here; ``tests/data/test_tokenize.py`` runs TRL's own preparation as the oracle.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from ..cluster import get_logger
from ..errors import ConfigError, DataFormatError
from .records import is_conversation, iter_records, record_type

log = get_logger(__name__)  # shared warnings: main process only (refmodel.cluster)

DEFAULT_MAX_LENGTH: int | None = 1024  # DPOConfig / KTOConfig / SFTConfig default in TRL 1.16
DEFAULT_TRUNCATION_MODE = "keep_start"
TRUNCATION_MODES: tuple[str, ...] = ("keep_start", "keep_end")


@dataclass(frozen=True)
class Example:
    """One tokenized record: a prompt shared by one or more completions, after truncation.

    ``completion_masks[i][j]`` says whether token ``j`` of completion ``i`` is scored. ``names`` gives
    each completion's role (``chosen``/``rejected``/``completion``), ``kind`` the record type and
    ``label`` the KTO desirability (unpaired records only). Token 0 of a sequence is never scored
    (nothing precedes it), matching TRL's shifted loss.
    """

    prompt_ids: tuple[int, ...]
    completions: tuple[tuple[int, ...], ...]
    completion_masks: tuple[tuple[bool, ...], ...]
    names: tuple[str, ...]
    where: str = ""
    kind: str = ""
    label: bool | None = None

    def sequences(self) -> list[tuple[list[int], list[bool]]]:
        """``[(input_ids [T], score_mask [T])]``, one per completion: prompt + completion, completion scored."""
        out = []
        for comp, mask in zip(self.completions, self.completion_masks, strict=True):
            out.append((list(self.prompt_ids) + list(comp), [False] * len(self.prompt_ids) + list(mask)))
        return out


def check_settings(max_length: int | None, truncation_mode: str) -> None:
    """Raise ConfigError unless ``max_length`` is None or >= 1 and ``truncation_mode`` is TRL's."""
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < 1):
        raise ConfigError(f"max_length must be None or an int >= 1, got {max_length!r}")
    if truncation_mode not in TRUNCATION_MODES:
        raise ConfigError(f"unknown truncation_mode {truncation_mode!r}; expected one of {list(TRUNCATION_MODES)}")


# ------------------------------------------------------------------ TRL's building blocks
def common_prefix_length(ids: Sequence[int], other: Sequence[int]) -> int:
    """Number of leading tokens ``ids`` and ``other`` share (``trl.data_utils.common_prefix_length``)."""
    n = 0
    for a, b in zip(ids, other, strict=False):
        if a != b:
            break
        n += 1
    return n


def extract_prompt(chosen, rejected, where: str = "record"):
    """``(prompt, chosen, rejected)`` of an implicit-prompt pair, as ``trl.data_utils.extract_prompt``.

    TRL quirks kept on purpose: a space just before the first difference goes to the completions, and
    when one side is a prefix of the other the split falls one element *before* the end of the shorter
    (its loop variable stops at ``len - 1``).
    """
    n = min(len(chosen), len(rejected))
    if n == 0:
        raise DataFormatError(f"{where}: 'chosen' or 'rejected' is empty, so no prompt can be extracted from "
                              "their common prefix; give an explicit 'prompt'")
    idx = 0
    for idx in range(n):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":  # TRL: "remove space before the prompt"
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _template_kwargs(record: dict, where: str) -> dict:
    tools = record.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{where}: field 'tools' is a string but not JSON ({exc.msg})") from None
    extra = record.get("chat_template_kwargs") or {}
    if not isinstance(extra, dict):
        raise DataFormatError(f"{where}: field 'chat_template_kwargs' must be a dict, got {type(extra).__name__}")
    return {"tools": tools, **extra}


def encode(tokenizer, value, *, add_generation_prompt: bool = False, **template_kwargs) -> list[int]:
    """Token ids of text (``tokenizer(text=...)``, default special tokens) or of messages (the chat
    template, ``tokenize=True``), as ``trl.data_utils._tokenize`` does."""
    if isinstance(value, list):
        if getattr(tokenizer, "chat_template", None) is None and template_kwargs.get("chat_template") is None:
            raise DataFormatError("conversational records need a tokenizer with a chat template "
                                  "(tokenizer.chat_template is None); set one or use text records")
        if add_generation_prompt:
            template_kwargs["add_generation_prompt"] = True
        out = tokenizer.apply_chat_template(value, tokenize=True, return_dict=True, **template_kwargs)
        return list(out["input_ids"])
    return list(tokenizer(text=value)["input_ids"])


def _with_eos(text: str, eos: str) -> str:
    return text if text.endswith(eos) else text + eos


def _split(tokenizer, prompt, completions: list, conversational: bool, kwargs: dict):
    """``(prompt_ids, [completion_ids])``: joint tokenization, split at the smallest common prefix."""
    if conversational:
        prompt_ids = encode(tokenizer, prompt, add_generation_prompt=True, **kwargs)
        joint = [encode(tokenizer, prompt + c, **kwargs) for c in completions]
    else:
        prompt_ids = encode(tokenizer, prompt)
        joint = [encode(tokenizer, prompt + c) for c in completions]
    cut = min(common_prefix_length(prompt_ids, j) for j in joint)
    if cut < len(prompt_ids):
        # TRL warns once and leaves the rest of the prompt out of the training sequence; so do we (e.g. a
        # BOS+EOS post-processor puts EOS after the prompt alone, and that EOS is dropped here).
        log.debug("the tokenized prompt is not a prefix of prompt+completion; %d prompt token(s) left out",
                  len(prompt_ids) - cut)
    return prompt_ids[:cut], [j[cut:] for j in joint]


def tokenize_prompt(prompt, tokenizer, where: str = "prompt", **template_kwargs) -> list[int]:
    """Prompt ids for generation (prompt-only data): THE prompt rule of GRPO/RLOO rollouts.

    TRL 1.16's ``GRPOTrainer._tokenize_prompts``: text goes through ``tokenizer(text=...)`` with the
    default special tokens (a BOS post-processor puts BOS first, a BOS+EOS one also appends EOS), messages
    through ``apply_chat_template(add_generation_prompt=True, tokenize=True)`` (no special tokens added:
    the template writes its own BOS).

    Args:
        prompt: text, a list of ``{role, content}`` messages, or a prompt-only record ``{"prompt": ...}``
            (its ``tools`` and ``chat_template_kwargs`` fields go to the chat template).
        tokenizer: a ``transformers`` tokenizer (with a chat template for messages).
        where: the prompt's location for error messages.
        template_kwargs: extra chat-template arguments (TRL's ``tools``, ``chat_template_kwargs``).
    Returns:
        the prompt's token ids (not empty).
    """
    if isinstance(prompt, dict):
        if "prompt" not in prompt:
            raise DataFormatError(f"{where}: a prompt-only record needs a 'prompt' field, got keys {sorted(prompt)}")
        template_kwargs = {**_template_kwargs(prompt, where), **template_kwargs}
        prompt = prompt["prompt"]
    if not (isinstance(prompt, str) or is_conversation(prompt)):
        raise DataFormatError(f"{where}: a prompt must be text or a list of {{'role', 'content'}} messages, got "
                              f"{type(prompt).__name__}: {str(prompt)[:80]!r}")
    ids = encode(tokenizer, prompt, add_generation_prompt=is_conversation(prompt), **template_kwargs)
    if not ids:
        raise DataFormatError(f"{where}: the prompt is empty after tokenization; give it some text")
    return ids


def tokenize_prompts(prompts: Sequence, tokenizer, **template_kwargs) -> list[list[int]]:
    """:func:`tokenize_prompt` of each of ``prompts`` (records, text or messages): ragged ``[B][P_i]`` ids."""
    return [tokenize_prompt(p, tokenizer, f"prompt {i}", **template_kwargs) for i, p in enumerate(prompts)]


def truncate(ids: Sequence, max_length: int | None, truncation_mode: str = DEFAULT_TRUNCATION_MODE) -> list:
    """``ids[:max_length]`` (``keep_start``) or ``ids[-max_length:]`` (``keep_end``); all if None."""
    if max_length is None:
        return list(ids)
    return list(ids[:max_length] if truncation_mode == "keep_start" else ids[-max_length:])


# ------------------------------------------------------------------ the rule, per record type
def _field(record: dict, name: str, where: str, conversational: bool):
    value = record[name]
    if is_conversation(value):
        if not conversational:
            raise DataFormatError(f"{where}: field {name!r} is a conversation but the prompt is text; give "
                                  "every field as text or every field as {role, content} messages")
        return value
    if isinstance(value, str):
        # A text completion in a conversational record: one assistant message (TRL would fail here).
        return [{"role": "assistant", "content": value}] if conversational else value
    raise DataFormatError(f"{where}: field {name!r} must be a string or a non-empty list of {{role, content}} "
                          f"messages, got {type(value).__name__}")


def _ids(record: dict, name: str, where: str) -> list[int]:
    value = record[name]
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise DataFormatError(f"{where}: field {name!r} must be a list of non-negative token ids")
    value = list(value)
    if set(map(type, value)) <= {int} and min(value, default=0) >= 0:  # the common case, checked at C speed
        return value
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise DataFormatError(f"{where}: field {name!r} must be a list of non-negative token ids")
    return value


def _eos(tokenizer, where: str) -> str:
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise DataFormatError(f"{where}: text records get the tokenizer's EOS appended (as TRL does), but the "
                              "tokenizer has no eos_token; set tokenizer.eos_token")
    return eos


def tokenize_record(record: dict, tokenizer=None, where: str = "record", *,
                    max_length: int | None = DEFAULT_MAX_LENGTH,
                    truncation_mode: str = DEFAULT_TRUNCATION_MODE) -> Example | None:
    """Tokenize one record as TRL 1.16 does (see the module docstring); ``None`` when TRL drops it.

    Args:
        record: a dict of one of the types in :mod:`refmodel.data.records`.
        tokenizer: a ``transformers`` tokenizer (with a chat template for conversational records);
            pre-tokenized records need none.
        where: the record's location for error messages (``FILE:LINE``, ``record N``).
        max_length, truncation_mode: TRL's settings (``DPOConfig``/``KTOConfig``/``SFTConfig``).
    Returns:
        an :class:`Example` (prompt ids, completion ids and score masks after truncation), or None.
    """
    check_settings(max_length, truncation_mode)
    kind = record_type(record, where)
    label = None
    if kind.startswith("tokenized"):
        if kind == "tokenized_sequence":
            ids = _ids(record, "input_ids", where)
            field = next((f for f in ("completion_mask", "score_mask") if record.get(f) is not None), None)
            mask = [1] * len(ids) if field is None else _ids(record, field, where)
            if len(mask) != len(ids):
                raise DataFormatError(f"{where}: {field} has {len(mask)} values for {len(ids)} input_ids")
            return _finish([(ids, [bool(m) for m in mask])], ("completion",), where, kind, None,
                           max_length, truncation_mode, drop="no_scored")
        prompt_ids = _ids(record, "prompt_ids", where)
        names = ("chosen", "rejected") if kind == "tokenized_preference" else ("completion",)
        comps = [_ids(record, f"{n}_ids", where) for n in names]
        rule = "preference" if kind == "tokenized_preference" else "no_scored"
        if kind == "tokenized_completion" and record.get("label") is not None:
            rule, label = "unpaired", bool(record["label"])
    else:
        if tokenizer is None:
            raise DataFormatError(f"{where}: text records need a tokenizer (pass tokenizer= or a model path)")
        if kind == "prompt_only":
            return None  # nothing to score: completions are generated (see tokenize_prompt)
        if kind == "language_modeling":
            if record.get("messages") is not None:
                msgs = _field(record, "messages", where, True)
                ids = encode(tokenizer, msgs, **_template_kwargs(record, where))
            else:
                ids = encode(tokenizer, _with_eos(_field(record, "text", where, False), _eos(tokenizer, where)))
            return _finish([(ids, [True] * len(ids))], ("completion",), where, kind, None, max_length,
                           truncation_mode, drop="no_scored")
        if kind == "implicit_preference":
            conversational = is_conversation(record["chosen"])
            prompt, chosen, rejected = extract_prompt(_field(record, "chosen", where, conversational),
                                                      _field(record, "rejected", where, conversational), where)
            if conversational and not prompt:
                raise DataFormatError(f"{where}: 'chosen' and 'rejected' share no leading message, so there is no "
                                      "prompt to extract; give an explicit 'prompt'")
            values, names = [chosen, rejected], ("chosen", "rejected")
        else:
            conversational = is_conversation(record["prompt"])
            prompt = _field(record, "prompt", where, conversational)
            names = ("chosen", "rejected") if kind == "preference" else ("completion",)
            values = [_field(record, n, where, conversational) for n in names]
        if kind == "unpaired_preference":
            label = _label(record["label"], where)
        if not conversational:
            eos = _eos(tokenizer, where)
            values = [_with_eos(v, eos) for v in values]
        prompt_ids, comps = _split(tokenizer, prompt, values, conversational,
                                   _template_kwargs(record, where) if conversational else {})
        rule = {"unpaired_preference": "unpaired", "prompt_completion": "no_scored"}.get(kind, "preference")
    if rule == "unpaired":
        truncation_mode = "keep_start"  # KTOTrainer's collator always keeps the start
    if max_length is not None and rule in ("preference", "unpaired") and len(prompt_ids) >= max_length and (
            rule == "unpaired" or truncation_mode == "keep_start"):
        return None  # TRL drops records whose prompt alone fills max_length
    seqs = [(prompt_ids + c, [False] * len(prompt_ids) + [True] * len(c)) for c in comps]
    return _finish(seqs, names, where, kind, label, max_length, truncation_mode,
                   drop="no_scored" if rule == "no_scored" else None)


def _label(value, where: str) -> bool:
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise DataFormatError(f"{where}: field 'label' must be a bool (desirable or not), got {value!r}")


def _finish(seqs, names, where, kind, label, max_length, truncation_mode, drop) -> Example | None:
    """Truncate each sequence, drop if TRL would, and share the longest unscored common prefix."""
    seqs = [(truncate(ids, max_length, truncation_mode), truncate(mask, max_length, truncation_mode))
            for ids, mask in seqs]
    if drop == "no_scored" and max_length is not None and not any(any(m) for _, m in seqs):
        return None  # SFTTrainer drops examples left fully masked by truncation
    seqs = [(ids, [False] + list(mask[1:]) if mask else []) for ids, mask in seqs]  # token 0 has no prefix
    cut = min(len(ids) for ids, _ in seqs)
    first = seqs[0][0]
    for ids, mask in seqs:
        # n = the longest prefix (<= cut) equal to first's and unscored; list ops first (C speed), then the
        # token-by-token walk only where the ids differ
        n = min(cut, mask.index(True) if True in mask else len(mask))
        if ids[:n] != first[:n]:
            n = next(j for j in range(n) if ids[j] != first[j])
        cut = n
    return Example(tuple(first[:cut]), tuple(tuple(ids[cut:]) for ids, _ in seqs),
                   tuple(tuple(mask[cut:]) for _, mask in seqs), tuple(names), where, kind, label)


def load_examples(data, tokenizer=None, *, max_length: int | None = DEFAULT_MAX_LENGTH,
                  truncation_mode: str = DEFAULT_TRUNCATION_MODE) -> list[Example]:
    """Tokenized examples of ``data`` (anything :func:`~refmodel.data.records.load_records` reads), in a list:
    :func:`iter_examples`' examples. Records TRL drops are left out, with one WARNING saying how many."""
    return [ex for _, ex in iter_examples(data, tokenizer, max_length=max_length, truncation_mode=truncation_mode)]


def iter_examples(data, tokenizer=None, *, max_length: int | None = DEFAULT_MAX_LENGTH,
                  truncation_mode: str = DEFAULT_TRUNCATION_MODE,
                  wanted: Callable[[int], bool] | None = None, stop: int | None = None
                  ) -> Iterator[tuple[int, Example]]:
    """``(record index, example)`` of each record of ``data`` TRL keeps, tokenized one record at a time.

    ``data``: anything :func:`~refmodel.data.records.iter_records` reads (streamed: only the current record
    is held). ``wanted(index)``: tokenize only the records it accepts (the others are read and skipped,
    so a caller can re-read one window of a file without tokenizing the rest); None: all, and then the
    records TRL drops (see the module docstring) are counted in one WARNING at the end. ``stop``: stop
    reading at this record index.
    """
    check_settings(max_length, truncation_mode)
    kept, dropped, prompts = 0, 0, 0
    for index, (where, record) in enumerate(iter_records(data)):
        if stop is not None and index >= stop:
            break
        if wanted is not None and not wanted(index):
            continue
        ex = tokenize_record(record, tokenizer, where, max_length=max_length, truncation_mode=truncation_mode)
        if ex is None:
            if record_type(record, where) == "prompt_only":
                prompts += 1
            else:
                dropped += 1
            continue
        kept += 1
        yield index, ex
    if wanted is not None or stop is not None:
        return
    if dropped:
        log.warning("%d of %d records dropped as TRL drops them: the prompt fills max_length=%s (or nothing "
                    "scored is left after truncation); raise max_length to keep them", dropped,
                    dropped + prompts + kept, max_length)
    if prompts:
        log.info("%d prompt-only records have nothing to score (completions are generated)", prompts)


__all__ = ["DEFAULT_MAX_LENGTH", "DEFAULT_TRUNCATION_MODE", "Example", "TRUNCATION_MODES", "check_settings",
           "common_prefix_length", "encode", "extract_prompt", "iter_examples",
           "load_examples", "tokenize_prompt", "tokenize_prompts", "tokenize_record", "truncate"]
