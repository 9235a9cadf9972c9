"""Fused token log-probs vs naive, PyTorch's linear_cross_entropy and TRL's chunked op.

    python -m benchmarks.bench_logprobs [--quick] [--dtype bfloat16]
"""

import argparse

from refmodel.tools.bench import run_logprob_benchmark

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N=1024, H=512, V=8000 instead of 4096/1024/32000")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--reps", type=int, default=None, help="timed repeats per case (median reported)")
    args = parser.parse_args()
    run_logprob_benchmark(quick=args.quick, dtype=args.dtype, reps=args.reps)
