"""Fused token log-probs vs naive, PyTorch's linear_cross_entropy and TRL's chunked op, at one shape or a V-sweep.

    python -m benchmarks.bench_logprobs [--quick] [--dtype bfloat16]
    python -m benchmarks.bench_logprobs --sweep                       # V = 32000, 128256, 151936, 262144; H=2048, N=1024
    python -m benchmarks.bench_logprobs --vocab 32000,262144 --hidden 2048 --tokens 1024 --impls refmodel,naive

Every case runs in its own process (peak memory VmHWM above the inputs on CPU, max_memory_allocated on CUDA);
"matmul units" are the median over repeats of each call's time over one ``h @ W.T`` of the same shape timed right
before it in the same process; "time / naive" and "mem / naive" are against the naive full-logits path of the same
V in the same run.
"""

import argparse

from refmodel.tools.bench import IMPLS, MODES, run_logprob_benchmark

SWEEP = (32000, 128256, 151936, 262144)


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _positive(text: str) -> int:
    (value,) = _ints(text)
    return value


def _names(allowed):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(v for v in text.split(",") if v)
        bad = [v for v in names if v not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {bad or text!r}; choose from {','.join(allowed)}")
        return names
    return parse


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N=1024, H=512, V=8000 instead of 4096/1024/32000")
    parser.add_argument("--sweep", action="store_true",
                        help=f"V = {','.join(map(str, SWEEP))} at H=2048, N=1024 (unless --hidden/--tokens say)")
    parser.add_argument("--vocab", type=_ints, default=None, help="vocabulary size(s), comma-separated")
    parser.add_argument("--hidden", type=_positive, default=None, help="hidden size H")
    parser.add_argument("--tokens", type=_positive, default=None, help="scored tokens N")
    parser.add_argument("--impls", type=_names(IMPLS[1:]), default=IMPLS[1:], help=f"subset of {','.join(IMPLS[1:])}")
    parser.add_argument("--modes", type=_names(MODES), default=MODES, help=f"subset of {','.join(MODES)}")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--reps", type=_positive, default=None, help="timed repeats per case (median reported)")
    args = parser.parse_args()
    vocabs = args.vocab or (list(SWEEP) if args.sweep else [None])
    hidden = args.hidden or (2048 if args.sweep else None)
    tokens = args.tokens or (1024 if args.sweep else None)
    for vocab in vocabs:
        run_logprob_benchmark(quick=args.quick, dtype=args.dtype, reps=args.reps, impls=("matmul", *args.impls),
                              n=tokens, hidden=hidden, vocab=vocab, modes=args.modes)
