"""Reference model cache benchmark: load time cold vs hit, and model memory per quantization mode.

    python -m benchmarks.bench_cache [--hidden 512] [--layers 4]

Builds a small random Llama (bigger than the test models so times and bytes mean something), then for
each mode (none + refmodel.models.quantize.QUANT_MODES) times a cold ``get_or_load`` (a fresh cache: safetensors read +
quantization) and a hit (median of 1000), and reports the cached bytes and the ratio to fp32.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from refmodel import ReferenceModelCache
from refmodel.models.quantize import QUANT_MODES
from refmodel.testing import make_tiny_model
from refmodel.tools.bench import provenance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--cold-reps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model("llama", Path(tmp) / "m", hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                               num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4)
        print(f"# cache benchmark: llama hidden={args.hidden} layers={args.layers} (random weights, fp32)")
        print(f"# {provenance()}")
        print(f"{'mode':<10}{'cold ms':>10}{'hit us':>10}{'cold/hit':>12}{'MiB':>9}{'mem/fp32':>10}")
        base = None
        for mode in (None, *QUANT_MODES):
            colds = []
            for _ in range(args.cold_reps):
                cache = ReferenceModelCache(registry={"ref": path}, max_models=1)
                start = time.perf_counter()
                cache.get_or_load("ref", quantize=mode or False)
                colds.append(time.perf_counter() - start)
            hits = []
            for _ in range(1000):
                start = time.perf_counter()
                cache.get_or_load("ref", quantize=mode or False)
                hits.append(time.perf_counter() - start)
            nbytes = cache.get_cache_info()["bytes"]
            base = base or nbytes
            cold, hit = statistics.median(colds), statistics.median(hits)
            print(f"{mode or 'none':<10}{cold * 1e3:>10.1f}{hit * 1e6:>10.1f}{cold / hit:>12.0f}"
                  f"{nbytes / 2**20:>9.2f}{nbytes / base:>10.3f}")
            cache.clear()


if __name__ == "__main__":
    main()
