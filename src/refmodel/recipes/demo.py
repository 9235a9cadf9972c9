"""``refmodel demo``: the main job end to end on the built-in tiny model and preference data.

1. build the tiny Llama and split the built-in pairs into train / held-out;
2. precompute the reference log-probs of every train and held-out sequence into a log-prob store
   (:func:`refmodel.precompute`, the job ``refmodel precompute`` runs);
3. train DPO with the *precomputed* reference (no reference weights in memory), metrics + plot;
4. compare the strategies on the same data: a frozen copy, the base under a LoRA policy with the
   adapter disabled, and the store: reference memory, training step time, and the DPO loss of the
   trained policy on the first batch against each reference (they must agree);
5. report held-out reward accuracy before and after training (chance is 0.5).

The plot's KL panel is the *exact* KL(policy || reference) over the whole vocabulary
(:func:`refmodel.kl.exact`) at the completion positions of held-out pairs, every ``KL_EVERY`` steps, not
a k-estimator on dataset tokens (which are not samples of the policy).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import click
import torch

from .._optional import available, install_command
from ..data import collate_examples
from ..data.builtin import builtin_dataset_path
from ..logprobs.model import backbone_of, model_logprobs, position_ids_from_mask, unwrap_causal_lm
from ..losses.kl import LMHead, exact
from ..losses.preference import dpo
from ..models.fingerprint import fingerprint
from ..models.tiny import load_tiny, make_tiny_model
from ..precompute.job import precompute
from .train import (
    TrainConfig,
    accumulate_gradients,
    add_lora,
    evaluate,
    plot_metrics,
    tokenize_preferences,
    train,
)

log = logging.getLogger(__name__)

DEMO_CONFIG = TrainConfig(loss="sigmoid", beta=0.1, learning_rate=5e-4, batch_size=16, grad_accum_steps=2,
                          max_steps=300, seed=0, kl_threshold=10.0)


STRATEGIES = ("frozen copy", "adapter disabled (LoRA)", "precomputed (store)")
KL_EVERY = 25
KL_PAIRS = 64


def heldout_exact_kl(policy, base, batch: dict[str, torch.Tensor]) -> float:
    """Exact KL(policy || base) per completion token (nats) of ``batch``, teacher-forced on its completions."""
    attn, score = batch["attention_mask"].bool(), batch["score_mask"]
    ids, pos = torch.where(attn, batch["input_ids"], 0), position_ids_from_mask(attn)
    hidden = []
    with torch.no_grad():
        for model in (policy, base):
            hidden.append(backbone_of(unwrap_causal_lm(model))(input_ids=ids, attention_mask=attn.long(), position_ids=pos,
                                             use_cache=False)[0])
        mask = score[:, 1:]  # position t - 1 predicts completion token t
        kl = exact(hidden[0][:, :-1], LMHead.from_model(policy), hidden[1][:, :-1], LMHead.from_model(base), mask)
    return float(kl.sum() / mask.sum().clamp(min=1))


class _ExactKLProbe:
    """Wraps the training reference; every ``KL_EVERY`` steps measures the held-out exact KL (``on_step``)."""

    def __init__(self, reference, base, batch):
        self.reference, self.base, self.batch, self.values = reference, base, batch, {}

    def __getattr__(self, name):
        return getattr(self.reference, name)

    def logprobs(self, *args, **kwargs):
        return self.reference.logprobs(*args, **kwargs)

    def on_step(self, step, policy):
        self.reference.on_step(step, policy)
        if step == 1 or step % KL_EVERY == 0:
            was_training = policy.training
            policy.eval()
            self.values[step] = heldout_exact_kl(policy, self.base, self.batch)
            policy.train(was_training)


def _strategy_table(base, tok_pairs, pad_id, store_path, trained, cfg) -> list[dict]:
    """Memory, step time and first-batch loss (trained policy vs each reference) per strategy."""
    from ..reference import AdapterDisabled, Frozen, Precomputed
    from ..store import LogprobStore

    first = tok_pairs[:cfg.batch_size]
    batch: dict[str, Any] = collate_examples(first, pad_id)  # the input_ids/attention_mask/... tensors
    with torch.no_grad():
        policy_lp = model_logprobs(trained, **batch).sum(1)
    rows = []
    # The LoRA row needs PEFT (the 'peft' extra); a core-only install compares the other two.
    names = [n for n in STRATEGIES if available("peft") or not n.startswith("adapter")]
    for name in names:
        policy = copy.deepcopy(base)
        ref: AdapterDisabled | Frozen | Precomputed
        if name.startswith("adapter"):
            policy = add_lora(policy, r=8, seed=cfg.seed)
            ref = AdapterDisabled(policy)
        elif name.startswith("frozen"):
            ref = Frozen.from_policy(policy)
        else:
            ref = Precomputed(LogprobStore.open(store_path, fingerprint(base)))
        ref_lp = ref.logprobs(**batch).sum(1)
        b = len(first)
        loss = dpo(policy_lp[:b], policy_lp[b:], ref_lp[:b], ref_lp[b:], beta=cfg.beta).loss.item()
        params = [p for p in policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate)
        times = []
        for step in range(6):  # first step is warm-up
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            accumulate_gradients(policy, ref, tok_pairs[step * b:(step + 1) * b], cfg, pad_id)
            opt.step()
            times.append(time.perf_counter() - start)
        rows.append({"strategy": name, "reference_bytes": int(ref.memory_bytes), "fingerprint": ref.fingerprint,
                     "step_ms": 1e3 * sorted(times[1:])[len(times[1:]) // 2], "first_batch_loss": loss})
    return rows


def run_demo(out: str | Path = "runs/demo", *, max_steps: int | None = None, n_eval: int = 400) -> dict:
    """Run the demo into ``out`` and print its report; returns the figures as a dict.

    Runs with one intra-op thread: the tiny model's matmuls (hidden size 64) gain nothing from more,
    and on a busy machine extra OpenMP threads that spin-wait for a core slow each step 10-50x.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(Path(out), max_steps, n_eval)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, max_steps: int | None, n_eval: int) -> dict:
    t0 = time.perf_counter()
    cfg = DEMO_CONFIG if max_steps is None else TrainConfig(**{**DEMO_CONFIG.__dict__, "max_steps": max_steps})
    cfg = TrainConfig(**{**cfg.__dict__, "output_dir": str(out)})
    model_dir = make_tiny_model("llama", out / "model", seed=0)
    base, tok = load_tiny(model_dir)
    pad_id = tok.pad_token_id
    rows = [json.loads(line) for line in builtin_dataset_path().read_text().splitlines()]
    train_rows, eval_rows = rows[:-n_eval], rows[-n_eval:]
    train_tok, eval_tok = tokenize_preferences(train_rows, tok, cfg), tokenize_preferences(eval_rows, tok, cfg)

    store_path = out / "ref_logprobs"
    if (store_path / "manifest.json").exists():  # the demo's own store from an earlier run: made again
        shutil.rmtree(store_path)
    t = time.perf_counter()
    # The real precompute job, with the training loop's tokenization (so every training row hits the store);
    # float32 storage so the store's DPO losses equal the live references' (the strategy table checks it).
    with precompute(base, train_rows + eval_rows, store_path, tokenizer=tok, dtype="float32",
                    max_length=cfg.max_length, truncation_mode=cfg.truncation_mode) as store:
        n_entries = len(store)
    precompute_s = time.perf_counter() - t

    from ..reference import ReferenceConfig, auto

    ref_cfg = ReferenceConfig(precompute_ref_log_probs=True, load_reference_logprobs=str(store_path))
    policy = copy.deepcopy(base).train()
    before = evaluate(policy, auto(policy, ref_cfg), eval_tok, cfg, pad_id)
    probe = _ExactKLProbe(auto(policy, ref_cfg), base, collate_examples(eval_tok[:KL_PAIRS], pad_id))
    t = time.perf_counter()
    result = train(policy, tok, train_rows, cfg, reference=probe, eval_pairs=eval_rows)
    train_s = time.perf_counter() - t
    for h in result.history:  # the plot's KL panel shows the exact held-out KL where it was measured
        if h["step"] in probe.values:
            h["exact_kl"] = probe.values[h["step"]]
    if result.plot_path is not None:
        plot_metrics(result.history, result.plot_path)
    after = result.final_eval
    table = _strategy_table(base, train_tok, pad_id, store_path, result.policy, cfg)
    losses = [r["first_batch_loss"] for r in table]
    max_diff = max(abs(x - losses[0]) for x in losses)
    figures = {"precompute_s": precompute_s, "store_entries": n_entries, "train_s": train_s,
               "steps": cfg.max_steps, "eval_accuracy_before": before["eval_accuracy"],
               "eval_accuracy_after": after["eval_accuracy"], "eval_pairs": len(eval_rows),
               "first_batch_loss_max_abs_diff": max_diff, "strategies": table,
               "heldout_exact_kl": probe.values,
               "plot": str(result.plot_path) if result.plot_path else None, "metrics": str(result.metrics_path)}
    figures["total_s"] = time.perf_counter() - t0
    (out / "demo_summary.json").write_text(json.dumps(figures, indent=2))
    _report(figures, model_dir, store_path)
    return figures


def _report(f: dict, model_dir: Path, store_path: Path) -> None:
    echo = click.echo
    echo(f"tiny Llama at {model_dir}; reference log-probs of {f['store_entries']} sequences precomputed into "
         f"{store_path} in {f['precompute_s']:.1f} s")
    echo(f"trained DPO for {f['steps']} steps with the precomputed reference in {f['train_s']:.1f} s")
    echo(f"held-out reward accuracy ({f['eval_pairs']} pairs, chance 0.50): "
         f"{f['eval_accuracy_before']:.2f} before (all rewards are 0 at the start: ties count as wrong) -> "
         f"{f['eval_accuracy_after']:.2f} after training")
    echo("")
    echo(f"{'strategy':<26}{'reference memory':>18}{'step time':>12}{'first-batch loss':>19}")
    for r in f["strategies"]:
        echo(f"{r['strategy']:<26}{r['reference_bytes'] / 2**20:>15.2f} MiB{r['step_ms']:>9.1f} ms"
             f"{r['first_batch_loss']:>19.6f}")
    if len(f["strategies"]) < len(STRATEGIES):
        echo(f"adapter disabled (LoRA): not compared, PEFT is missing: {install_command('peft')}")
    echo(f"first-batch DPO loss of the trained policy against each reference: max |difference| "
         f"{f['first_batch_loss_max_abs_diff']:.2e}")
    echo("")
    kl = f["heldout_exact_kl"]
    if kl:
        last = max(kl)
        echo(f"exact KL(policy || reference) on held-out completions: {kl[last]:.4f} nats/token at step {last}")
    curves = f["plot"] or f"not drawn (matplotlib is missing: {install_command('plot')})"
    echo(f"curves: {curves}   metrics: {f['metrics']}   total {f['total_s']:.1f} s")


__all__ = ["DEMO_CONFIG", "heldout_exact_kl", "run_demo"]
