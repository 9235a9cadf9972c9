"""RL reference benchmark: extra memory and reference time per rollout batch for each strategy.

    python -m benchmarks.bench_rl_reference [--hidden 64] [--layers 2] [--prompts 8] [--generations 16]
                                            [--max-new-tokens 16] [--remote]

A LoRA policy (r=16) on a random Llama samples ``prompts x generations`` completions of the built-in
verifiable prompts; each strategy then scores that rollout batch once (completion tokens only, fused
head, no grad), as ``refmodel.rl.score_rollouts`` does per GRPO step. Columns: the strategy's extra
weight bytes (``memory_bytes``: beyond the policy), the peak RSS growth of the scoring call, the median
reference time per rollout batch, and its ratio to one policy forward+backward on the same batch
(the step it sits next to). ``--remote`` also starts ``refmodel serve`` on 127.0.0.1 (HTTP + JSON).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path

import torch

from refmodel import model_logprobs
from refmodel.recipes.train import add_lora
from refmodel.reference import AdapterDisabled, Frozen, Synced
from refmodel.rl import SamplingConfig, generate_rollouts, reference_logprobs
from refmodel.testing import ServeProcess, load_tiny, make_tiny_model, verifiable_prompts
from refmodel.tools.bench import peak_rss_bytes, provenance, reset_peak_rss, time_fn


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        import os

        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--remote", action="store_true", help="also measure a served reference (starts a server)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        over = {} if args.hidden == 64 and args.layers == 2 else dict(
            hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
            num_attention_heads=8, num_key_value_heads=4)
        path = make_tiny_model("llama", Path(tmp) / "m", **over)
        base, tok = load_tiny(path)
        policy = add_lora(copy.deepcopy(base), r=16, alpha=32)
        sampling = SamplingConfig(args.generations, args.max_new_tokens, seed=0)
        prompts = (verifiable_prompts() * ((args.prompts + 19) // 20))[:args.prompts]
        ro = generate_rollouts(policy, tok, prompts, sampling)
        tokens = int(ro.completion_mask.sum())
        params = sum(p.numel() for p in base.parameters())

        def policy_pass():
            policy.zero_grad(set_to_none=True)
            lp = model_logprobs(policy, ro.input_ids, ro.attention_mask, ro.completion_mask)
            lp.sum().backward()

        policy_pass()
        policy_s = statistics.median(time_fn(policy_pass, args.reps))
        strategies = {
            "none (beta=0)": None,
            "adapter disabled (LoRA)": lambda: AdapterDisabled(policy),
            "named adapter": lambda: _named(policy),
            "frozen copy fp32": lambda: Frozen(copy.deepcopy(base)),
            "frozen copy bf16": lambda: Frozen(copy.deepcopy(base), dtype="bfloat16"),
            "frozen copy int8": lambda: Frozen(copy.deepcopy(base), quantize="int8"),
            "frozen, CPU offload": lambda: Frozen(copy.deepcopy(base), offload_to_cpu=True),
            "synced EMA (PEFT)": lambda: Synced(policy, ref_model_sync_steps=10, adapter_name="ema"),
        }
        server = None
        if args.remote:
            server = ServeProcess(["--model", f"base={path}"], Path(tmp) / "server.log")
            from refmodel.reference import Remote

            strategies["remote (HTTP service)"] = lambda: Remote(server.url, "base")
        print(f"# RL reference benchmark: llama hidden={args.hidden} layers={args.layers} ({params / 1e6:.2f} M "
              f"params, fp32), rollout batch {ro.batch_size} x {ro.input_ids.shape[1]} tokens "
              f"({tokens} completion tokens), micro-batch {args.micro_batch}, {args.threads} thread(s)")
        print(f"# {provenance()}")
        print(f"# policy forward+backward on the same batch: {policy_s * 1e3:.1f} ms")
        print(f"{'strategy':<26}{'extra weights':>15}{'peak RSS +':>12}{'ref ms/batch':>14}{'ref/policy':>12}")
        try:
            for name, make in strategies.items():
                if make is None:
                    print(f"{name:<26}{0:>11.2f} MiB{0:>8.2f} MiB{0:>14.1f}{0:>12.2f}")
                    continue
                ref = make()
                reference_logprobs(ref, ro, args.micro_batch)  # warm-up
                reset_peak_rss()
                before = _rss()
                reference_logprobs(ref, ro, args.micro_batch)
                peak = max(peak_rss_bytes() - before, 0)
                t = statistics.median(time_fn(lambda ref=ref: reference_logprobs(ref, ro, args.micro_batch), args.reps))
                print(f"{name:<26}{_memory_bytes(ref) / 2**20:>11.2f} MiB{peak / 2**20:>8.2f} MiB{t * 1e3:>14.1f}"
                      f"{t / policy_s:>12.2f}")
                del ref
        finally:
            if server is not None:
                server.stop()


def _memory_bytes(ref) -> int:
    try:
        return int(ref.memory_bytes)
    except RuntimeError:  # reference.base.module_bytes cannot read torchao's quantized tensor storages
        from refmodel.models.quantize import model_nbytes

        return int(model_nbytes(ref.model))


def _named(policy):
    """A frozen second adapter named "ref" (a copy of the policy's start: B = 0) as the reference."""
    if "ref" not in policy.peft_config:
        policy.add_adapter("ref", copy.deepcopy(policy.peft_config["default"]))
        policy.set_adapter("default")
        for n, p in policy.named_parameters():
            if ".ref." in n:
                p.requires_grad_(False)
    return AdapterDisabled(policy, adapter_name="ref")


if __name__ == "__main__":
    main()
