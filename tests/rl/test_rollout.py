"""Rollouts: layout, masks, EOS stopping, the sampler's processed log-probs, prompt formats, bad input."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from rl_helpers import eos_likely, make_rollouts

from refmodel import model_logprobs
from refmodel.errors import ConfigError, DataFormatError
from refmodel.rl import SamplingConfig, generate_rollouts
from refmodel.testing import load_tiny, make_tokenizer, tiny_config


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
    assert (ro.sampler_logprobs[~ro.completion_mask] == 0).all()
    torch.testing.assert_close(ro.sampler_logprobs, scored, atol=1e-4, rtol=0)


def test_top_k_logps_are_renormalised_over_the_kept_support(llama):
    model, tok = llama
    ro = make_rollouts(model, tok, n_prompts=4, generations=4, max_new_tokens=4, top_k=5)
    full = model_logprobs(model, ro.input_ids, ro.attention_mask, ro.completion_mask)
    m = ro.completion_mask
    gap = ro.sampler_logprobs[m] - full[m]  # = -log(kept mass) >= 0
    assert (gap > -1e-5).all() and (gap > 1e-3).any()


def test_seeded_rollouts_repeat(llama):
    model, tok = llama
    a = make_rollouts(model, tok, seed=3)
    b = make_rollouts(model, tok, seed=3)
    assert torch.equal(a.input_ids, b.input_ids)


# Tokenizers that add nothing, BOS, or BOS and EOS, word-level and byte-level BPE, each with a chat template.
PROMPT_TOKENIZERS = ("plain", "bos", "bos_eos", "byte_bpe", "byte_bpe_bos", "byte_bpe_bos_eos")
TEXT_PROMPTS = ["what comes after 4", "what is 2 plus 13 ?", "so"]


def _prompts(form: str) -> list:
    if form == "text":
        return list(TEXT_PROMPTS)
    return [[{"role": "user", "content": p}] for p in TEXT_PROMPTS]


def _trl_prompt_ids(tok, prompts: list) -> list[list[int]]:
    """TRL 1.16's own ``GRPOTrainer._tokenize_prompts`` on a stand-in ``self`` holding the attributes it
    reads (``test_grpo_trainer_stand_in_is_the_trainer`` checks it against a real trainer)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    self = SimpleNamespace(_is_vlm=False, environment_factories=None, processing_class=tok, tools=None,
                           chat_template=None, chat_template_kwargs={})
    ids, _, _ = GRPOTrainer._tokenize_prompts(self, prompts)
    return [list(x) for x in ids]


def _rollout_prompt_ids(model, tok, prompts: list, g: int = 2) -> list[list[int]]:
    ro = generate_rollouts(model, tok, prompts, SamplingConfig(num_generations=g, max_new_tokens=1, seed=0))
    p = ro.prompt_width
    rows = range(0, ro.batch_size, g)  # the first row of each prompt's group
    assert all(torch.equal(ro.input_ids[r, :p], ro.input_ids[r + 1, :p]) for r in rows)
    return [ro.input_ids[r, p - int(ro.prompt_lengths[r]):p].tolist() for r in rows]


@pytest.fixture(scope="module")
def any_vocab_model():
    """A tiny random Llama whose embedding covers every tokenizer of PROMPT_TOKENIZERS."""
    from transformers import AutoModelForCausalLM

    size = max(len(make_tokenizer(kind)) for kind in PROMPT_TOKENIZERS)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama", size), attn_implementation="eager").eval()


@pytest.mark.parametrize("form", ["text", "chat"])
@pytest.mark.parametrize("kind", PROMPT_TOKENIZERS)
def test_prompt_ids_are_trls(any_vocab_model, kind, form):
    """The rollouts start from exactly the prompt ids TRL's GRPO generates from: special tokens added to
    text prompts (BOS, and EOS for a BOS+EOS post-processor), the chat template for messages."""
    pytest.importorskip("trl")
    tok = make_tokenizer(kind)
    prompts = _prompts(form)
    want = _trl_prompt_ids(tok, prompts)
    assert _rollout_prompt_ids(any_vocab_model, tok, prompts) == want
    records = [{"prompt": p} for p in prompts]  # prompt-only records tokenize like their bare prompts
    assert _rollout_prompt_ids(any_vocab_model, tok, records) == want
    if kind.endswith("bos") or kind.endswith("bos_eos"):
        assert all(ids[0] == tok.bos_token_id for ids in want)  # the case the old no-special-tokens rule broke


@pytest.mark.slow
def test_grpo_trainer_stand_in_is_the_trainer(any_vocab_model):
    """A real ``trl.GRPOTrainer`` on the tiny model tokenizes prompts as the stand-in above."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    tok = make_tokenizer("byte_bpe_bos_eos")
    warnings.filterwarnings("ignore", category=FutureWarning)  # training_args deprecations
    args = trl.GRPOConfig(output_dir="unused", report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=2,
                          num_generations=2, max_completion_length=2)
    trainer = trl.GRPOTrainer(model=any_vocab_model, reward_funcs=lambda prompts, completions, **kw: [0.0] * len(prompts),
                              args=args, train_dataset=datasets.Dataset.from_list([{"prompt": "so"}] * 2),
                              processing_class=tok)
    for form in ("text", "chat"):
        prompts = _prompts(form)
        ids, _, _ = trainer._tokenize_prompts(prompts)
        assert [list(x) for x in ids] == _trl_prompt_ids(tok, prompts) == _rollout_prompt_ids(any_vocab_model, tok,
                                                                                            prompts)


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
    with pytest.raises(DataFormatError, match="prompt 1: the prompt is empty"):
        generate_rollouts(model, tok, ["so", " "], SamplingConfig(num_generations=2))
