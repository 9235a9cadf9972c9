"""A small, readable GRPO loop over a Hugging Face causal LM (LoRA or full), in the style of ``train.py``.

One step (Shao et al. 2024, DeepSeekMath, Sec. 4; TRL's ``GRPOTrainer`` names):

1. take ``prompts_per_step`` prompts and sample ``num_generations`` completions each
   (:func:`refmodel.rl.generate_rollouts`);
2. score them: the user's reward functions ``f(prompts, completions) -> [B]`` plus reward models
   (e.g. :class:`ServiceRewardModel`, the service's ``/v1/rewards``), summed with ``reward_weights``;
3. group advantages (reward minus the group mean, over the group std);
4. the old-policy and reference log-probs, **once** for the rollout batch
   (:func:`refmodel.rl.score_rollouts`; the old pass only when ``num_iterations > 1`` or the sampler
   mismatch is corrected; no reference at all when ``beta == 0``);
5. ``num_iterations`` optimizer steps over the batch, each with ``grad_accum_steps`` micro-batches
   whose losses are weighted so that the accumulated gradient is the whole batch's, then
   ``reference.on_step(step, policy)`` (a ``Synced`` reference moves here); the loss is
   :func:`refmodel.losses.policy_loss` on :func:`refmodel.model_logprobs`, or with ``use_fused_policy_loss``
   :func:`refmodel.losses.fused_policy_loss` on the hidden states (same values; no entropy metric);
6. metrics (JSONL): reward mean/std, the exact KL (full vocabulary, on the rollout's tokens) and
   the estimated one (``kl_estimator`` on the sampled tokens), clip fraction, entropy, IS ratio
   stats and the sampler/trainer log-prob gap, and the time in rollout / reward / reference / old /
   policy; a :class:`~refmodel.kl.KLMonitor` warns above ``kl_threshold``; a PNG of the curves.

Not here (yet): TRL's ``steps_per_generation`` (several optimizer steps over slices of one batch) and
KL in the reward; both fit the same scoring (``needs_old_logprobs`` already takes ``steps_per_rollout``).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._deprecation import warn_deprecated
from .._optional import require
from ..cluster import get_logger, is_main_process
from ..errors import ConfigError
from ..logprobs.model import model_logprobs
from ..losses import kl as kl_mod
from ..losses.policy_config import PolicyLossConfig
from ..reference import resolve
from ..rl import policy_loss_fn
from ..rl.rollout import Rollouts, SamplingConfig, generate_rollouts
from ..rl.scoring import ScoredRollouts, exact_kl, needs_old_logprobs, score_rollouts
from .steps import StepLog, plot_or_skip
from .train import add_lora

log = get_logger(__name__)  # shared warnings: main process only (refmodel.cluster)

RewardFn = Callable[[Sequence, Sequence[str]], "torch.Tensor | Sequence[float]"]


@dataclass(frozen=True)
class GRPOConfig:
    """Everything the loop needs; option names follow TRL's ``GRPOConfig``."""

    loss_type: str = "dapo"  # TRL's names: grpo | bnpo | dr_grpo | dapo | cispo | ppo (plain clipped surrogate)
    beta: float = 0.04  # KL-in-loss coefficient; 0 = no reference is built or asked
    kl_estimator: str = "k3"  # the KL estimator in the loss (TRL: k3; verl/OpenRLHF names accepted), also logged
    epsilon: float = 0.2
    epsilon_high: float | None = None
    scale_rewards: str = "group"  # group (GRPO) | batch | none (Dr. GRPO)
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    prompts_per_step: int = 8
    num_generations: int = 16
    max_new_tokens: int = 2
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_iterations: int = 1  # optimizer steps per rollout batch (TRL's mu)
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    micro_batch_size: int = 8  # rows per no-grad scoring call (does not change the result)
    importance_sampling_correction: bool = False  # correct for the sampler/trainer gap (forces the old pass)
    use_fused_policy_loss: bool = False  # refmodel.losses.fused_policy_loss: the loss inside the LM head (no entropy metric)
    max_steps: int = 300  # rollout batches
    seed: int = 0
    kl_threshold: float | None = None
    exact_kl_every: int = 1  # steps between exact-KL measurements (0 = never)
    lora_r: int = 16  # > 0 wraps a plain policy in a PEFT LoRA adapter on every linear layer
    lora_alpha: int = 32
    output_dir: str | None = None
    progress: bool = True

    def __post_init__(self):
        for name in ("prompts_per_step", "num_generations", "max_new_tokens", "num_iterations", "grad_accum_steps",
                     "micro_batch_size", "max_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if self.num_generations < 2:
            raise ConfigError("num_generations must be >= 2: group advantages compare completions of a prompt")
        rows = self.prompts_per_step * self.num_generations
        if self.grad_accum_steps > rows:
            raise ConfigError(f"grad_accum_steps ({self.grad_accum_steps}) cannot exceed the rows per step "
                              f"({rows} = prompts_per_step * num_generations)")
        if not (isinstance(self.beta, (int, float)) and self.beta >= 0):
            raise ConfigError(f"beta must be >= 0 (0 = no reference), got {self.beta!r}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        _ = self.policy_loss_config  # built (so checked: cispo's cap, estimator names, ...) now, not at step 1
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ConfigError(f"scale_rewards must be 'group', 'batch' or 'none', got {self.scale_rewards!r}")
        if not isinstance(self.exact_kl_every, int) or self.exact_kl_every < 0:
            raise ConfigError(f"exact_kl_every must be an integer >= 0, got {self.exact_kl_every!r}")
        SamplingConfig(self.num_generations, self.max_new_tokens, self.temperature, self.top_k, self.top_p)

    @property
    def policy_loss_config(self) -> PolicyLossConfig:
        """The loss's options, one :class:`~refmodel.losses.PolicyLossConfig` for every step of the run
        (Dr. GRPO's normalizer is ``max_new_tokens``)."""
        return PolicyLossConfig(loss_type=self.loss_type, epsilon=self.epsilon, epsilon_high=self.epsilon_high,
                                beta=self.beta, kl_estimator=self.kl_estimator,
                                max_completion_length=self.max_new_tokens)

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.num_generations, self.max_new_tokens, self.temperature, self.top_k, self.top_p)


class ServiceRewardModel:
    """A reward model on a ``refmodel serve`` service (``--reward-model NAME=PATH``), via ``/v1/rewards``.

    It scores the rollout's token ids (so it must share the policy's tokenizer): ``[B]`` float32.
    ``client`` is a :class:`refmodel.ReferenceClient` or a URL.
    """

    wants_rollouts = True

    def __init__(self, client, model: str, *, token: str | None = None):
        if isinstance(client, str):
            from ..remote.client import ReferenceClient

            client = ReferenceClient(client, token=token)
        self.client, self.model = client, model
        self.__name__ = f"service:{model}"

    def __call__(self, rollouts: Rollouts) -> torch.Tensor:
        out = self.client.compute_rewards(self.model, rollouts.input_ids.cpu(), rollouts.attention_mask.long().cpu())
        return torch.as_tensor(out, dtype=torch.float32).reshape(-1)


def compute_rewards(reward_funcs: Sequence, rollouts: Rollouts, weights: Sequence[float] | None = None,
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """``([B] weighted sum, {reward/<name>: mean})`` of every reward function / model on ``rollouts``."""
    if not reward_funcs:
        raise ConfigError("GRPO needs at least one reward function f(prompts, completions) -> [B] or reward model")
    weights = [1.0] * len(reward_funcs) if weights is None else list(weights)
    if len(weights) != len(reward_funcs):
        raise ConfigError(f"reward_weights has {len(weights)} entries for {len(reward_funcs)} reward functions")
    rows_prompts = [rollouts.prompts[int(g)] for g in rollouts.group_index.tolist()]
    total = torch.zeros(rollouts.batch_size, dtype=torch.float32)
    parts = {}
    for i, (fn, w) in enumerate(zip(reward_funcs, weights, strict=True)):
        name = getattr(fn, "__name__", f"reward_{i}")
        r = fn(rollouts) if getattr(fn, "wants_rollouts", False) else fn(rows_prompts, rollouts.completions)
        r = torch.as_tensor(r, dtype=torch.float32).reshape(-1).cpu()
        if r.numel() != rollouts.batch_size:
            raise ConfigError(f"reward function {name!r} returned {r.numel()} rewards for {rollouts.batch_size} "
                              "completions; it must return one float per completion")
        if not torch.isfinite(r).all():
            raise ConfigError(f"reward function {name!r} returned a non-finite reward")
        parts[f"reward/{name}"] = float(r.mean())
        total += w * r
    return total, parts


def resolve_rl_reference(policy: nn.Module, reference, cfg: GRPOConfig):
    """Deprecated: ``None if cfg.beta == 0 else refmodel.reference.resolve(reference, policy,
    temperature=cfg.temperature)``."""
    warn_deprecated("refmodel.recipes.grpo.resolve_rl_reference",
                    "refmodel.reference.resolve(reference, policy, temperature=cfg.temperature)")
    return None if cfg.beta == 0 else resolve(reference, policy, temperature=cfg.temperature, who="grpo")


def _loss_weights(loss_type: str, masks: list[torch.Tensor]) -> list[float]:
    """Weight of each micro-batch's loss so the accumulated gradient is the whole batch's.

    Token-mean losses (dapo, bnpo, ppo) weight by tokens; per-sequence means (grpo, dr_grpo) by rows.
    """
    if loss_type in ("grpo", "dr_grpo"):
        n = sum(m.shape[0] for m in masks)
        return [m.shape[0] / n for m in masks]
    n = sum(int(m.sum()) for m in masks)
    return [int(m.sum()) / max(n, 1) for m in masks]


def policy_step(policy: nn.Module, scored: ScoredRollouts, advantages: torch.Tensor, cfg: GRPOConfig,
                ) -> dict[str, float]:
    """Forward + backward of the policy loss over the batch in ``grad_accum_steps`` micro-batches.

    Returns the step's metrics; does not step or zero the optimizer.
    """
    ro = scored.rollouts
    n = ro.batch_size
    bounds = [round(i * n / cfg.grad_accum_steps) for i in range(cfg.grad_accum_steps + 1)]
    chunks = [torch.arange(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    weights = _loss_weights(cfg.loss_type, [ro.completion_mask[c] for c in chunks])
    loss_config = cfg.policy_loss_config
    sums = {"loss": 0.0, "pg_loss": 0.0, "kl_in_loss": 0.0, "clip_fraction": 0.0, "ratio_mean": 0.0,
            "entropy": 0.0, "kl_estimated": 0.0, "sampler_logp_diff_mean": 0.0, "sampler_logp_diff_max": 0.0}
    tokens = 0
    for rows, w in zip(chunks, weights, strict=True):
        rows_d = rows.to(ro.input_ids.device)
        ids, attn, mask = ro.input_ids[rows_d], ro.attention_mask[rows_d], ro.completion_mask[rows_d]
        old = None if scored.old_logprobs is None else scored.old_logprobs[rows_d]
        ref = None if scored.ref_logprobs is None else scored.ref_logprobs[rows_d]
        rollout_logprobs = ro.sampler_logprobs[rows_d] if cfg.importance_sampling_correction else None
        if cfg.use_fused_policy_loss:
            res, out = _fused_loss(policy, ids, attn, mask, old, advantages[rows_d], ref, rollout_logprobs,
                                   ro.temperature, loss_config), None
        else:
            out = model_logprobs(policy, ids, attn, mask, temperature=ro.temperature, return_entropy=True)
            res = policy_loss_fn(out.logprobs, old, advantages[rows_d], mask, config=loss_config, ref_logprobs=ref,
                                 rollout_logprobs=rollout_logprobs)
        (res.loss * w).backward()
        k = int(mask.sum())
        tokens += k
        sums["loss"] += float(res.loss.detach()) * w
        sums["pg_loss"] += float(res.pg_loss) * w
        for key, attr in (("kl_in_loss", "kl"), ("clip_fraction", "clip_fraction"), ("ratio_mean", "ratio_mean")):
            value = getattr(res, attr, None)
            sums[key] += (float("nan") if value is None else float(value)) * k
        if out is None:  # fused: no per-token log-probs or entropy leave the head; the loss's own KL statistic
            sums["entropy"] = sums["sampler_logp_diff_mean"] = sums["sampler_logp_diff_max"] = float("nan")
            if ref is not None and res.kl is not None:
                sums["kl_estimated"] += float(res.kl) * k
            continue
        sums["entropy"] += float((out.entropy.detach() * mask).sum())
        lp = out.logprobs.detach()
        if ref is not None:  # the estimator on the sampled tokens (a Monte-Carlo estimate of the exact KL)
            sums["kl_estimated"] += float(kl_mod.estimate(lp, ref, cfg.kl_estimator, mask=mask).sum())
        gap = (lp - ro.sampler_logprobs[rows_d]).abs() * mask
        sums["sampler_logp_diff_mean"] += float(gap.sum())
        sums["sampler_logp_diff_max"] = max(sums["sampler_logp_diff_max"], float(gap.max()) if k else 0.0)
    for key in ("kl_in_loss", "clip_fraction", "ratio_mean", "entropy", "kl_estimated", "sampler_logp_diff_mean"):
        sums[key] /= max(tokens, 1)
    if scored.ref_logprobs is None:
        sums["kl_estimated"] = float("nan")
    return sums


def _fused_loss(policy, ids, attn, mask, old, advantages, ref, rollout_logprobs, temperature,
                config: PolicyLossConfig):
    """:func:`refmodel.losses.fused_policy_loss` on the policy's final hidden states (the loss fused into the head).

    Everything is shifted by one position (hidden state ``t`` predicts token ``t + 1``), as in
    :func:`refmodel.model_logprobs`.
    """
    from ..logprobs.lm_head import LMHead
    from ..logprobs.model import run_in_forward, shifted_hidden_states, unwrap_causal_lm, wrapper_chain
    from ..losses.fused_policy import fused_policy_loss

    causal = unwrap_causal_lm(policy)
    if LMHead.from_model_or_none(causal) is None:
        raise ConfigError("use_fused_policy_loss needs an LM head that is a linear map (no DoRA or quantized "
                          "head); set use_fused_policy_loss=False for this policy")
    m = mask[:, 1:]

    def shift(t):
        return None if t is None else t[:, 1:]

    adv = advantages if advantages.dim() == 1 else advantages[:, 1:]

    def loss():
        head = LMHead.from_model_or_none(causal)  # read inside: the gathered weights; LoRA on the head trains
        return fused_policy_loss(shifted_hidden_states(causal, ids, attn), head, torch.where(m, ids[:, 1:], -100),
                                 shift(old), adv, m, temperature=temperature, config=config,
                                 ref_logprobs=shift(ref), rollout_logprobs=shift(rollout_logprobs))

    # Inside the policy's own hooked forward (FSDP2 gathers and reduces its gradients; DDP's reducer is armed).
    return run_in_forward(wrapper_chain(policy), loss)


@dataclass
class GRPOResult:
    policy: nn.Module
    reference: object
    history: list[dict] = field(default_factory=list)
    metrics_path: Path | None = None
    plot_path: Path | None = None
    kl_monitor: kl_mod.KLMonitor | None = None


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def grpo(policy: nn.Module, tokenizer, prompts: Sequence, reward_funcs: Sequence, cfg: GRPOConfig = GRPOConfig(),
         *, reference=None, reward_weights: Sequence[float] | None = None) -> GRPOResult:
    """Train ``policy`` with GRPO on ``prompts`` (prompt-only records) and ``reward_funcs``.

    ``reference``: anything :func:`refmodel.reference.resolve` takes (a Reference, a ``ReferenceConfig``,
    a store or model folder, a service URL, ...) or ``None`` (the adapter-off base for a LoRA policy,
    else a frozen copy). Ignored when ``beta == 0``. It must score at ``cfg.temperature`` (refused if not).
    """
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.lora_r > 0 and not hasattr(policy, "peft_config"):
        policy = add_lora(policy, cfg.lora_r, cfg.lora_alpha, cfg.seed)
    if len(prompts) == 0:
        raise ConfigError("GRPO needs at least one prompt")
    # beta == 0: no KL term, so no reference is built or asked
    reference = None if cfg.beta == 0 else resolve(reference, policy, temperature=cfg.temperature, who="grpo")
    need_old = needs_old_logprobs(cfg.num_iterations, 1, cfg.importance_sampling_correction)
    params = [p for p in policy.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the policy has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    monitor = kl_mod.KLMonitor(threshold=cfg.kl_threshold, name="exact KL" if cfg.exact_kl_every else "KL")
    out_dir = Path(cfg.output_dir) if cfg.output_dir else None
    result = GRPOResult(policy=policy, reference=reference, kl_monitor=monitor)
    log_steps = StepLog(result.history, monitor, out_dir, "grpo_config.json", cfg,
                        metrics_name="grpo_metrics.jsonl")
    rng = random.Random(cfg.seed)
    order: list[int] = []
    global_step, epoch = 0, 0
    from tqdm.auto import tqdm

    bar = tqdm(range(1, cfg.max_steps + 1), desc=f"grpo {cfg.loss_type}", disable=not cfg.progress or not is_main_process(),
               unit="step")
    try:
        for step in bar:
            start = time.perf_counter()
            while len(order) < cfg.prompts_per_step:  # epochs of shuffled prompts
                if step > 1 and reference is not None and hasattr(reference, "on_epoch_end"):
                    epoch += 1
                    reference.on_epoch_end(epoch, policy)  # a per-epoch Synced reference copies the policy
                more = list(range(len(prompts)))
                rng.shuffle(more)
                order += more
            batch, order = [prompts[i] for i in order[:cfg.prompts_per_step]], order[cfg.prompts_per_step:]
            t = time.perf_counter()
            rollouts = generate_rollouts(policy, tokenizer, batch, cfg.sampling)
            t_rollout = time.perf_counter() - t
            t = time.perf_counter()
            rewards, reward_parts = compute_rewards(reward_funcs, rollouts, reward_weights)
            advantages = _group_advantages(rewards, cfg.num_generations, cfg.scale_rewards).to(_device(policy))
            t_reward = time.perf_counter() - t
            policy.train()
            scored = score_rollouts(policy, reference, rollouts, need_old=need_old, beta=cfg.beta,
                                    micro_batch_size=cfg.micro_batch_size)
            metrics = {"step": step, "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                       **reward_parts, "completion_length": float(rollouts.completion_lengths.float().mean())}
            metrics.update(_exact_kl_metrics(policy, reference, scored, cfg, step))
            t = time.perf_counter()
            for iteration in range(cfg.num_iterations):
                optimizer.zero_grad(set_to_none=True)
                step_metrics = policy_step(policy, scored, advantages, cfg)
                if cfg.max_grad_norm is not None:
                    step_metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                if iteration == 0:  # the KL and sampler gap of the policy that sampled the batch
                    first = {k: step_metrics[k] for k in ("kl_estimated", "sampler_logp_diff_mean",
                                                          "sampler_logp_diff_max")}
                optimizer.step()
                global_step += 1
                if reference is not None:
                    reference.on_step(global_step, policy)
            t_policy = time.perf_counter() - t
            metrics.update(step_metrics)
            metrics.update(first)
            metrics.update({"optimizer_step": global_step, "time_rollout_s": t_rollout, "time_reward_s": t_reward,
                            "time_reference_s": scored.ref_time_s, "time_old_s": scored.old_time_s,
                            "time_policy_s": t_policy, "ref_calls": scored.ref_calls, "old_calls": scored.old_calls})
            metrics["step_time_s"] = time.perf_counter() - start
            watched = metrics["kl_exact"] if not math.isnan(metrics["kl_exact"]) else metrics["kl_estimated"]
            log_steps.record(metrics, step, watched)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}", kl=f"{watched:.3g}")
    finally:
        bar.close()
        log_steps.close()
    if out_dir is not None:
        result.metrics_path = log_steps.metrics_path
        result.plot_path = plot_or_skip(plot_grpo_metrics, result.history, out_dir / "grpo_curves.png")
    return result


def _group_advantages(rewards, group_size, scale):
    from ..rl import group_advantages

    return group_advantages(rewards, group_size, scale=scale)


def _exact_kl_metrics(policy, reference, scored: ScoredRollouts, cfg: GRPOConfig, step: int) -> dict[str, float]:
    """The exact (full-vocabulary) KL of the policy that sampled the batch; NaN without a local reference."""
    out = {"kl_exact": float("nan"), "time_exact_kl_s": 0.0}
    if reference is not None and cfg.exact_kl_every and (step - 1) % cfg.exact_kl_every == 0:
        t = time.perf_counter()
        out["kl_exact"] = exact_kl(policy, reference, scored.rollouts, cfg.micro_batch_size)
        out["time_exact_kl_s"] = time.perf_counter() - t
    return out


def plot_grpo_metrics(history: Sequence[dict], path: str | Path) -> Path:
    """Reward, KL (exact and estimated), clip fraction, entropy, sampler gap and time per phase, to PNG
    (the ``plot`` extra)."""
    matplotlib = require("matplotlib", "plot")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    ax = axes[0, 0]
    mean = [h["reward_mean"] for h in history]
    std = [h["reward_std"] for h in history]
    ax.plot(steps, mean, label="reward mean", linewidth=1)
    ax.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],
                    [m + s for m, s in zip(mean, std, strict=True)], alpha=0.2, label="± std")
    ax.set_title("reward")
    ax.legend()
    panels = [(axes[0, 1], "KL to the reference (nats/token)", ["kl_exact", "kl_estimated"]),
              (axes[0, 2], "clip fraction", ["clip_fraction"]), (axes[1, 0], "entropy (nats/token)", ["entropy"]),
              (axes[1, 1], "|sampler - trainer| log-prob", ["sampler_logp_diff_mean"]),
              (axes[1, 2], "time per step (s)", ["time_rollout_s", "time_reference_s", "time_old_s",
                                                 "time_policy_s"])]
    for ax, title, keys in panels:
        for key in keys:
            ax.plot(steps, [h.get(key, float("nan")) for h in history], label=key, linewidth=1)
        ax.set_title(title)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in axes.flat:
        ax.set_xlabel("step")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


@torch.no_grad()
def evaluate_rewards(policy: nn.Module, tokenizer, prompts: Sequence, reward_funcs: Sequence,
                     sampling: SamplingConfig, seed: int = 1234) -> float:
    """Mean reward of ``sampling.num_generations`` fresh samples per prompt (seeded; the global RNG is restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rollouts = generate_rollouts(policy, tokenizer, prompts, sampling)
    rewards, _ = compute_rewards(reward_funcs, rollouts)
    return float(rewards.mean())


__all__ = ["GRPOConfig", "GRPOResult", "ServiceRewardModel", "compute_rewards", "evaluate_rewards", "grpo",
           "plot_grpo_metrics", "policy_step", "resolve_rl_reference"]
