"""Rollouts: layout, masks, EOS stopping, the sampler's processed log-probs, prompt formats, bad input."""

from __future__ import annotations

import pytest
import torch
from rl_helpers import eos_likely, make_rollouts

from refmodel import model_logprobs
from refmodel.errors import ConfigError, DataFormatError
from refmodel.rl import SamplingConfig, generate_rollouts
from refmodel.testing import load_tiny


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    return load_tiny(tiny_model_dirs["llama"])


def test_layout_and_masks_with_eos(llama):
    model, tok = llama
    model = eos_likely(model)
    ro = make_rollouts(model, tok, n_prompts=3, generations=5, max_new_tokens=6)
    assert ro.input_ids.shape[0] == 15 and ro.group_index.tolist() == [g for g in range(3) for _ in range(5)]
    p = ro.prompt_width
    assert not ro.completion_mask[:, :p].any()
    assert (ro.attention_mask[:, :p].sum(1) == ro.prompt_lengths).all()
    assert (ro.completion_mask.sum(1) == ro.completion_lengths).all()
    assert (ro.completion_mask <= ro.attention_mask).all()
    comp = ro.input_ids[:, p:]
    stopped = 0
    for row in range(ro.batch_size):
        n = int(ro.completion_lengths[row])
        toks = comp[row, :n].tolist()
        assert 3 not in toks[:-1], "tokens after the first EOS must be masked"
        if ro.terminated[row]:
            stopped += 1
            assert toks[-1] == 3
            assert (comp[row, n:] == tok.pad_token_id).all()
            assert not ro.attention_mask[row, p + n:].any()
        else:
            assert n == 6
    assert 0 < stopped < ro.batch_size  # both kinds present, so padding after EOS is exercised
    assert ro.completions[0] == tok.decode(comp[0, :int(ro.completion_lengths[0])], skip_special_tokens=True).strip()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logps_equal_the_scored_logps_without_truncation(llama, temperature):
    model, tok = llama
    ro = make_rollouts(eos_likely(model), tok, n_prompts=4, generations=4, max_new_tokens=5, temperature=temperature)
    scored = model_logprobs(eos_likely(model), ro.input_ids, ro.attention_mask, ro.completion_mask,
                            temperature=temperature)
    assert (ro.sampler_logps[~ro.completion_mask] == 0).all()
    torch.testing.assert_close(ro.sampler_logps, scored, atol=1e-4, rtol=0)


def test_top_k_logps_are_renormalised_over_the_kept_support(llama):
    model, tok = llama
    ro = make_rollouts(model, tok, n_prompts=4, generations=4, max_new_tokens=4, top_k=5)
    full = model_logprobs(model, ro.input_ids, ro.attention_mask, ro.completion_mask)
    m = ro.completion_mask
    gap = ro.sampler_logps[m] - full[m]  # = -log(kept mass) >= 0
    assert (gap > -1e-5).all() and (gap > 1e-3).any()


def test_seeded_rollouts_repeat_and_conversational_prompts(llama):
    model, tok = llama
    a = make_rollouts(model, tok, seed=3)
    b = make_rollouts(model, tok, seed=3)
    assert torch.equal(a.input_ids, b.input_ids)
    conv = [{"prompt": [{"role": "user", "content": "what comes after 4"}]}]
    ro = generate_rollouts(model, tok, conv, SamplingConfig(num_generations=2, max_new_tokens=2, seed=0))
    text = tok.apply_chat_template(conv[0]["prompt"], tokenize=False, add_generation_prompt=True)
    want = tok(text, add_special_tokens=False)["input_ids"]
    assert ro.input_ids[0, :ro.prompt_width].tolist() == want


def test_bad_input(llama):
    model, tok = llama
    with pytest.raises(ConfigError, match="temperature"):
        SamplingConfig(temperature=0)
    with pytest.raises(ConfigError, match="top_p"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(DataFormatError, match="'prompt'"):
        generate_rollouts(model, tok, [{"question": "x"}], SamplingConfig(num_generations=2))
    with pytest.raises(DataFormatError, match="text or a list"):
        generate_rollouts(model, tok, [{"prompt": 3}], SamplingConfig(num_generations=2))
    with pytest.raises(DataFormatError, match="at least one"):
        generate_rollouts(model, tok, [], SamplingConfig(num_generations=2))
