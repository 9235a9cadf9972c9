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
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from refmodel.tools.bench import provenance


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--shots", type=int, default=8, help="question/answer examples before each question")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="TRL precompute_ref_batch_size")
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
