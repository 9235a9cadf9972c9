"""A model's position limit: the longest sequence it can score (``n_positions`` / ``max_position_embeddings``).

Past it, GPT-2-style learned position embeddings raise ``IndexError`` and rotary models silently score
positions they were never trained on, so every entry that scores sequences checks it first.
"""

from __future__ import annotations

# Config attributes that hold the limit, in the order transformers' families use them.
POSITION_LIMIT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def position_limit(model_or_config) -> tuple[int, str] | None:
    """``(limit, config field)`` of a model (or its config, or a PEFT wrapper of it); None when it names none.

    Multimodal configs are looked into through their text config (``get_text_config()``, else ``text_config``).
    The one rule: precompute refuses, and the service answers 422 to, a sequence longer than this.
    """
    config = getattr(model_or_config, "config", model_or_config)
    get_text_config = getattr(config, "get_text_config", None)
    text_config = get_text_config() if callable(get_text_config) else getattr(config, "text_config", None)
    for cfg in (config, text_config):
        if cfg is None:
            continue
        for field in POSITION_LIMIT_FIELDS:
            value = getattr(cfg, field, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                # Name the field as config.json spells it (GPT-2 maps max_position_embeddings to n_positions).
                return value, (getattr(cfg, "attribute_map", None) or {}).get(field, field)
    return None


__all__ = ["POSITION_LIMIT_FIELDS", "position_limit"]
