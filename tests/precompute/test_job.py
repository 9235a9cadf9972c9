"""The precompute job against model_logprobs, its crash safety and the store CLI.

Tolerance 1e-5 nats in float32 storage: prefix sharing runs the completion through a KV cache while
model_logprobs runs the full padded sequence, so only float32 summation order differs.
"""

from __future__ import annotations

import json
import pickle
import random

import pytest
import torch
from precompute_helpers import kill_after_shards

from refmodel import fingerprint, model_logprobs
from refmodel.data import load_examples
from refmodel.errors import ConfigError
from refmodel.precompute.job import precompute
from refmodel.store import LogprobStore
from refmodel.testing import load_tiny, preference_pairs, run_cli, write_jsonl

ATOL = 1e-5


def _padded(seqs, pad, side="right"):
    t = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), t), pad)
    attn = torch.zeros(len(seqs), t, dtype=torch.long)
    score = torch.zeros(len(seqs), t, dtype=torch.bool)
    for b, (s, m) in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(t - len(s), t)
        ids[b, sl], attn[b, sl], score[b, sl] = torch.tensor(s), 1, torch.tensor(m)
    return ids, attn, score


@torch.no_grad()
@pytest.mark.filterwarnings("error::FutureWarning")  # transformers' renamed KV-cache argument warned on every batch
@pytest.mark.filterwarnings("error::DeprecationWarning")  # nor any deprecated API on the hot path (pytest.ini ignores them)
@pytest.mark.parametrize("share_prompt", [True, False])
def test_equals_model_logprobs(tiny, tmp_path, share_prompt):
    model, tok = tiny
    pairs = preference_pairs(24, seed=3)
    pairs.append({"prompt": "what is 1 plus 1 ?", "completion": "it is 2 ."})
    store = precompute(model, pairs, tmp_path / "s", tokenizer=tok, dtype="float32", max_tokens_per_batch=160,
                       shard_examples=10, share_prompt=share_prompt, progress=False)
    assert store.fingerprint == fingerprint(model) and store.info()["shards"] == 3
    seqs = [s for ex in load_examples(pairs, tok) for s in ex.sequences()]
    assert len(store) == len({tuple(s) for s, _ in seqs})
    for s, m in seqs:  # one at a time: the reference has no padding at all
        want = model_logprobs(model, torch.tensor([s]), score_mask=torch.tensor([m]))[0]
        torch.testing.assert_close(store.get(s), want, atol=ATOL, rtol=0)
        assert store.get_sum(s) == pytest.approx(float(want.sum()), abs=1e-4)


@torch.no_grad()
def test_reordered_and_filtered_data_still_hit(tiny_model_dirs, tmp_path):
    model, tok = load_tiny(tiny_model_dirs["llama"])
    pairs = preference_pairs(30, seed=5)
    store = precompute(model, pairs, tmp_path / "s", tokenizer=tok, progress=False)  # bf16 storage
    subset = random.Random(0).sample(pairs, 12)  # shuffled and filtered
    seqs = [s for ex in load_examples(subset, tok) for s in ex.sequences()]
    for side in ("left", "right"):
        ids, attn, score = _padded(seqs, tok.pad_token_id, side)
        got = store.get_batch(ids, attn)
        want = model_logprobs(model, ids, attn, score)
        torch.testing.assert_close(got, want, rtol=2.0**-8, atol=1e-6)  # bf16 storage: half an ulp
        assert torch.equal(got[attn == 0], torch.zeros(int((attn == 0).sum())))


def test_existing_store_needs_resume_and_same_job(tiny_model_dirs, tmp_path):
    model, tok = load_tiny(tiny_model_dirs["gpt2"])
    pairs = preference_pairs(6)
    precompute(model, pairs, tmp_path / "s", tokenizer=tok, progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        precompute(model, pairs, tmp_path / "s", tokenizer=tok, progress=False)
    with pytest.raises(ConfigError, match="another job"):
        precompute(model, pairs[:3], tmp_path / "s", tokenizer=tok, resume=True, progress=False)
    assert len(precompute(model, pairs, tmp_path / "s", tokenizer=tok, resume=True, progress=False)) == 12


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != "writer.lock"}


@pytest.mark.integration
def test_kill_9_then_resume_gives_identical_bytes(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["llama"]
    data = write_jsonl(preference_pairs(600, seed=9), tmp_path / "d.jsonl")
    args = ["precompute", "--model", model_dir, "--data", data, "--max-tokens-per-batch", "256",
            "--shard-examples", "20"]
    full = run_cli(*args, "--out", tmp_path / "full")
    shards = json.loads(full.stdout)["shards"]
    assert shards >= 10

    out = tmp_path / "killed"
    done = kill_after_shards(args, out, at_least=3)
    assert 3 <= done < shards, done  # killed mid-run
    run_cli(*args, "--out", out, "--resume")
    assert _files(out) == _files(tmp_path / "full")
    assert f"{shards} shards" in run_cli("store", "verify", out).stdout


@pytest.mark.integration
def test_cli_info_verify_export_and_halos(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["llama"]
    data = write_jsonl(preference_pairs(8, seed=2), tmp_path / "d.jsonl")
    run_cli("precompute", "--model", model_dir, "--data", data, "--out", tmp_path / "s", "--dtype", "float32")
    info = json.loads(run_cli("store", "info", tmp_path / "s").stdout)
    assert info["entries"] == 16 and info["dtype"] == "float32"

    run_cli("store", "export-trl", tmp_path / "s", "--data", data, "--model", model_dir, "--out", tmp_path / "t.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    model, tok = load_tiny(model_dir)
    ex = load_examples([rows[0]], tok)[0]
    ids, m = ex.sequences()[1]
    with torch.no_grad():
        want = model_logprobs(model, torch.tensor([ids]), score_mask=torch.tensor([m])).sum()
    assert rows[0]["ref_rejected_logps"] == pytest.approx(float(want), abs=1e-4)

    # HALOs cache: token-id tuple -> per-token log-probs aligned to ids[1:], 0 where unscored.
    store = LogprobStore.open(tmp_path / "s")
    halos = {tuple(ids): store.get(ids)[1:].tolist()}
    (tmp_path / "h.pkl").write_bytes(pickle.dumps(halos))
    run_cli("store", "import-halos", tmp_path / "h.pkl", "--model", model_dir, "--out", tmp_path / "h",
            "--dtype", "float32")
    assert torch.equal(LogprobStore.open(tmp_path / "h").get(ids), store.get(ids))

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({(1, 2): Evil()}))
    bad = run_cli("store", "import-halos", tmp_path / "evil.pkl", "--model", model_dir, "--out", tmp_path / "e",
                  check=False)
    assert bad.returncode != 0 and "refusing to unpickle" in bad.stderr and "system" in bad.stderr
    assert not (tmp_path / "pwned").exists()

    shard = tmp_path / "s" / "shard-00000.safetensors"
    data_bytes = bytearray(shard.read_bytes())
    data_bytes[-5] ^= 1
    shard.write_bytes(bytes(data_bytes))
    res = run_cli("store", "verify", tmp_path / "s", check=False)
    assert res.returncode != 0 and "StoreCorrupt" in res.stderr
