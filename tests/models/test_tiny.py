"""The tiny models and tokenizers of refmodel.models.tiny: real configs and tokenizers, built locally."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from refmodel.data.builtin import preference_pairs
from refmodel.models.tiny import TOKENIZER_KINDS, make_tiny_model, make_tokenizer


def test_tiny_models_load_with_auto_classes(tiny_model_dirs, family):
    path = tiny_model_dirs[family]
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(["what is 3 plus 4 ? the answer is 7 ."], return_tensors="pt")["input_ids"]
    assert (ids != tok.unk_token_id).all(), "task words must be in the vocabulary"
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_family_features(tiny_model_dirs):
    llama = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gpt2"])
    gemma = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gemma2"])
    assert llama.get_output_embeddings().weight is not llama.get_input_embeddings().weight
    assert gpt2.get_output_embeddings().weight is gpt2.get_input_embeddings().weight
    assert gpt2.transformer.h[0].attn.c_attn.bias is not None
    assert gemma.config.final_logit_softcapping == 5.0
    assert gemma(torch.tensor([[5, 6, 7]])).logits.abs().max() <= 5.0


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    a = make_tiny_model("llama", tmp_path / "a", seed=1)
    b = make_tiny_model("llama", tmp_path / "b", seed=1)
    c = make_tiny_model("llama", tmp_path / "c", seed=2)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert not list(a.glob("*.bin")), "weights must be safetensors, never pickle"


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny model family 'bert'"):
        make_tiny_model("bert", tmp_path)


def test_tokenizer_concatenation_and_chat_template():
    tok = make_tokenizer()
    pair = preference_pairs(1)[0]
    joint = tok(pair["prompt"] + " " + pair["chosen"])["input_ids"]
    assert joint == tok(pair["prompt"])["input_ids"] + tok(pair["chosen"])["input_ids"]
    chat = tok.apply_chat_template([{"role": "user", "content": pair["prompt"]}], add_generation_prompt=True,
                                   tokenize=False)
    assert chat.startswith("<|user|> ") and chat.endswith("<|assistant|>")
    ids = tok(chat)["input_ids"]
    assert tok.unk_token_id not in ids


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_tokenizer_kinds_add_their_special_tokens(kind):
    tok = make_tokenizer(kind)
    ids = tok("what comes after 4")["input_ids"]
    bare = tok("what comes after 4", add_special_tokens=False)["input_ids"]
    bos = kind in ("bos", "bos_eos", "byte_bpe_bos", "byte_bpe_bos_eos", "metaspace")
    eos = kind.endswith("bos_eos")
    assert ids == [tok.bos_token_id] * bos + bare + [tok.eos_token_id] * eos
    assert tok.unk_token_id not in bare
    chat = tok.apply_chat_template([{"role": "user", "content": "what comes after 4"}], add_generation_prompt=True,
                                   tokenize=True, return_dict=True)["input_ids"]
    assert chat.count(tok.bos_token_id) == bos  # the template writes BOS once; no post-processor BOS on top
