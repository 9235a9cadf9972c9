"""Tiny, deterministic causal LMs and their tokenizers, built locally (nothing is downloaded).

The models are random transformers configs of three families (Llama, GPT-2, Gemma-2) saved with
``save_pretrained``, so loading goes through the real ``from_pretrained`` path; the tokenizers are real
``PreTrainedTokenizerFast`` objects (word-level, byte-level BPE, Metaspace BPE; adding no special tokens,
BOS, or BOS and EOS) over the words of the built-in task (:mod:`refmodel.data.builtin`), each with a
chat template. ``refmodel make-tiny-model`` and ``refmodel demo`` build theirs here; tests and users'
tests get them through :mod:`refmodel.testing`.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any, Literal

from ..data.builtin import SPECIAL_TOKENS, preference_pairs, task_vocabulary

Family = Literal["llama", "gpt2", "gemma2"]
FAMILIES: tuple[str, ...] = ("llama", "gpt2", "gemma2")

# A chat template over the special tokens, so conversational data works with `apply_chat_template`.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

TOKENIZER_KINDS: tuple[str, ...] = ("plain", "bos", "bos_eos", "byte_bpe", "byte_bpe_bos", "byte_bpe_bos_eos",
                                    "metaspace")

# Chat template of the BOS / BOS+EOS / Metaspace kinds: BOS from the template (as Llama and Mistral
# templates do; ``apply_chat_template`` tokenizes without special tokens) and EOS after assistant turns.
CHAT_TEMPLATE_BOS = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Byte-level BPE (GPT-2 / Qwen style): no BOS anywhere, EOS after assistant turns.
CHAT_TEMPLATE_EOS = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _training_corpus() -> list[str]:
    """Text the subword tokenizers are trained on: every task word, and sentences of the built-in task."""
    lines = [" ".join(task_vocabulary()[len(SPECIAL_TOKENS):])]
    for pair in preference_pairs(400, seed=12345):
        lines += [pair["prompt"] + " " + pair["chosen"], pair["prompt"] + pair["rejected"]]
    return lines


@cache
def _tokenizer_json(kind: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if kind in ("plain", "bos", "bos_eos"):
        vocab = {tok: i for i, tok in enumerate(task_vocabulary())}
        core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        # Whitespace splits punctuation from words too, so "?" + "sure" (TRL concatenates text without a
        # separator) tokenizes like "? sure"; every task word is whole in the vocabulary.
        core.pre_tokenizer = pre_tokenizers.Whitespace()
        if kind != "plain":
            single = "<s> $A" if kind == "bos" else "<s> $A </s>"
            pair = "<s> $A $B" if kind == "bos" else "<s> $A </s> $B </s>"
            core.post_processor = processors.TemplateProcessing(
                single=single, pair=pair, special_tokens=[("<s>", 2), ("</s>", 3)])
        return core.to_str()
    if kind.startswith("byte_bpe"):  # GPT-2 / Qwen style: bytes, merges across the leading space, no BOS
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "metaspace":  # Llama-2 / Mistral (SentencePiece) style: "▁" marks spaces, BOS added
        core = Tokenizer(models.BPE(unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        core.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS, show_progress=False)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {TOKENIZER_KINDS}")
    core.train_from_iterator(_training_corpus(), trainer=trainer)
    if kind == "metaspace":
        core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                            special_tokens=[("<s>", 2)])
    elif kind in ("byte_bpe_bos", "byte_bpe_bos_eos"):
        # Llama-3 style: byte-level BPE whose post-processor is ByteLevel then a BOS (or BOS+EOS) template.
        single = "<s> $A" if kind == "byte_bpe_bos" else "<s> $A </s>"
        pair = "<s> $A $B" if kind == "byte_bpe_bos" else "<s> $A </s> $B </s>"
        core.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=single, pair=pair, special_tokens=[("<s>", 2), ("</s>", 3)])])
    return core.to_str()


def make_tokenizer(kind: str = "plain"):
    """A ``PreTrainedTokenizerFast`` like a real one, built locally (nothing is downloaded).

    ``kind`` (see :data:`TOKENIZER_KINDS`): ``plain`` word-level, adds no special tokens (the default);
    ``bos`` word-level, adds BOS (Llama-3 style, a ``TemplateProcessing`` post-processor); ``bos_eos``
    adds BOS and EOS (``<s> $A </s>``); ``byte_bpe`` byte-level BPE trained on the task text (GPT-2 /
    Qwen style, no BOS); ``byte_bpe_bos`` / ``byte_bpe_bos_eos`` the same BPE adding BOS / BOS and EOS
    (Llama-3 style: ``ByteLevel`` then ``TemplateProcessing`` post-processors); ``metaspace`` BPE with a
    Metaspace pre-tokenizer (Llama-2 / Mistral style, adds BOS). All have ``<pad>``=0, ``<unk>``=1, ``<s>``=2, ``</s>``=3, the chat role tokens, a chat
    template, and a vocabulary that :func:`make_tiny_model` sizes its embedding to.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {TOKENIZER_KINDS}")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(kind)),
        pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    tok.chat_template = {"plain": CHAT_TEMPLATE, "byte_bpe": CHAT_TEMPLATE_EOS}.get(kind, CHAT_TEMPLATE_BOS)
    return tok


def tiny_config(family: str, vocab_size: int, **overrides):
    """The transformers config of a tiny model of ``family`` (llama, gpt2 or gemma2)."""
    from transformers import Gemma2Config, GPT2Config, LlamaConfig, PretrainedConfig

    common: dict[str, Any] = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    cfg: PretrainedConfig
    if family == "llama":  # untied head, RMSNorm, RoPE, grouped-query attention
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=False, **common)
    elif family == "gpt2":  # tied embeddings, biases everywhere, learned positions
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, tie_word_embeddings=True,
                         **common)
    elif family == "gemma2":  # final-logit soft-capping, tied, sliding-window layers
        cfg = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           max_position_embeddings=256, final_logit_softcapping=5.0,
                           attn_logit_softcapping=50.0, sliding_window=16, **common)
    else:
        raise ValueError(f"unknown tiny model family {family!r}; expected one of {FAMILIES}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def make_tiny_model(family: Family, path: str | Path, seed: int = 0, *, tokenizer: str | object = "plain",
                    **config_overrides) -> Path:
    """Build a random tiny causal LM of ``family`` and save it with its tokenizer under ``path``.

    The result loads with ``AutoModelForCausalLM.from_pretrained(path)`` and
    ``AutoTokenizer.from_pretrained(path)``; weights are float32 safetensors. The same ``seed`` gives
    the same weights bit for bit. ``tokenizer`` is a :func:`make_tokenizer` kind or a tokenizer; the
    embedding is sized to its vocabulary.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tok: Any = make_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer  # a tokenizer either way
    cfg = tiny_config(family, len(tok), **config_overrides)
    # Eager attention: identical numerics for padded and unpadded batches on CPU, and the only
    # implementation that applies Gemma-2's attention soft-capping.
    cfg._attn_implementation = "eager"
    fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
        if family == "llama":
            # Random init gives near-uniform logits; a larger head makes log-probs less trivial.
            with torch.no_grad():
                model.lm_head.weight.mul_(8.0)
    path.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" for one tiny shard is noise in every caller's output
    try:
        model.save_pretrained(path, safe_serialization=True)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    tok.save_pretrained(path)
    return path


def load_tiny(path: str | Path):
    """``(model, tokenizer)`` loaded from ``path`` with eager attention, in eval mode, trainable.

    Through the safe loader (:func:`refmodel.models.loading.load_model`: safetensors only, no remote code).
    """
    from .loading import load_model, load_tokenizer

    model = load_model(path, attn_implementation="eager", freeze=False)
    return model, load_tokenizer(path)


__all__ = ["CHAT_TEMPLATE", "CHAT_TEMPLATE_BOS", "CHAT_TEMPLATE_EOS", "FAMILIES", "TOKENIZER_KINDS", "Family",
           "load_tiny", "make_tiny_model", "make_tokenizer", "tiny_config"]
