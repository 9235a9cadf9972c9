"""``quantize-report``'s speed column: warmed-up, paired rounds, so equal work reads as ~1x; its KL column
scores the same tokens as its ``|Δ log p|`` column (model_logprobs' alignment)."""

from __future__ import annotations

import math

import pytest
import torch

from refmodel.logprobs.model import model_logprobs
from refmodel.models.loading import load_reference_model, load_tokenizer
from refmodel.testing import builtin_dataset_path
from refmodel.tools.quantize_report import (
    _paired_speed,
    _scored_log_dist,
    build_batches,
    quantize_report,
    read_pairs,
)


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


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_kl_rows_are_the_tokens_model_logprobs_scores(tiny_model_dirs, family):
    """The full distributions behind the KL column, gathered at the actual tokens, equal model_logprobs at its
    scored positions, in order, also for a left-padded batch (out[:, t] = log p(ids[t] | ids[:t]), a sequence's
    first real token unscored, positions counted from the mask). 1e-5 nats, fp32."""
    model = load_reference_model(tiny_model_dirs[family])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, model.config.vocab_size, (3, 9), generator=g)
    attn = torch.ones(3, 9, dtype=torch.long)
    attn[0, :3] = 0  # left padding
    attn[2, 7:] = 0  # right padding
    score = attn.bool()  # every real token, the first one included: it has no prefix and must be dropped
    score[1, :4] = False
    lp = model_logprobs(model, ids, attn, score)
    dist = _scored_log_dist(model, ids, attn, score)
    want = lp[lp != 0]
    assert dist.shape[0] == want.numel() == 6 + 4 + 6
    targets = ids[:, 1:][(lp != 0)[:, 1:]]
    torch.testing.assert_close(dist.gather(1, targets[:, None])[:, 0], want, atol=1e-5, rtol=0)
