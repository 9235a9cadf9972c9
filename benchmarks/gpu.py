"""One GPU command: the LM head, the policy loss and precompute at a Llama-3-8B head shape, in bf16 on CUDA.

    python -m benchmarks.gpu                          # CUDA, H=4096, V=128256, N=8192 tokens; a few minutes
    python -m benchmarks.gpu --parts head,policy --tokens 4096
    python -m benchmarks.gpu --device cpu --quick     # dry run at tiny shapes: every code path, no GPU needed

Head (``token_logprobs``): forward (no grad), frozen head fwd+bwd, trainable head fwd+bwd, against the naive full
logits, PyTorch's ``torch.nn.functional.linear_cross_entropy`` (when this torch has it), Liger's
``LigerFusedLinearCrossEntropyLoss(reduction="none")`` and Apple's Cut Cross-Entropy
(``cut_cross_entropy.linear_cross_entropy``) where installed. Policy loss (DAPO with k3 KL, beta 0.04):
``fused_policy_loss`` against ``token_logprobs`` + ``policy_loss`` and Liger's ``LigerFusedLinearGRPOLoss``.
Precompute: ``refmodel.precompute`` of pre-tokenized pairs (128-token prompt, two 64-token completions) with a
one-layer Llama of the same head shape, so the head dominates.

Every row: median time over ``--reps`` after a warm-up, "units" = time over one ``h @ W.T`` (bf16) of the same
shape timed in the same run, "of bf16 mm" = the fraction of the bf16 matmul rate the case reaches for the matmuls
it must do at least (1 forward, 2 frozen, 3 trainable: ``ideal units / units``), peak memory above the inputs
(``max_memory_allocated``; VmHWM on the CPU dry run), and the time and memory ratios against the naive path. Needs
CUDA unless ``--device cpu``; exits with a message saying so otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.bench_policy_loss import policy_loss_call
from refmodel.tools.bench import peak_rss_bytes, provenance, reset_peak_rss

HEAD_IMPLS = ("naive", "refmodel", "torch_lce", "liger", "cce")  # the base (naive) first
POLICY_IMPLS = ("unfused", "fused", "liger")  # the base (unfused) first
PARTS = ("head", "policy", "precompute")
IDEAL_UNITS = {"fwd": 1, "frozen": 2, "trainable": 3}


class Shape:
    """The benchmark's shape: ``tokens`` scored tokens as ``tokens // seq_len`` sequences of ``seq_len``."""

    def __init__(self, tokens: int, hidden: int, vocab: int, seq_len: int, pairs: int):
        self.tokens, self.hidden, self.vocab, self.seq_len, self.pairs = tokens, hidden, vocab, seq_len, pairs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked: positive sizes, ``--tokens`` a multiple of ``--seq-len``, known parts and dtypes."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cuda (default) or cpu (a dry run)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (N=64, H=64, V=1000): checks the code paths")
    p.add_argument("--tokens", type=int, default=None, help="scored tokens N (default 8192; quick 64)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size H (default 4096; quick 64)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary V (default 128256; quick 1000)")
    p.add_argument("--seq-len", type=int, default=None, help="policy-loss sequence length T (default 1024; quick 32)")
    p.add_argument("--pairs", type=int, default=None, help="precompute pairs (default 512; quick 8)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--reps", type=int, default=5, help="timed repeats per case (median)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--json", default=None, help="also write every row to this JSON file")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = dict(tokens=(64, 8192), hidden=(64, 4096), vocab=(1000, 128256), seq_len=(32, 1024), pairs=(8, 512))
    for name, (tiny, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if quick else full)
    for name in ("tokens", "hidden", "vocab", "seq_len", "pairs", "reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.tokens % args.seq_len:
        p.error(f"--tokens ({args.tokens}) must be a multiple of --seq-len ({args.seq_len}): the policy loss runs "
                f"{args.tokens} tokens as sequences of {args.seq_len}")
    parts = tuple(x for x in args.parts.split(",") if x)
    unknown = [x for x in parts if x not in PARTS]
    if unknown or not parts:
        p.error(f"--parts: unknown {unknown or args.parts!r}; choose from {','.join(PARTS)}")
    args.parts = parts
    return args


def require_device(device: str) -> None:
    """Exit with a clear message when CUDA is asked for and there is none."""
    if device == "cuda" and not torch.cuda.is_available():
        built = "with" if torch.version.cuda else "without"
        sys.exit(f"benchmarks.gpu needs a CUDA GPU: torch.cuda.is_available() is False here (torch {torch.__version__}, "
                 f"built {built} CUDA). Run it on a machine with a GPU, or `python -m benchmarks.gpu --device cpu "
                 "--quick` for a dry run of every code path at tiny shapes.")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _measure(fn: Callable[[], object], device: str, reps: int) -> tuple[float, int]:
    """``(median seconds, peak extra bytes of the first call)`` of ``fn`` after that warm-up call."""
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = peak_rss_bytes()
    fn()
    _sync(device)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()) - base
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), max(peak, 0)


def _head_fn(impl: str, mode: str, h, w, y, g) -> Callable[[], object] | None:
    """One call of ``impl`` in ``mode`` (fwd without grad; frozen/trainable: forward and backward of ``g . logp``)."""
    from refmodel import token_logprobs
    from refmodel.logprobs import naive_token_logprobs

    if impl == "refmodel":
        def logp():
            return token_logprobs(h, w, y)
    elif impl == "naive":
        def logp():
            return naive_token_logprobs(h, w, y)
    elif impl == "torch_lce":
        lce = getattr(torch.nn.functional, "linear_cross_entropy", None)
        if lce is None:
            return None

        def logp():
            return -lce(h, w, y, reduction="none").float()
    elif impl == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            return None
        if not h.is_cuda:
            return None  # Triton kernels
        loss = LigerFusedLinearCrossEntropyLoss(reduction="none")

        def logp():
            return -loss(w, h, y).float()
    elif impl == "cce":
        try:
            from cut_cross_entropy import linear_cross_entropy as cce
        except ImportError:
            return None
        if not h.is_cuda:
            return None

        def logp():
            return -cce(h, w, y, reduction="none").float()
    else:
        raise ValueError(f"unknown head impl {impl!r}; expected one of {HEAD_IMPLS}")

    def call():
        h.grad = w.grad = None
        if mode == "fwd":
            with torch.no_grad():
                return logp()
        out = logp()
        (out * g).sum().backward()
    return call


def _row(part, mode, impl, seconds, peak, unit, naive) -> dict:
    units = seconds / unit
    ideal = IDEAL_UNITS.get(mode, 1)
    return {"part": part, "mode": mode, "impl": impl, "ms": seconds * 1e3, "units": units, "of_bf16_mm": ideal / units,
            "peak_mib": peak / 2**20, "time_vs_base": seconds / naive[0] if naive else float("nan"),
            "mem_vs_base": peak / naive[1] if naive and naive[1] else float("nan")}


def _timed_row(part: str, mode: str, impl: str, fn, device: str, reps: int, unit: float,
               base: tuple[float, int] | None, is_base: bool) -> tuple[dict, tuple[float, int]] | None:
    """One case timed and printed: ``(row, (seconds, peak bytes))``, or None (said in its place) when the impl
    is missing or runs out of memory. ``is_base``: this impl is the part's base, so it is its own ratio base."""
    if fn is None:
        print(f"{part:<11}{mode:<10}{impl:<10}  skipped: not installed or not on this device")
        return None
    try:
        seconds, peak = _measure(fn, device, reps)
    except torch.OutOfMemoryError:
        print(f"{part:<11}{mode:<10}{impl:<10}  out of memory")
        return None
    row = _row(part, mode, impl, seconds, peak, unit, (seconds, peak) if is_base else base)
    _print(row)
    return row, (seconds, peak)


def _print(row: dict) -> None:
    print(f"{row['part']:<11}{row['mode']:<10}{row['impl']:<10}{row['ms']:>10.2f}{row['units']:>8.2f}"
          f"{row['of_bf16_mm']:>11.2f}{row['peak_mib']:>11.1f}{row['time_vs_base']:>10.2f}{row['mem_vs_base']:>10.3f}",
          flush=True)


def _inputs(shape: Shape, dtype, device, trainable: bool, seed: int = 0):
    torch.manual_seed(seed)
    h = (torch.randn(shape.tokens, shape.hidden, device=device) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(shape.vocab, shape.hidden, device=device) / shape.hidden**0.5).to(dtype)
    return h, w.requires_grad_(trainable), torch.randint(0, shape.vocab, (shape.tokens,), device=device)


def matmul_unit(shape: Shape, dtype, device, reps: int) -> float:
    h, w, _ = _inputs(shape, dtype, device, False)
    with torch.no_grad():
        seconds, _ = _measure(lambda: h @ w.T, device, reps)
    return seconds


def run_head(shape: Shape, dtype, device, reps: int, unit: float) -> list[dict]:
    rows = []
    for mode in ("fwd", "frozen", "trainable"):
        base = None
        for impl in HEAD_IMPLS:
            h, w, y = _inputs(shape, dtype, device, mode == "trainable")
            g = torch.rand(shape.tokens, device=device)
            fn = _head_fn(impl, mode, h, w, y, g)
            timed = _timed_row("head", mode, impl, fn, device, reps, unit, base, is_base=impl == "naive")
            del fn
            if timed is not None:
                rows.append(timed[0])
                if impl == "naive":
                    base = timed[1]
    return rows


def run_policy(shape: Shape, dtype, device, reps: int, unit: float) -> list[dict]:
    from refmodel import token_logprobs

    rows = []
    b, t = shape.tokens // shape.seq_len, shape.seq_len
    for mode in ("frozen", "trainable"):
        base = None
        for impl in POLICY_IMPLS:
            h, w, y = _inputs(shape, dtype, device, mode == "trainable")
            h = h.detach().reshape(b, t, shape.hidden).requires_grad_()
            y = y.reshape(b, t)
            mask = torch.ones(b, t, dtype=torch.bool, device=device)
            with torch.no_grad():
                lp = token_logprobs(h, w, y)
            old, ref = lp + 0.05 * torch.randn_like(lp), lp + 0.05 * torch.randn_like(lp)
            adv = torch.randn(b, device=device)
            fn = policy_loss_call(impl, h, w, y, mask, old, ref, adv)
            timed = _timed_row("policy", mode, impl, fn, device, reps, unit, base, is_base=impl == "unfused")
            if timed is not None:
                rows.append(timed[0])
                if impl == "unfused":
                    base = timed[1]
    return rows


def run_precompute(shape: Shape, dtype, device, unit: float) -> list[dict]:
    """``refmodel.precompute`` of ``shape.pairs`` pre-tokenized pairs (128 + 2 x 64 tokens) with a one-layer Llama of
    the head's shape; "of bf16 mm" is the head's share: ideal head time (``tokens / N`` units) over the wall time."""
    from transformers import AutoModelForCausalLM

    from refmodel import precompute
    from refmodel.models.tiny import make_tokenizer, tiny_config

    heads = max(1, shape.hidden // 128)
    cfg = tiny_config("llama", shape.vocab, hidden_size=shape.hidden, intermediate_size=max(64, shape.hidden // 4),
                      num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                      max_position_embeddings=512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(4, shape.vocab, (n,), generator=g).tolist()
    records = [{"prompt_ids": ids(128), "chosen_ids": ids(64), "rejected_ids": ids(64)} for _ in range(shape.pairs)]
    tokens = shape.pairs * (128 + 2 * 64)
    tok = make_tokenizer("plain")
    os.environ.setdefault("TQDM_DISABLE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        runs = iter(range(1000))

        def call():
            precompute(model, records, Path(tmp) / f"s{next(runs)}", tokenizer=tok, dtype="bfloat16", device=device,
                       progress=False, shard_examples=max(1, shape.pairs // 4))
        seconds, peak = _measure(call, device, 1)
    # The head's share: its matmuls over every scored and prompt position (share_prompt scores a prompt once).
    head_units = tokens / shape.tokens
    row = {"part": "precompute", "mode": "fwd", "impl": "refmodel", "ms": seconds * 1e3, "units": seconds / unit,
           "of_bf16_mm": head_units * unit / seconds, "peak_mib": peak / 2**20, "time_vs_base": float("nan"),
           "mem_vs_base": float("nan"), "pairs_per_s": shape.pairs / seconds, "tokens": tokens}
    _print(row)
    print(f"# precompute: {shape.pairs} pairs, {tokens} tokens, {shape.pairs / seconds:.1f} pairs/s, "
          f"{tokens / seconds:,.0f} tok/s")
    return [row]


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    require_device(args.device)
    logging.disable(logging.WARNING)
    dtype = getattr(torch, args.dtype)
    shape = Shape(args.tokens, args.hidden, args.vocab, args.seq_len, args.pairs)
    started = time.perf_counter()
    print(f"# benchmarks.gpu: N={shape.tokens} H={shape.hidden} V={shape.vocab} T={shape.seq_len} dtype={args.dtype} "
          f"device={args.device} reps={args.reps}")
    print(f"# {provenance()}")
    unit = matmul_unit(shape, dtype, args.device, args.reps)
    flops = 2 * shape.tokens * shape.hidden * shape.vocab
    print(f"# matmul unit (h @ W.T, {args.dtype}): {unit * 1e3:.2f} ms = {flops / unit / 1e12:.1f} TFLOP/s")
    print(f"{'part':<11}{'mode':<10}{'impl':<10}{'ms':>10}{'units':>8}{'of bf16 mm':>11}{'peak MiB':>11}"
          f"{'t / base':>10}{'mem / base':>10}   (base: naive for the head, unfused for the policy loss)")
    rows: list[dict] = []
    if "head" in args.parts:
        rows += run_head(shape, dtype, args.device, args.reps, unit)
    if "policy" in args.parts:
        rows += run_policy(shape, dtype, args.device, args.reps, unit)
    if "precompute" in args.parts:
        rows += run_precompute(shape, dtype, args.device, unit)
    print(f"# total {time.perf_counter() - started:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
