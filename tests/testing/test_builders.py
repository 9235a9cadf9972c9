import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import refmodel
from refmodel import errors
from refmodel.testing import (
    BUILTIN_DATASET_SIZE,
    builtin_dataset_path,
    make_tiny_model,
    make_tokenizer,
    preference_pairs,
    run_cli,
    subprocess_env,
)


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


def test_preference_pairs_deterministic_and_correct():
    pairs = preference_pairs(200, seed=3)
    assert pairs == preference_pairs(200, seed=3)
    assert pairs != preference_pairs(200, seed=4)
    for pair in pairs:
        assert set(pair) == {"prompt", "chosen", "rejected"}
        assert pair["chosen"] != pair["rejected"]
        words = pair["prompt"].split()
        if len(words) == 6 and words[3] in ("plus", "minus"):  # "what is A op B ?"
            a, b = int(words[2]), int(words[4])
            expected = a + b if words[3] == "plus" else a - b
            assert pair["chosen"].split()[-2] == str(expected)
            assert pair["rejected"].split()[-2] != str(expected)


def test_builtin_dataset_is_the_generator_output():
    lines = builtin_dataset_path().read_text().splitlines()
    assert len(lines) == BUILTIN_DATASET_SIZE
    assert [json.loads(x) for x in lines] == preference_pairs(BUILTIN_DATASET_SIZE, seed=0)


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


def test_cli_help_and_version():
    out = run_cli("--help")
    for command in ("demo", "bench", "make-tiny-model"):
        assert command in out.stdout
    assert refmodel.__version__ in run_cli("--version").stdout
    bad = run_cli("no-such-command", check=False)
    assert bad.returncode != 0 and "No such command" in bad.stderr


def test_error_hierarchy():
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.RefModelError)
    assert issubclass(errors.InvalidBatch, ValueError)
    assert issubclass(errors.StoreMiss, KeyError)
    assert str(errors.StoreMiss("no entry for key abc")) == "no entry for key abc"


def test_import_has_no_side_effects():
    code = "import os, refmodel, sys; env = dict(os.environ); assert 'ray' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=subprocess_env())
    assert out.stdout.strip() == "ok"
