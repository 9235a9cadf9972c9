"""Data: records (JSONL, Parquet, ``datasets``) -> the one tokenization rule (TRL's) -> the one padder.

See :mod:`.records` for the accepted record types, :mod:`.tokenize` for the rule and :mod:`.collate`
for the padding; :mod:`.kto_kl` builds the KL completions TRL's ``KTOTrainer`` scores.
"""

from .collate import collate, collate_examples, pad, pad_id_of
from .kto_kl import iter_kto_kl_examples, kto_kl_examples
from .records import (
    ACCEPTED,
    RECORD_TYPES,
    is_conversation,
    is_reiterable,
    iter_records,
    load_records,
    record_type,
    write_jsonl,
)
from .tokenize import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_TRUNCATION_MODE,
    TRUNCATION_MODES,
    Example,
    check_settings,
    common_prefix_length,
    encode,
    extract_prompt,
    iter_examples,
    load_examples,
    tokenize_prompt,
    tokenize_prompts,
    tokenize_record,
    truncate,
)

__all__ = [
    "ACCEPTED", "DEFAULT_MAX_LENGTH", "DEFAULT_TRUNCATION_MODE", "RECORD_TYPES", "TRUNCATION_MODES", "Example",
    "check_settings", "collate", "collate_examples", "common_prefix_length", "encode", "extract_prompt",
    "is_conversation", "is_reiterable", "iter_examples", "iter_kto_kl_examples", "iter_records", "kto_kl_examples", "load_examples",
    "load_records", "pad", "pad_id_of", "record_type", "tokenize_prompt", "tokenize_prompts", "tokenize_record",
    "truncate", "write_jsonl",
]
