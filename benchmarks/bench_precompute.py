"""Precompute throughput: refmodel.precompute vs TRL DPOTrainer(precompute_ref_log_probs=True).

    python -m benchmarks.bench_precompute [--pairs 1000] [--shots 8]

Same tiny llama model, same preference pairs, same token ids (TRL appends EOS to text completions, so
our records carry " </s>" and TRL's completions a leading space). Each prompt is a few-shot prompt:
``--shots`` other question/answer pairs, then the question, so prompts are long and completions short,
as in most preference data (0 shots: the bare ~7-token questions, where fixed costs dominate).

Both timed rows exclude tokenization (TRL's precompute time is the difference between two trainer
inits that both tokenize; refmodel gets the same token ids pre-tokenized). refmodel's time includes
fingerprinting the model, planning and fsyncing the store. Also timed: refmodel from text (tokenizing
inside), and the naive baseline (one model_logprobs call per sequence). Per-sequence sums are compared
with TRL's (float32).

The scaling sweep (issue 27): time per 1k pairs and peak RSS as the dataset grows, one subprocess per size::

    python -m benchmarks.bench_precompute --sizes 1k,4k,16k,64k

Each size is a JSONL file of pre-tokenized pairs (128 prompt + 2 x 64 response tokens, every pair
distinct), written by the subprocess before it is measured, scored by a Llama built from a config
(:data:`SWEEP_MODEL`: ``refmodel.testing.make_tiny_model("llama")`` cut to hidden 32, 1 layer, 2 heads, SDPA
attention, vocabulary 95: small enough that 64k pairs take ~3 CPU minutes, since the point is how the job
scales) on ``--threads`` torch threads (default 1), into a bfloat16 store with the default settings. Time is
wall-clock and CPU (user + system of the process: steadier on a shared machine). Peak RSS is the
kernel's high-water mark (VmHWM) reset just before ``precompute`` is called, so it is the job's own peak
(the model and torch included). Acceptance: time per 1k pairs within 15% across sizes, peak RSS growing by
<= 10 MiB per 10k pairs from the smallest size to the largest.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from refmodel.tools.bench import provenance


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--shots", type=int, default=8, help="question/answer examples before each question")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="TRL precompute_ref_batch_size")
    parser.add_argument("--sizes", help="comma-separated pair counts (1k = 1000): run the scaling sweep (time per 1k "
                        "pairs and peak RSS, one subprocess per size) instead of the TRL comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the scaling sweep")
    parser.add_argument("--one-size", type=int, help=argparse.SUPPRESS)  # a child of the sweep
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_size:
        return _one_size(args.one_size, Path(args.model_dir), args.threads)
    if args.sizes:
        return _sweep([_pairs(size) for size in args.sizes.split(",")], args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.disable(logging.WARNING)
    from refmodel import model_logprobs, precompute
    from refmodel.data import load_examples
    from refmodel.testing import load_tiny, make_tiny_model, preference_pairs

    tmp = Path(tempfile.mkdtemp())
    model_dir = make_tiny_model("llama", tmp / "model")
    model, tok = load_tiny(model_dir)
    pairs = preference_pairs(args.pairs, seed=11)
    shots = preference_pairs(args.pairs * args.shots, seed=12)
    for i, p in enumerate(pairs):
        context = " ".join(f"{s['prompt']} {s['chosen']}" for s in shots[i * args.shots:(i + 1) * args.shots])
        p["prompt"] = f"{context} {p['prompt']}".strip()
    ours = [{"prompt": p["prompt"], "chosen": p["chosen"] + " </s>", "rejected": p["rejected"] + " </s>"} for p in pairs]
    examples = load_examples(ours, tok)
    pretokenized = [{"prompt_ids": list(ex.prompt_ids), "chosen_ids": list(ex.completions[0]),
                     "rejected_ids": list(ex.completions[1])} for ex in examples]
    seqs = [s for ex in examples for s in ex.sequences()]
    tokens = sum(len(s) for s, _ in seqs)
    prompt_tokens = sum(len(ex.prompt_ids) for ex in examples)
    print(f"# precompute: {args.pairs} pairs, {tokens} sequence tokens ({prompt_tokens} distinct prompt tokens), "
          f"{args.shots}-shot prompts, tiny llama, fp32 compute")
    print(f"# {provenance()}")

    def timed(records, name):
        times = []
        for rep in range(args.reps):  # median of reps: the machine may be shared
            t0 = time.perf_counter()
            out = precompute(model, records, tmp / f"{name}{rep}", tokenizer=tok, dtype="float32", progress=False)
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    t_ours, store = timed(pretokenized, "ids")
    rows = {"refmodel.precompute": t_ours, "refmodel (+ tokenizing)": timed(ours, "text")[0]}

    t0 = time.perf_counter()
    with torch.no_grad():
        naive = [model_logprobs(model, torch.tensor([s]), score_mask=torch.tensor([m])).sum().item() for s, m in seqs]
    rows["naive unbatched"] = time.perf_counter() - t0

    trl_note = ""
    try:
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        trl_pairs = [{"prompt": p["prompt"], "chosen": " " + p["chosen"], "rejected": " " + p["rejected"]} for p in pairs]

        def trainer(precompute_flag):
            cfg = DPOConfig(output_dir=str(tmp / f"trl{precompute_flag}"), precompute_ref_log_probs=precompute_flag,
                            precompute_ref_batch_size=args.batch_size, per_device_train_batch_size=args.batch_size,
                            report_to=[], use_cpu=True, dataset_num_proc=None, bf16=False, fp16=False)
            return DPOTrainer(model=load_tiny(model_dir)[0], args=cfg, train_dataset=Dataset.from_list(trl_pairs),
                              processing_class=tok)

        diffs = []
        for _ in range(args.reps):  # TRL's precompute = init with it minus init without it
            t0 = time.perf_counter()
            trainer(False)
            t_setup = time.perf_counter() - t0
            t0 = time.perf_counter()
            tr = trainer(True)
            diffs.append(time.perf_counter() - t0 - t_setup)
        rows["TRL DPOTrainer precompute"] = statistics.median(diffs)
        ref = torch.tensor(list(tr.train_dataset["ref_chosen_logps"]) + list(tr.train_dataset["ref_rejected_logps"]))
        mine = torch.tensor([store.get_sum(s) for s, _ in seqs[0::2]] + [store.get_sum(s) for s, _ in seqs[1::2]])
        trl_note = f"max |sum(refmodel) - sum(TRL)| = {(ref - mine).abs().max():.2e} nats over {len(ref)} sequences"
    except Exception as exc:  # report exactly why TRL could not run
        trl_note = f"TRL baseline did not run: {type(exc).__name__}: {exc}"
    mine_all = torch.tensor([store.get_sum(s) for s, _ in seqs])
    print(f"{'impl':<28}{'seconds':>10}{'tokens/s':>12}{'refmodel speed-up':>20}")
    for name, secs in rows.items():
        print(f"{name:<28}{secs:>10.3f}{tokens / secs:>12.0f}{secs / t_ours:>19.2f}x")
    print(f"max |sum(refmodel) - sum(naive)| = {(mine_all - torch.tensor(naive)).abs().max():.2e} nats")
    print(trl_note)


PROMPT, RESPONSE = 128, 64  # tokens
SWEEP_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
               "num_key_value_heads": 1}


def _pairs(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1000) if text.endswith("k") else int(text)


def _records(n: int, vocab: int):
    """``n`` distinct pre-tokenized pairs, made on the fly (ids in [4, vocab): clear of pad/bos/eos)."""
    rng = np.random.default_rng(0)
    for _ in range(n):
        ids = rng.integers(4, vocab, PROMPT + 2 * RESPONSE).tolist()
        yield {"prompt_ids": ids[:PROMPT], "chosen_ids": ids[PROMPT:PROMPT + RESPONSE],
               "rejected_ids": ids[PROMPT + RESPONSE:]}


def _one_size(n: int, model_dir: Path, threads: int) -> None:
    """Child: write ``n`` pairs to JSONL, then time ``precompute`` on them and print its JSON line."""
    torch.set_num_threads(threads)
    logging.disable(logging.WARNING)
    from refmodel import precompute
    from refmodel.testing import load_tiny, write_jsonl
    from refmodel.tools.bench import peak_rss_bytes, reset_peak_rss

    model, tok = load_tiny(model_dir)
    model.set_attn_implementation("sdpa")  # the tiny models are saved with eager attention (for exact tests)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_jsonl(_records(n, len(tok)), Path(tmp) / "pairs.jsonl")
        before = peak_rss_bytes()
        reset_peak_rss()
        t0, c0 = time.perf_counter(), time.process_time()
        store = precompute(model, data, Path(tmp) / "store", tokenizer=tok, progress=False)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = peak_rss_bytes()
        entries = len(store)
        store.close()
    print(json.dumps({"pairs": n, "seconds": seconds, "cpu": cpu, "peak_rss": peak, "rss_before": before,
                      "entries": entries}))


def _sweep(sizes: list[int], threads: int) -> None:
    """Parent: one child per size; the table and the acceptance verdict."""
    from refmodel.testing import make_tiny_model

    tmp = Path(tempfile.mkdtemp())
    model_dir = make_tiny_model("llama", tmp / "model", **SWEEP_MODEL)
    print(f"# precompute scaling: pre-tokenized pairs ({PROMPT} prompt + 2 x {RESPONSE} response tokens), llama "
          f"{SWEEP_MODEL} with SDPA, bfloat16 store, default settings, {threads} torch thread(s), one process per size")
    torch.set_num_threads(threads)
    print(f"# {provenance()}")
    rows = []
    for n in sizes:
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_precompute", "--one-size", str(n),
                              "--model-dir", str(model_dir), "--threads", str(threads)],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"the {n}-pair run failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        if rows[-1]["entries"] != 2 * n:
            raise SystemExit(f"the {n}-pair store holds {rows[-1]['entries']} entries, expected {2 * n}")
    mib = 2 ** 20
    first = rows[0]
    print(f"{'pairs':>8}{'wall s':>9}{'wall s/1k':>11}{'CPU s':>9}{'CPU s/1k':>10}{'CPU vs first':>14}"
          f"{'peak RSS MiB':>14}{'MiB / 10k pairs':>17}")
    for r in rows:
        growth = ("" if r is first else
                  f"{(r['peak_rss'] - first['peak_rss']) / mib / ((r['pairs'] - first['pairs']) / 10_000):+.2f}")
        print(f"{r['pairs']:>8}{r['seconds']:>9.1f}{r['seconds'] / r['pairs'] * 1000:>11.3f}{r['cpu']:>9.1f}"
              f"{r['cpu'] / r['pairs'] * 1000:>10.3f}{r['cpu'] / r['pairs'] / (first['cpu'] / first['pairs']):>13.2f}x"
              f"{r['peak_rss'] / mib:>14.1f}{growth:>17}")
    last = rows[-1]
    slope = (last["peak_rss"] - first["peak_rss"]) / mib / max((last["pairs"] - first["pairs"]) / 10_000, 1e-9)
    for name in ("seconds", "cpu"):
        per_k = [r[name] / r["pairs"] * 1000 for r in rows]
        flat = max(per_k) / min(per_k)
        print(f"{'wall' if name == 'seconds' else 'CPU'} time per 1k pairs: max/min {flat:.2f} "
              f"(<= 1.15: {'met' if flat <= 1.15 else 'NOT met'})")
    print(f"peak RSS {slope:+.2f} MiB per 10k pairs from {first['pairs']} to {last['pairs']} pairs "
          f"(<= 10: {'met' if slope <= 10 else 'NOT met'})")


if __name__ == "__main__":
    main()
