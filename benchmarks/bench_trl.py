"""TRL DPO (full fine-tuning): its own reference copy vs a refmodel store vs the refmodel service.

Each case trains ``trl.DPOTrainer`` / ``refmodel.integrations.trl.DPOTrainer`` for a few steps in a
fresh process, so that its peak resident memory (VmHWM, reset after the policy is loaded; the
reference copy TRL loads in ``__init__`` counts) is its own. Step time is the median over the steps
after ``--warmup``. Cases:

- ``trl``: TRL's default, a second copy of the model as reference, a reference forward per step;
- ``store``: ``reference=STORE`` written beforehand by ``refmodel precompute`` (not timed: a one-off);
- ``service``: ``reference=Remote(url, "ref")`` against a ``refmodel serve`` subprocess on 127.0.0.1
  (its memory is the server's and is printed beside, not added).

Ratios are to the ``trl`` case of the same run. float32 on CPU; small shapes so that it runs in a
minute or two here::

    python benchmarks/bench_trl.py                 # table
    python benchmarks/bench_trl.py --size tiny     # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {  # make_tiny_model overrides (llama family)
    "tiny": {},
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8),
    "medium": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=8),
}
CASES = ("trl", "store", "service")


def _status_kib(pid: str | int, key: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _dpo_args(out: str, steps: int, batch: int):
    import trl

    return trl.DPOConfig(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, logging_steps=1,
                         report_to=[], save_strategy="no", use_cpu=True, bf16=False, seed=0, learning_rate=1e-5,
                         disable_tqdm=True, dataloader_num_workers=0, max_length=128)


def run_case(case: str, policy_dir: str, ref_dir: str, store: str, url: str, data: str, steps: int, batch: int,
             warmup: int, threads: int) -> dict:
    """One case in this process: ``{case, peak_rss_mib, ref_weights_mib, step_ms, step_ms_min, loss}``."""
    import torch

    torch.set_num_threads(threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from refmodel.tools.bench import peak_rss_bytes, reset_peak_rss

    torch.manual_seed(0)
    records = [json.loads(line) for line in Path(data).read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, attn_implementation="eager")
    dataset = Dataset.from_list(records)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._t = [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self._t)

    from refmodel.reference.base import module_bytes

    timer = StepTimer()
    reset_peak_rss()
    with tempfile.TemporaryDirectory() as out:
        args = _dpo_args(out, steps, batch)
        if case == "trl":
            import trl

            trainer = trl.DPOTrainer(policy, args=args, train_dataset=dataset, processing_class=tok,
                                     callbacks=[timer])
        else:
            from refmodel.integrations.trl import DPOTrainer
            from refmodel.reference import Remote

            reference = store if case == "store" else Remote(url, "ref")
            trainer = DPOTrainer(policy, args=args, train_dataset=dataset, processing_class=tok, callbacks=[timer],
                                 reference=reference)
        # weights the trainer holds for the reference: TRL's copy, or what refmodel's strategy holds locally
        ref_bytes = module_bytes(trainer.ref_model) if case == "trl" else trainer.reference.memory_bytes
        trainer.train()
    loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    times = timer.times[warmup:] or timer.times
    return {"case": case, "peak_rss_mib": peak_rss_bytes() / 2**20, "ref_weights_mib": ref_bytes / 2**20,
            "step_ms": 1e3 * statistics.median(times), "step_ms_min": 1e3 * min(times), "loss": loss}


def _subprocess(case: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--case", case, "--json-args", json.dumps(kw)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per case (1: least noise)")
    parser.add_argument("--json", action="store_true", help="one JSON row per case instead of a table")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--json-args", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.case:  # child process
        print(json.dumps(run_case(opts.case, **json.loads(opts.json_args))))
        return

    from refmodel.testing import make_tiny_model, preference_pairs, run_cli, write_jsonl
    from refmodel.tools.bench import provenance

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))
    from serve_helpers import ServerProcess

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_tiny_model("llama", root / "model", seed=0, tokenizer="bos_eos", **SIZES[opts.size])
        data = write_jsonl(preference_pairs(opts.pairs, seed=1), root / "pairs.jsonl")
        start = time.perf_counter()
        run_cli("precompute", "--model", model, "--data", data, "--out", root / "store", "--dtype", "float32",
                "--max-length", 128)
        precompute_s = time.perf_counter() - start
        server = ServerProcess(["--model", f"ref={model}"], root / "server.log")
        try:
            kw = dict(policy_dir=str(model), ref_dir=str(model), store=str(root / "store"), url=server.url,
                      data=str(data), steps=opts.steps, batch=opts.batch, warmup=opts.warmup, threads=opts.threads)
            rows = [_subprocess(case, **kw) for case in CASES]
            server_mib = _status_kib(server.proc.pid, "VmHWM") / 1024
        finally:
            server.stop()
    base = rows[0]
    for row in rows:
        row["memory_ratio"] = row["peak_rss_mib"] / base["peak_rss_mib"]
        row["time_ratio"] = row["step_ms"] / base["step_ms"]
        row["loss_diff"] = abs(row["loss"] - base["loss"])
    if opts.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"# TRL DPO full fine-tuning, size={opts.size}, batch={opts.batch} pairs, {opts.steps} steps "
          f"(median and min of the last {opts.steps - opts.warmup}), {opts.threads} thread(s); {provenance()}")
    print(f"{'case':8} {'peak RSS MiB':>13} {'ref weights MiB':>16} {'step ms':>9} {'min ms':>8} {'mem x':>6} "
          f"{'time x':>7} {'|loss-trl|':>11}")
    for row in rows:
        print(f"{row['case']:8} {row['peak_rss_mib']:13.1f} {row['ref_weights_mib']:16.1f} {row['step_ms']:9.1f} "
              f"{row['step_ms_min']:8.1f} {row['memory_ratio']:6.2f} {row['time_ratio']:7.2f} {row['loss_diff']:11.2e}")
    print(f"# store: precomputed once in {precompute_s:.1f} s (CLI, incl. start-up); service: the reference runs "
          f"in the server process (peak RSS {server_mib:.1f} MiB, shareable by many trainers), not counted above")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
