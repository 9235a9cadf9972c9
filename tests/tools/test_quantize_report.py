"""``quantize-report``'s speed column: warmed-up, paired rounds, so equal work reads as ~1x."""

from __future__ import annotations

import math

import pytest

from refmodel.models.loading import load_reference_model, load_tokenizer
from refmodel.testing import builtin_dataset_path
from refmodel.tools.quantize_report import _paired_speed, build_batches, quantize_report, read_pairs


def test_paired_speed_of_a_model_against_itself_is_about_one(tiny_model_dirs):
    # Two copies of the same model do the same work: the old method (one cold pass against warm ones)
    # could read 0.85x or 71x here; paired, warmed-up rounds with a median stay near 1x even on a
    # machine shared with other jobs.
    path = tiny_model_dirs["llama"]
    batches = build_batches(load_tokenizer(path), read_pairs(builtin_dataset_path(), 8), 8)
    a, b = load_reference_model(path), load_reference_model(path)
    for model in (a, b):
        _paired_speed(model, model, batches, "cpu", 1)  # warm-up
    seconds, ratio = _paired_speed(a, b, batches, "cpu", 5)
    assert seconds > 0 and 1 / 3 < ratio < 3, ratio


def test_report_rows_and_bad_settings(tiny_model_dirs):
    rows = quantize_report(tiny_model_dirs["gpt2"], builtin_dataset_path(), max_pairs=4, modes=("int8",),
                           repeats=2)
    assert [r["mode"] for r in rows] == ["none", "int8"]
    assert all(math.isfinite(r["speed_vs_ref"]) and r["speed_vs_ref"] > 0 for r in rows)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        quantize_report(tiny_model_dirs["gpt2"], builtin_dataset_path(), repeats=0)
