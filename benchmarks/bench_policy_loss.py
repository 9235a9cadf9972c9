"""Fused policy loss (refmodel.losses.fused_policy_loss) vs token_logprobs + policy_loss, naive full logits + autograd,
and Liger's LigerFusedLinearGRPOLoss(compiled=False), fwd+bwd, frozen and trainable head.

    python benchmarks/bench_policy_loss.py [--quick] [--reps N] [--impls fused,naive,...]
    python benchmarks/bench_policy_loss.py --sweep          # V = 32000, 128256, 151936, 262144 at H=2048, N=1024
    python benchmarks/bench_policy_loss.py --vocab 151936 --hidden 2048 --tokens 1024 --impls fused,unfused,liger
    python benchmarks/bench_policy_loss.py --block-rows 131,512,1024   # the fused head's GEMMs by block size

Shape: B x T = N completion tokens (default B=4, T=1024, N=4096; H=1024, V=32000, float32; ``--tokens N`` makes
B = N / T with T = min(N, 1024)), every token scored; loss: DAPO (token-mean) with k3 KL in the loss (beta=0.04), old and reference log-probs given.
Each case runs in a fresh subprocess (its own peak memory: VmHWM on CPU, max_memory_allocated on CUDA,
measured on the warm-up call above the inputs); times are medians of ``reps`` calls after it, and "matmul
units" the median of each call's time over one ``h @ W.T`` of the same shape timed just before it in the
same process (a shared machine's speed drifts between cases; the ratio of neighbours does not). Liger is
skipped with a message when ``liger-kernel`` is not installed (``pip install liger-kernel``; it is not a refmodel dependency).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch

from refmodel import token_logprobs
from refmodel.logprobs import naive_token_logprobs
from refmodel.losses import fused_policy_loss, policy_loss
from refmodel.tools.bench import _rss_bytes, peak_rss_bytes, provenance, reset_peak_rss, time_fn

IMPLS = ("fused", "unfused", "naive", "liger")
MODES = ("frozen", "trainable")
SWEEP = (32000, 128256, 151936, 262144)
BETA = 0.04


def _inputs(b, t, hidden, vocab, mode, device):
    torch.manual_seed(0)
    h = (torch.randn(b, t, hidden, device=device) * 0.5).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device) / hidden**0.5).requires_grad_(mode == "trainable")
    y = torch.randint(0, vocab, (b, t), device=device)
    mask = torch.ones(b, t, dtype=torch.bool, device=device)
    with torch.no_grad():  # realistic ratios: old/ref near the current policy
        lp = token_logprobs(h, w, y)
    old = lp + 0.05 * torch.randn_like(lp)
    ref = lp + 0.05 * torch.randn_like(lp)
    adv = torch.randn(b, device=device)
    return h, w, y, mask, old, ref, adv


def policy_loss_call(impl, h, w, y, mask, old, ref, adv):
    """A no-argument callable that runs ``impl``'s DAPO loss (k3 KL, beta 0.04) forward and backward on these
    inputs (``matmul``: the unit, one ``h @ W.T``); None when the peer is not installed. Also used by
    ``benchmarks.gpu``."""
    kw = dict(loss_type="dapo", ref_logprobs=ref, beta=BETA)
    if impl == "matmul":
        flat = h.detach().reshape(-1, h.shape[-1])

        def mm():
            with torch.no_grad():
                return flat @ w.detach().T
        return mm
    if impl == "fused":
        def loss():
            return fused_policy_loss(h, w, y, old, adv, mask, **kw).loss
    elif impl == "unfused":
        def loss():
            return policy_loss(token_logprobs(h, w, y), old, adv, mask, **kw).loss
    elif impl == "naive":
        def loss():
            return policy_loss(naive_token_logprobs(h, w, y), old, adv, mask, **kw).loss
    elif impl == "liger":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except ImportError:
            return None
        fn = LigerFusedLinearGRPOLoss(beta=BETA, compiled=False, loss_type="dapo", use_ref_model=True)

        def loss():
            return fn(h, w, y, mask.long(), adv, ref_per_token_logps=ref, old_per_token_logps=old)[0]
    else:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")

    def call():
        h.grad = w.grad = None
        out = loss()
        out.backward()
        return out.detach()
    return call


def run_case(impl, mode, b, t, hidden, vocab, reps) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fn = policy_loss_call(impl, *_inputs(2, 8, 16, 64, mode, device))  # page the code in at a tiny shape
    if fn is None:
        return {"impl": impl, "mode": mode, "skipped": "liger-kernel is not installed (pip install liger-kernel)"}
    fn()
    inputs = _inputs(b, t, hidden, vocab, mode, device)
    fn = policy_loss_call(impl, *inputs)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = _rss_bytes()
    out = fn()  # warm-up; its peak is the case's
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss_bytes() - base
    # A shared, busy machine drifts by 2-10x within minutes: time one matmul unit right before every timed
    # call, in this process, and report the median of the per-repeat ratios as the matmul units.
    unit_fn = policy_loss_call("matmul", *inputs)
    times, ratios = [], []
    for _ in range(reps):
        (unit,) = time_fn(unit_fn, 1)
        (took,) = time_fn(fn, 1)
        times.append(took)
        ratios.append(took / unit)
    loss = float(out) if isinstance(out, torch.Tensor) and out.dim() == 0 else None
    return {"impl": impl, "mode": mode, "seconds": statistics.median(times), "matmul_units": statistics.median(ratios),
            "peak_extra_bytes": max(peak, 0), "loss": loss}


def _subprocess(impl, mode, shape, reps) -> dict:
    cmd = [sys.executable, __file__, "--case", impl, mode, *map(str, shape), str(reps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"impl": impl, "mode": mode, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool, reps: int | None, impls: tuple[str, ...], tokens: int | None = None, hidden: int | None = None,
        vocab: int | None = None, modes: tuple[str, ...] = MODES) -> list[dict]:
    b, t, dh, dv = (4, 256, 512, 8000) if quick else (4, 1024, 1024, 32000)
    if tokens:
        t = min(tokens, t if not quick else 256)
        b = max(1, tokens // t)
    hidden, vocab = hidden or dh, vocab or dv
    shape = (b, t, hidden, vocab)
    reps = reps or (3 if quick else 2)
    print(f"# policy loss fwd+bwd: N={b * t} (B={b}, T={t}) H={hidden} V={vocab} float32, dapo + k3 KL, reps={reps}")
    print(f"# {provenance()}")
    matmul = _subprocess("matmul", "frozen", shape, reps)
    if "seconds" not in matmul:  # e.g. out of memory: every ratio below needs this unit
        raise SystemExit(f"the matmul unit (h @ W.T at B={b}, T={t}, H={hidden}, V={vocab}) failed: "
                         f"{matmul.get('error')}; free memory or pick a smaller shape (--vocab/--hidden/--tokens)")
    unit = matmul["seconds"]
    print(f"# matmul unit (h @ W.T) at the start: {unit * 1e3:.1f} ms (units below: against a unit timed next "
          "to each call)")
    print(f"{'V':>8} {'head':<11}{'impl':<9}{'ms':>10}{'matmul units':>14}{'t / unfused':>13}{'peak extra MiB':>16}"
          f"{'mem / liger':>13}{'mem / naive':>13}{'loss':>12}")
    rows = []
    for mode in modes:
        results = [_subprocess(i, mode, shape, reps) for i in impls]
        base = {r["impl"]: r for r in results if "seconds" in r}
        for r in results:
            if "seconds" not in r:
                print(f"{vocab:>8} {mode:<11}{r['impl']:<9}  skipped: {r.get('skipped') or r.get('error')}")
                continue
            r.setdefault("matmul_units", r["seconds"] / unit)
            r["vocab"] = vocab
            mem = r["peak_extra_bytes"]
            vs = {k: (mem / base[k]["peak_extra_bytes"] if k in base and base[k]["peak_extra_bytes"] else float("nan"))
                  for k in ("liger", "naive")}
            t_unf = r["matmul_units"] / base["unfused"]["matmul_units"] if "unfused" in base else float("nan")
            print(f"{vocab:>8} {mode:<11}{r['impl']:<9}{r['seconds'] * 1e3:>10.1f}{r['matmul_units']:>14.2f}"
                  f"{t_unf:>13.2f}{mem / 2**20:>16.1f}{vs['liger']:>13.3f}{vs['naive']:>13.3f}{r['loss']:>12.6f}",
                  flush=True)
            rows.append(r)
    return rows


def _block_pieces(h: torch.Tensor, w: torch.Tensor, rows: int) -> list:
    """The fused head's four pieces over all row blocks of ``rows`` rows: logits, ``dh``, ``dW``, softmax."""
    n, vocab = h.shape[0], w.shape[0]
    buf, dh, dw = torch.empty(rows, vocab), torch.empty_like(h), torch.zeros_like(w)
    blocks = [(s, min(rows, n - s)) for s in range(0, n, rows)]

    def logits():
        for s, m in blocks:
            torch.mm(h[s:s + m], w.t(), out=buf[:m])

    def grad_h():
        for s, m in blocks:
            torch.mm(buf[:m], w, out=dh[s:s + m])

    def grad_w():
        for s, m in blocks:
            dw.addmm_(buf[:m].t(), h[s:s + m])

    def softmax():
        for _, m in blocks:
            z = buf[:m]
            z.sub_(z.amax(1, keepdim=True)).exp_()
            z.mul_(1.0 / z.sum(1, keepdim=True))
    return [logits, grad_h, grad_w, softmax]


def block_study(block_rows: list[int], quick: bool, reps: int) -> None:
    """Each piece of the fused head per row-block size, in units of one full ``h @ W.T`` (best of ``reps``
    after a warm-up): on CPU each GEMM against ``W`` re-packs the whole weight, ~1/rows of the math."""
    b, t, hidden, vocab = (4, 256, 512, 8000) if quick else (4, 1024, 1024, 32000)
    torch.manual_seed(0)
    h, w = torch.randn(b * t, hidden), torch.randn(vocab, hidden) / hidden**0.5
    h @ w.T
    unit = min(time_fn(lambda: h @ w.T, reps))
    print(f"# fused head pieces by block size: N={b * t} H={hidden} V={vocab} float32; units of one h @ W.T "
          f"({unit * 1e3:.1f} ms); best of {reps}; {provenance()}")
    print(f"{'rows':>6}{'logits':>9}{'dh':>9}{'dW':>9}{'softmax':>9}")
    for rows in block_rows:
        pieces = _block_pieces(h, w, rows)
        for fn in pieces:
            fn()
        print(f"{rows:>6}" + "".join(f"{min(time_fn(fn, reps)) / unit:>9.2f}" for fn in pieces))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--case":
        impl, mode, *nums = sys.argv[2:]
        b, t, hidden, vocab, reps = map(int, nums)
        print(json.dumps(run_case(impl, mode, b, t, hidden, vocab, reps)))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="B=4, T=256, H=512, V=8000 instead of 4/1024/1024/32000")
    parser.add_argument("--reps", type=int, default=None, help="timed repeats per case (median reported)")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    parser.add_argument("--sweep", action="store_true",
                        help=f"V = {','.join(map(str, SWEEP))} at H=2048, N=1024 (unless --hidden/--tokens say)")
    parser.add_argument("--vocab", default=None, help="vocabulary size(s), comma-separated")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size H")
    parser.add_argument("--tokens", type=int, default=None, help="completion tokens N (B = N / T, T <= 1024)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--block-rows", default=None,
                        help="instead: time the fused head's GEMMs in row blocks of these sizes (e.g. 131,512,1024)")
    args = parser.parse_args()
    impls, modes = tuple(args.impls.split(",")), tuple(args.modes.split(","))
    bad = [i for i in impls if i not in IMPLS] + [m for m in modes if m not in MODES]
    try:
        vocabs = [int(v) for v in args.vocab.split(",")] if args.vocab else (list(SWEEP) if args.sweep else [None])
    except ValueError:
        parser.error(f"--vocab: expected comma-separated integers, got {args.vocab!r}")
    if bad:
        parser.error(f"unknown {bad}; --impls from {','.join(IMPLS)}, --modes from {','.join(MODES)}")
    if any(x is not None and x < 1 for x in (*vocabs, args.hidden, args.tokens)):
        parser.error("--vocab, --hidden and --tokens must be positive")
    if args.block_rows:
        block_study([int(r) for r in args.block_rows.split(",")], args.quick, args.reps or 2)
    else:
        for vocab in vocabs:
            run(args.quick, args.reps, impls, args.tokens or (1024 if args.sweep else None),
                args.hidden or (2048 if args.sweep else None), vocab, modes)
