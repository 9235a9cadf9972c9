"""Extra memory and extra compute of each reference strategy, measured.

Each (model size, strategy) case runs in a fresh process: load the policy, build the strategy, and
report ``memory_bytes`` next to the resident-memory growth that building it caused (``/proc`` RSS,
after ``gc``; anonymous memory only, so the model file's mapped pages do not count), then the median time of one reference call and of one policy forward+backward on
the same batch (8 sequences of the built-in data), and for ``Synced`` the time of one sync.

    python benchmarks/reference_memory.py            # all cases, a table on stdout
    python benchmarks/reference_memory.py --json     # one JSON row per case
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SIZES = {  # name -> make_tiny_model overrides (llama family)
    "tiny": {},
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8),
}
STRATEGIES = ("frozen", "frozen_bf16", "adapter_disabled", "synced_full", "synced_lora", "synced_lora_r8",
              "precomputed", "reference_free")


def _rss() -> int:
    """Anonymous resident bytes: excludes the safetensors file pages that loading maps (and copying reads)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def _median_ms(fn, reps=9) -> float:
    from refmodel.tools.bench import time_fn

    fn()
    return 1e3 * statistics.median(time_fn(fn, reps))


def run_case(size: str, strategy: str, root: str) -> dict:
    from peft import LoraConfig, get_peft_model

    from refmodel import model_logprobs
    from refmodel.reference import AdapterDisabled, Frozen, Precomputed, ReferenceFree, Synced
    from refmodel.testing import load_tiny, make_tiny_model

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "reference"))
    from ref_helpers import ListStore, make_batch

    torch.manual_seed(0)
    torch.set_num_threads(1)  # the CI machine is shared: one thread gives steadier medians
    path = Path(root) / size
    if not (path / "config.json").exists():
        make_tiny_model("llama", path, **SIZES[size])
    model, tok = load_tiny(path)
    lora = strategy in ("adapter_disabled", "synced_lora", "synced_lora_r8")
    policy = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")) if lora else model
    batch = make_batch(tok, n=8)
    policy_bytes = sum(p.numel() * p.element_size() for p in policy.parameters())
    if strategy == "precomputed":  # the log-probs a precompute job would have stored (outside the window)
        with torch.no_grad():
            stored = model_logprobs(policy, batch[0], batch[1])
    gc.collect()
    before = _rss()
    if strategy == "frozen":
        ref = Frozen.from_policy(policy)
    elif strategy == "frozen_bf16":
        ref = Frozen.from_policy(policy, dtype="bfloat16")
    elif strategy == "adapter_disabled":
        ref = AdapterDisabled(policy)
    elif strategy == "synced_full":
        ref = Synced(policy, ref_model_sync_steps=1)
    elif strategy in ("synced_lora", "synced_lora_r8"):
        ref = Synced(policy, ref_model_sync_steps=1, max_rank=8 if strategy.endswith("r8") else None)
    elif strategy == "precomputed":  # test-double store in memory: the store issue measures the real one
        store = ListStore("fp")
        store.add(batch[0], batch[1], stored)
        ref = Precomputed(store)
    else:
        ref = ReferenceFree()
    gc.collect()
    measured = _rss() - before
    row = dict(size=size, strategy=strategy, policy_bytes=policy_bytes, memory_bytes=int(ref.memory_bytes),
               rss_growth_bytes=int(measured))
    policy.train()

    def policy_step():
        out = model_logprobs(policy, *batch)
        out.sum().backward()
        policy.zero_grad(set_to_none=True)

    row["policy_fwd_bwd_ms"] = round(_median_ms(policy_step), 2)
    row["ref_call_ms"] = 0.0 if strategy == "reference_free" else round(_median_ms(lambda: ref.logprobs(*batch)), 2)
    if strategy.startswith("synced"):
        step = iter(range(1, 1000))
        row["sync_ms"] = round(_median_ms(lambda: ref.on_step(next(step), policy), reps=9), 2)
        row["memory_bytes_after_syncs"] = int(ref.memory_bytes)
        if hasattr(ref, "max_truncation_error"):
            row["max_truncation_error"] = ref.max_truncation_error
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--case", nargs=3, metavar=("SIZE", "STRATEGY", "ROOT"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", nargs="*", default=list(SIZES))
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(*args.case)))
        return
    from refmodel.tools.bench import provenance

    rows = []
    with tempfile.TemporaryDirectory() as root:
        for size in args.sizes:
            for strategy in STRATEGIES:
                # Large allocations through mmap, so freed memory leaves RSS and the growth is the strategy's.
                env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
                out = subprocess.run([sys.executable, __file__, "--case", size, strategy, root],
                                     capture_output=True, text=True, check=True, env=env)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                if args.json:
                    print(json.dumps(rows[-1]), flush=True)
    if not args.json:
        print(provenance())
        print("| size | strategy | policy bytes | memory_bytes | RssAnon growth | ref call ms | policy fwd+bwd ms "
              "| ref / policy | sync ms | memory_bytes after 10 syncs |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            ratio = r['ref_call_ms'] / r['policy_fwd_bwd_ms']
            print(f"| {r['size']} | {r['strategy']} | {r['policy_bytes']:,} | {r['memory_bytes']:,} | "
                  f"{r['rss_growth_bytes']:,} | {r['ref_call_ms']} | {r['policy_fwd_bwd_ms']} | {ratio:.2f} | "
                  f"{r.get('sync_ms', '')} | {r.get('memory_bytes_after_syncs', '')} |")


if __name__ == "__main__":
    main()
