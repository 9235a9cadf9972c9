"""``refmodel demo --algo grpo``: GRPO end to end on the built-in tiny model and verifiable task.

1. build the tiny Llama and wrap it in a fresh LoRA adapter (B = 0: the policy starts at the base);
2. the reference is the same model with the adapter disabled (no extra weights);
3. measure the reward of fresh samples on the 20 task prompts ("what comes after N", checked exactly);
4. train GRPO (rollouts -> exact reward -> group advantages -> DAPO loss with the k3 KL to the
   reference), metrics JSONL and a plot of the curves;
5. report the reward before/after, the exact (full-vocabulary) KL to the reference at the end, and
   the share of the step time spent on the reference log-probs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch

from .._optional import install_command
from ..models.tiny import load_tiny, make_tiny_model
from ..reference import AdapterDisabled
from ..rl.rollout import SamplingConfig, generate_rollouts
from ..rl.scoring import exact_kl
from .builtin import verifiable_prompts, verifiable_reward
from .grpo import GRPOConfig, evaluate_rewards, grpo
from .train import add_lora

DEMO_GRPO_CONFIG = GRPOConfig(loss_type="dapo", beta=0.04, learning_rate=1e-3, prompts_per_step=8,
                              num_generations=16, max_new_tokens=2, max_steps=250, micro_batch_size=128,
                              lora_r=16, lora_alpha=32, seed=0, kl_threshold=20.0)


def run_grpo_demo(out: str | Path = "runs/demo_grpo", *, max_steps: int | None = None) -> dict:
    """Run the GRPO demo into ``out`` and print its report; returns the figures as a dict.

    One intra-op thread, as the DPO demo: the tiny model's matmuls gain nothing from more.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(Path(out), max_steps)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, max_steps: int | None) -> dict:
    t0 = time.perf_counter()
    settings = DEMO_GRPO_CONFIG.__dict__ | {"output_dir": str(out)}
    if max_steps is not None:
        settings["max_steps"] = max_steps
    cfg = GRPOConfig(**settings)
    base, tok = load_tiny(make_tiny_model("llama", out / "model", seed=0))
    policy = add_lora(base, cfg.lora_r, cfg.lora_alpha, cfg.seed)
    reference = AdapterDisabled(policy, temperature=cfg.temperature)
    prompts = verifiable_prompts()
    before = evaluate_rewards(policy, tok, prompts, [verifiable_reward], cfg.sampling)
    t = time.perf_counter()
    result = grpo(policy, tok, prompts, [verifiable_reward], cfg, reference=reference)
    train_s = time.perf_counter() - t
    after = evaluate_rewards(result.policy, tok, prompts, [verifiable_reward], cfg.sampling)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4321)
        held = generate_rollouts(result.policy, tok, prompts, SamplingConfig(16, cfg.max_new_tokens, cfg.temperature))
    final_kl = exact_kl(result.policy, reference, held, micro_batch_size=cfg.micro_batch_size)
    h = result.history
    total = sum(x["step_time_s"] for x in h)
    share = {k: sum(x[k] for x in h) / total for k in ("time_rollout_s", "time_reward_s", "time_reference_s",
                                                       "time_old_s", "time_policy_s", "time_exact_kl_s")}
    figures = {"steps": cfg.max_steps, "train_s": train_s, "reward_before": before, "reward_after": after,
               "reward_first_step": h[0]["reward_mean"], "reward_last_step": h[-1]["reward_mean"],
               "final_exact_kl": final_kl, "max_exact_kl": max(x["kl_exact"] for x in h),
               "time_share": share, "reference_ms_per_step": 1e3 * sum(x["time_reference_s"] for x in h) / len(h),
               "step_ms": 1e3 * total / len(h), "reference_bytes": reference.memory_bytes,
               "plot": str(result.plot_path) if result.plot_path else None, "metrics": str(result.metrics_path)}
    figures["total_s"] = time.perf_counter() - t0
    (out / "grpo_summary.json").write_text(json.dumps(figures, indent=2))
    _report(figures, cfg)
    return figures


def _report(f: dict, cfg: GRPOConfig) -> None:
    echo = click.echo
    s = f["time_share"]
    echo(f"GRPO ({cfg.loss_type}, beta={cfg.beta}) on the built-in task 'what comes after N' (20 prompts, reward 1 "
         "for the exact answer), tiny Llama + LoRA policy, reference = the base with the adapter disabled "
         f"({f['reference_bytes']} extra bytes)")
    echo(f"trained {f['steps']} steps x {cfg.prompts_per_step} prompts x {cfg.num_generations} samples in "
         f"{f['train_s']:.1f} s ({f['step_ms']:.0f} ms/step)")
    echo(f"reward of fresh samples (20 prompts x {cfg.num_generations}): {f['reward_before']:.3f} before -> "
         f"{f['reward_after']:.3f} after")
    echo(f"exact KL(policy || reference) per completion token at the end: {f['final_exact_kl']:.3f} nats "
         f"(max during training {f['max_exact_kl']:.3f})")
    echo(f"time share: reference {100 * s['time_reference_s']:.1f} % ({f['reference_ms_per_step']:.1f} ms/step, "
         f"once per rollout batch), rollout {100 * s['time_rollout_s']:.1f} %, policy fwd+bwd "
         f"{100 * s['time_policy_s']:.1f} %, old-policy pass {100 * s['time_old_s']:.1f} % (skipped: on-policy), "
         f"exact-KL monitor {100 * s['time_exact_kl_s']:.1f} %")
    curves = f["plot"] or f"not drawn (matplotlib is missing: {install_command('plot')})"
    echo(f"curves: {curves}   metrics: {f['metrics']}   total {f['total_s']:.1f} s")


__all__ = ["DEMO_GRPO_CONFIG", "run_grpo_demo"]
