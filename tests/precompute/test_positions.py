"""Precompute checks the model's position limit before any store is made (issue 19, item 1)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, LlamaConfig

from refmodel import model_logprobs
from refmodel.errors import InvalidInput
from refmodel.models.limits import position_limit
from refmodel.precompute.job import precompute
from refmodel.testing import load_tiny, run_cli

LIMIT = 256  # both tiny families


def _pair(prompt_len, chosen_len, rejected_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(4, 60, (n,), generator=g).tolist()  # noqa: E731
    return {"prompt_ids": ids(prompt_len), "chosen_ids": ids(chosen_len), "rejected_ids": ids(rejected_len)}


def test_position_limit_of_configs():
    assert position_limit(GPT2Config(n_positions=300)) == (300, "n_positions")
    assert position_limit(LlamaConfig(max_position_embeddings=77)) == (77, "max_position_embeddings")
    assert position_limit(object()) is None


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_over_length_row_is_refused_before_a_store_exists(tiny_model_dirs, tmp_path, family):
    model, _ = load_tiny(tiny_model_dirs[family])
    records = [_pair(10, 5, 5), _pair(250, 6, 7, seed=1), _pair(300, 1, 1, seed=2)]
    with pytest.raises(InvalidInput, match=r"record 1: the rejected sequence has 257 tokens .* position limit of "
                                           r"256 \(config\.(n_positions|max_position_embeddings)\); 2 of 3 rows"):
        precompute(model, records, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


@torch.no_grad()
def test_rows_at_the_limit_are_scored(tiny_model_dirs, tmp_path):
    model, _ = load_tiny(tiny_model_dirs["gpt2"])
    records = [_pair(200, 56, 50), _pair(3, 253, 1, seed=1)]
    store = precompute(model, records, tmp_path / "s", dtype="float32", progress=False)
    for r in records:
        for name in ("chosen", "rejected"):
            ids = r["prompt_ids"] + r[f"{name}_ids"]
            mask = torch.arange(len(ids)) >= len(r["prompt_ids"])
            want = model_logprobs(model, torch.tensor([ids]), score_mask=mask[None])[0]
            torch.testing.assert_close(store.get(ids), want, atol=1e-5, rtol=0)


@pytest.mark.integration
def test_cli_names_the_line_and_the_limit(tiny_model_dirs, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [_pair(5, 3, 3), _pair(5, 3, 3, 1), _pair(255, 2, 1, 2)]))
    res = run_cli("precompute", "--model", tiny_model_dirs["gpt2"], "--data", data, "--out", tmp_path / "s",
                  check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "d.jsonl:3: the chosen sequence has 257 tokens" in res.stderr and "n_positions" in res.stderr
    assert not (tmp_path / "s").exists()
