"""Benchmark harness and the fused log-prob benchmark.

Every case runs in a fresh subprocess so that its peak memory (VmHWM, reset before the case, on CPU;
``max_memory_allocated`` on CUDA) is its own; times are medians over repeats after a warm-up.
Ratios are printed against the baseline measured in the same run: the time of one plain
``h @ W.T`` matmul of the same shape (the "matmul unit", timed in the same process right before every timed
call, so that a shared machine's drift cancels) and the naive implementation's time and memory.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from .._optional import hide_import_noise  # the benchmarks' one import of it (benchmarks/__init__.py)

IMPLS = ("matmul", "refmodel", "naive", "torch_lce", "trl")
MODES = ("fwd", "fwd_bwd_frozen_head", "fwd_bwd_trainable_head")


def provenance() -> str:
    """One line naming the machine, versions and commit, printed beside every table."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    return (f"device={device} python={platform.python_version()} torch={torch.__version__} "
            f"commit={commit}")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def process_rss_mib(pid: int) -> float:
    """Resident set (VmRSS) of another process, MiB; NaN where ``/proc`` does not say (not Linux)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak_rss() -> None:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0), so VmHWM measures from now."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_rss_bytes() -> int:
    """The resident-set high-water mark (VmHWM) since the last :func:`reset_peak_rss`."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_fn(fn: Callable[[], object], reps: int) -> list[float]:
    """Wall times of ``reps`` calls (after the caller's warm-up), synchronizing CUDA."""
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def _impl_fn(impl: str, mode: str, h, w, t, g):
    from ..logprobs.head import naive_token_logprobs, token_logprobs

    def run(logp_fn):
        def call():
            h.grad = w.grad = None
            if mode == "fwd":
                with torch.no_grad():
                    return logp_fn()
            out = logp_fn()
            out.backward(g)
        return call

    if impl == "matmul":
        return run(lambda: h @ w.T) if mode == "fwd" else None
    if impl == "refmodel":
        return run(lambda: token_logprobs(h, w, t))
    if impl == "naive":
        return run(lambda: naive_token_logprobs(h, w, t))
    if impl == "torch_lce":
        fn = getattr(torch.nn.functional, "linear_cross_entropy", None)
        if fn is None:
            return None
        opts = torch.nn.LinearCrossEntropyOptions()
        return run(lambda: -fn(h, w, t, reduction="none", ignore_index=-100, options=opts).float())
    if impl == "trl":
        try:
            from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        except ImportError:
            return None
        return run(lambda: ChunkedLogProbFunction.apply(h, w, None, t, 1.0, 4096, None, 1.0, ())[0])
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")


def run_case(impl: str, mode: str, n: int, hidden: int, vocab: int, dtype: str, reps: int) -> dict:
    """Run one case in this process; returns median seconds and peak extra bytes."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dt = getattr(torch, dtype)
    h = (torch.randn(n, hidden, device=device) * 0.5).to(dt).requires_grad_(mode != "fwd")
    w = (torch.randn(vocab, hidden, device=device) / hidden**0.5).to(dt)
    w.requires_grad_(mode == "fwd_bwd_trainable_head")
    t = torch.randint(0, vocab, (n,), device=device)
    g = torch.rand(n, device=device)  # non-uniform per-token upstream gradient
    fn = _impl_fn(impl, mode, h, w, t, g)
    if fn is None:
        return {"impl": impl, "mode": mode, "skipped": True}
    # Page in the code paths at a tiny shape so the measured peak is the case's data, not libraries.
    small = [x[:16].detach().clone().requires_grad_(x.requires_grad) for x in (h,)] + [
        w[:64].detach().clone().requires_grad_(w.requires_grad), t[:16] % 64, g[:16]]
    _impl_fn(impl, mode, *small)()
    del small
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()  # building the inputs made temporaries: measure from here
        base = _rss_bytes()
    fn()  # warm-up; the first call is where the peak is measured
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss_bytes() - base
    unit_fn = _impl_fn("matmul", "fwd", h.detach(), w.detach(), t, g)
    times, ratios = [], []
    for _ in range(reps):  # a matmul unit right before each call: the median ratio is the case's matmul units
        (unit,) = time_fn(unit_fn, 1)
        (took,) = time_fn(fn, 1)
        times.append(took)
        ratios.append(took / unit)
    return {"impl": impl, "mode": mode, "seconds": statistics.median(times), "matmul_units": statistics.median(ratios),
            "peak_extra_bytes": max(peak, 0)}


def _run_subprocess(impl, mode, n, hidden, vocab, dtype, reps) -> dict:
    cmd = [sys.executable, "-m", "refmodel.tools.bench", impl, mode, str(n), str(hidden), str(vocab), dtype, str(reps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"impl": impl, "mode": mode, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_logprob_benchmark(quick: bool = False, dtype: str | None = None, reps: int | None = None,
                          impls: tuple[str, ...] = IMPLS, n: int | None = None, hidden: int | None = None,
                          vocab: int | None = None, modes: tuple[str, ...] = MODES) -> list[dict]:
    """Run every (mode, impl) case and print a table of times in matmul units and memory ratios.

    Shape: ``n`` tokens, ``hidden``, ``vocab`` (defaults 4096 / 1024 / 32000, or 1024 / 512 / 8000 ``quick``).
    """
    dn, dh, dv = (1024, 512, 8000) if quick else (4096, 1024, 32000)
    n, hidden, vocab = n or dn, hidden or dh, vocab or dv
    dtype = dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    reps = reps or (5 if quick else 3)
    print(f"# fused log-probs: N={n} H={hidden} V={vocab} dtype={dtype} reps={reps}")
    print(f"# {provenance()}")
    matmul = _run_subprocess("matmul", "fwd", n, hidden, vocab, dtype, reps)
    if "seconds" not in matmul:  # e.g. out of memory: every ratio below needs this unit
        raise SystemExit(f"the matmul unit (h @ W.T at N={n}, H={hidden}, V={vocab}, {dtype}) failed: "
                         f"{matmul.get('error')}; free memory or pick a smaller shape (--vocab/--hidden/--tokens)")
    unit = matmul["seconds"]
    print(f"# matmul unit (h @ W.T): {unit * 1e3:.1f} ms at the start (units below: against a unit timed right "
          "before each call)")
    print(f"{'V':>8} {'mode':<24}{'impl':<11}{'ms':>9}{'matmul units':>14}{'time / naive':>14}{'peak extra MiB':>16}"
          f"{'mem / naive':>13}")
    rows = []
    for mode in modes:
        results = [_run_subprocess(i, mode, n, hidden, vocab, dtype, reps) for i in impls if i != "matmul"]
        naive = next((r for r in results if r["impl"] == "naive" and "seconds" in r), None)
        for r in results:
            if "seconds" not in r:
                print(f"{mode:<24}{r['impl']:<11}  {'skipped' if r.get('skipped') else r.get('error')}")
                continue
            r.setdefault("matmul_units", r["seconds"] / unit)
            r["vocab"] = vocab
            r["mem_vs_naive"] = r["peak_extra_bytes"] / naive["peak_extra_bytes"] if naive else float("nan")
            r["time_vs_naive"] = r["matmul_units"] / naive["matmul_units"] if naive else float("nan")
            print(f"{vocab:>8} {mode:<24}{r['impl']:<11}{r['seconds'] * 1e3:>9.1f}{r['matmul_units']:>14.2f}"
                  f"{r['time_vs_naive']:>14.2f}{r['peak_extra_bytes'] / 2**20:>16.1f}{r['mem_vs_naive']:>13.3f}",
                  flush=True)
            rows.append(r)
    if quick and (caveat := quick_caveat(rows, n, vocab, dtype)):
        print(caveat)
    return rows


def quick_caveat(rows: list[dict], n: int, vocab: int, dtype: str) -> str | None:
    """Why refmodel lost to naive at the quick shape, or ``None`` where it did not lose.

    ``rows`` are :func:`run_logprob_benchmark`'s (``mode``, ``impl``, ``seconds``, ``mem_vs_naive``).
    At the quick shape the naive path's whole ``[N, V]`` logits fit in a few tens of MiB: one large
    matmul and a ``log_softmax`` is all it does. The fused path walks the vocabulary in tiles (smaller
    matmuls and a Python-level loop with an online log-sum-exp) so that it never holds ``[N, V]``; that
    per-tile overhead is not repaid until the logits are large. Its gain at this shape is memory.
    """
    secs = {(r["mode"], r["impl"]): r for r in rows}
    lost = [mode for mode in MODES if (mode, "refmodel") in secs and (mode, "naive") in secs
            and secs[mode, "refmodel"]["seconds"] > secs[mode, "naive"]["seconds"]]
    if not lost:
        return None
    mib = n * vocab * torch.empty((), dtype=getattr(torch, dtype)).element_size() / 2**20
    mem = ", ".join(f"{secs[m, 'refmodel']['mem_vs_naive']:.2f}x" for m in lost)
    return (f"# caveat: refmodel is slower than naive here ({', '.join(lost)}) because --quick is too small for "
            f"the fused path to pay off: naive's whole logits [N={n}, V={vocab}] are only {mib:.0f} MiB of "
            f"{dtype}, one big matmul, while the fused path walks the vocabulary in tiles (smaller matmuls, a "
            f"loop) so as never to hold them. Its gain at this shape is memory ({mem} of naive's peak); run "
            "without --quick (N=4096, V=32000) for the time figures that matter.")


__all__ = ["IMPLS", "MODES", "hide_import_noise", "peak_rss_bytes", "process_rss_mib", "provenance", "quick_caveat",
           "reset_peak_rss", "run_case", "run_logprob_benchmark", "time_fn"]


if __name__ == "__main__":
    impl, mode, n, hidden, vocab, dtype, reps = sys.argv[1:8]
    print(json.dumps(run_case(impl, mode, int(n), int(hidden), int(vocab), dtype, int(reps))))
