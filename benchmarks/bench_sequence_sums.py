"""Sequence sums from a bf16 store: the stored float32 sums against summing the bf16 token values.

    python -m benchmarks.bench_sequence_sums [--pairs 200] [--kind bos_eos]

Precomputes the built-in pairs with a tiny Llama into a bfloat16 store, then compares, per sequence,
(a) ``Precomputed.sequence_logps`` (the store's float32 sum) and (b) the sum of the stored bf16 token
values against the live float32 ``model_logprobs`` sum: max and mean |error| in nats.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

import torch

from refmodel.tools.bench import provenance


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--kind", default="bos_eos", help="refmodel.testing.make_tokenizer kind")
    args, _ = parser.parse_known_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.disable(logging.WARNING)
    from refmodel import LogprobStore, Precomputed, fingerprint, model_logprobs, precompute
    from refmodel.data import collate, load_examples
    from refmodel.testing import load_tiny, make_tiny_model, preference_pairs

    tmp = Path(tempfile.mkdtemp())
    model, tok = load_tiny(make_tiny_model("llama", tmp / "model", tokenizer=args.kind))
    rows = preference_pairs(args.pairs, seed=5)
    precompute(model, rows, tmp / "store", tokenizer=tok, dtype="bfloat16", progress=False)
    ref = Precomputed(LogprobStore.open(tmp / "store", fingerprint(model)))
    seqs = [s for ex in load_examples(rows, tok) for s in ex.sequences()]
    stored, bf16, live = [], [], []
    for lo in range(0, len(seqs), 64):
        batch = collate(seqs[lo:lo + 64], tok.pad_token_id)
        out = ref.sequence_logps(**batch)
        with torch.no_grad():
            live.append(model_logprobs(model, **batch).sum(1))
        stored.append(out.sequence_logps)
        bf16.append(out.token_logprobs.sum(1))
    live_t = torch.cat(live)
    print(f"# sequence sums, bf16 store: {len(seqs)} sequences, tiny llama, tokenizer {args.kind}")
    print(f"# {provenance()}")
    for name, got in (("stored float32 sum", torch.cat(stored)), ("sum of bf16 token values", torch.cat(bf16))):
        err = (got - live_t).abs()
        print(f"{name:<26} max |err| {err.max():.2e} nats  mean {err.mean():.2e}")


if __name__ == "__main__":
    main()
