"""`refmodel precompute` (CLI, a child process) then `train(..., Precomputed strict)` finds every key.

For each tokenizer kind, on text and conversational pairs (plus implicit-prompt pairs and a record whose
prompt fills ``max_length``, which both sides drop), with truncation on: a strict ``Precomputed`` raises
``StoreMiss`` on any row the store lacks, so finishing training and evaluation over all of the data
means 100% of the keys were found; the hit counter says how many.
"""

from __future__ import annotations

import pytest

from refmodel import Precomputed, fingerprint
from refmodel.recipes.train import TrainConfig, tokenize_preferences, train
from refmodel.store import LogprobStore
from refmodel.testing import (
    TOKENIZER_KINDS,
    load_tiny,
    make_tiny_model,
    preference_pairs,
    run_cli,
    write_jsonl,
)

MAX_LENGTH = 24



def _rows() -> list[dict]:
    pairs = preference_pairs(12, seed=7)
    text = [{"prompt": p["prompt"], "chosen": " " * (i % 2) + p["chosen"], "rejected": " " * (i % 2) + p["rejected"]}
            for i, p in enumerate(pairs[:5])]
    conv = [{"prompt": [{"role": "user", "content": p["prompt"]}],
             "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs[5:10]]
    implicit = [{"chosen": p["prompt"] + " " + p["chosen"], "rejected": p["prompt"] + " " + p["rejected"]}
                for p in pairs[10:]]
    too_long = [{"prompt": "so " * 40 + pairs[0]["prompt"], "chosen": pairs[0]["chosen"],
                 "rejected": pairs[0]["rejected"]}]
    long_reply = [{"prompt": pairs[1]["prompt"], "chosen": pairs[1]["chosen"] + " so" * 30,
                   "rejected": pairs[1]["rejected"]}]
    return text + conv + implicit + too_long + long_reply


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_cli_store_serves_every_training_row(tmp_path, kind, cli_python):
    model_dir = make_tiny_model("llama", tmp_path / "model", tokenizer=kind)
    rows = _rows()
    data = write_jsonl(rows, tmp_path / "pairs.jsonl")
    run_cli("precompute", "--model", model_dir, "--data", data, "--out", tmp_path / "store",
            "--max-length", MAX_LENGTH, "--device", "cpu", python=cli_python)
    model, tok = load_tiny(model_dir)
    cfg = TrainConfig(batch_size=4, max_steps=3, max_length=MAX_LENGTH, progress=False, learning_rate=1e-3)
    kept = tokenize_preferences(rows, tok, cfg)
    assert len(kept) == len(rows) - 1  # only the over-long prompt is dropped
    assert any(len(ids) == MAX_LENGTH for ex in kept for ids, _ in ex.sequences())  # truncation happened
    ref = Precomputed(LogprobStore.open(tmp_path / "store", fingerprint(model)))  # strict: a miss raises
    result = train(model, tok, rows, cfg, reference=ref, eval_pairs=rows)
    assert ref.metrics() == {"hits": 2 * (3 * 4 + len(kept)), "misses": 0, "miss_rate": 0.0}
    assert result.reference_metrics["misses"] == 0


@pytest.mark.integration
def test_export_trl_uses_the_stores_tokenization(tmp_path, cli_python):
    """export-trl reads max_length from the store's job: DPO and KTO columns are the float32 sums of the
    very sequences TRL will build (bf16 store), and the records TRL drops get nulls."""
    import json

    import torch

    from refmodel import model_logprobs
    from refmodel.data import load_examples

    model_dir = make_tiny_model("llama", tmp_path / "model", tokenizer="bos_eos")
    pairs = preference_pairs(4, seed=3)
    rows = pairs[:2] + [{"prompt": p["prompt"], "completion": p["chosen"] + " so" * 30, "label": True}
                        for p in pairs[2:]] + [{**pairs[0], "prompt": "so " * 40}]
    data = write_jsonl(rows, tmp_path / "mixed.jsonl")
    run_cli("precompute", "--model", model_dir, "--data", data, "--out", tmp_path / "s", "--max-length", MAX_LENGTH,
            python=cli_python)
    run_cli("store", "export-trl", tmp_path / "s", "--data", data, "--model", model_dir, "--out", tmp_path / "t.jsonl",
            python=cli_python)
    got = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert got[-1]["ref_chosen_logps"] is None and got[-1]["ref_rejected_logps"] is None  # dropped by TRL
    model, tok = load_tiny(model_dir)
    for row, out in zip(rows[:-1], got[:-1], strict=True):
        ex = load_examples([row], tok, max_length=MAX_LENGTH)[0]
        cols = ["ref_logps"] if "label" in row else ["ref_chosen_logps", "ref_rejected_logps"]
        for (ids, mask), col in zip(ex.sequences(), cols, strict=True):
            assert len(ids) <= MAX_LENGTH
            with torch.no_grad():
                want = model_logprobs(model, torch.tensor([ids]), score_mask=torch.tensor([mask])).sum()
            assert out[col] == pytest.approx(float(want), abs=1e-4)  # float32 sums, not bf16 token values
