"""Tiny, deterministic models, tokenizers and data for tests (refmodel's and users'), and child processes.

A test-facing front door only: each name is defined once in the product room that owns it and re-exported
here, so ``from refmodel.testing import make_tiny_model`` keeps working. No product module imports this
package (``tests/test_layout.py`` checks it).

- tiny causal LMs and tokenizers (built locally, nothing downloaded): :mod:`refmodel.models.tiny`;
- the built-in preference data and its vocabulary: :mod:`refmodel.data.builtin`;
- the built-in verifiable task ("what comes after N", checked exactly): :mod:`refmodel.recipes.builtin`;
- JSONL writing: :func:`refmodel.data.records.write_jsonl`;
- the CLI and a live ``refmodel serve`` in child processes: :mod:`.processes`.
"""

from __future__ import annotations

from ..data.builtin import (
    BUILTIN_DATASET_SIZE,
    SPECIAL_TOKENS,
    builtin_dataset_path,
    iter_preference_pairs,
    preference_pairs,
    task_vocabulary,
)
from ..data.records import write_jsonl
from ..models.tiny import (
    CHAT_TEMPLATE,
    CHAT_TEMPLATE_BOS,
    CHAT_TEMPLATE_EOS,
    FAMILIES,
    TOKENIZER_KINDS,
    Family,
    load_tiny,
    make_tiny_model,
    make_tokenizer,
    tiny_config,
)
from ..recipes.builtin import verifiable_answer, verifiable_prompts, verifiable_reward
from .processes import ServeProcess, free_port, run_cli, subprocess_env

__all__ = [
    "BUILTIN_DATASET_SIZE",
    "CHAT_TEMPLATE",
    "CHAT_TEMPLATE_BOS",
    "CHAT_TEMPLATE_EOS",
    "FAMILIES",
    "SPECIAL_TOKENS",
    "TOKENIZER_KINDS",
    "Family",
    "ServeProcess",
    "builtin_dataset_path",
    "free_port",
    "iter_preference_pairs",
    "load_tiny",
    "make_tiny_model",
    "make_tokenizer",
    "preference_pairs",
    "run_cli",
    "subprocess_env",
    "task_vocabulary",
    "tiny_config",
    "verifiable_answer",
    "verifiable_prompts",
    "verifiable_reward",
    "write_jsonl",
]
