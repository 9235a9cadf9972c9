"""A small, readable DPO-family training loop over a Hugging Face causal LM (full or LoRA).

It is a demonstration and a test bed, not a replacement for TRL. One optimizer step:

1. split the step's pairs into ``grad_accum_steps`` micro-batches (sizes may differ by one);
2. per micro-batch, stack ``[chosen; rejected]`` into one ``[2b, T]`` batch, score the completion
   tokens with the policy (:func:`refmodel.model_logprobs`, fused head) and the reference
   (``reference.logprobs``, no gradient), sum them per sequence;
3. backpropagate ``sum(per-pair losses) / pairs_in_step`` (+ token-weighted NLL terms divided by the
   step's *global* token count), so the accumulated gradient equals the full batch's gradient
   whatever the micro-batch sizes (a mean per micro-batch would weight small micro-batches up);
4. clip, step, ``reference.on_step(step, policy)``, log metrics (JSONL) and update the progress bar.

The logged ``kl`` is ``kl_estimator`` (default k2) per token over the chosen completions, a proxy:
the k-estimators assume tokens sampled from the policy, and offline preference data is not; k3 is
unbounded there (exp of the drop in a token's log-prob), k2 grows only quadratically.

At the end the curves are plotted to PNG (matplotlib, Agg backend).
"""

from __future__ import annotations

import random
import resource
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._deprecation import warn_deprecated
from .._optional import require
from ..cluster import get_logger, is_main_process
from ..data import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_TRUNCATION_MODE,
    Example,
    check_settings,
    collate_examples,
    load_examples,
    pad_id_of,
)
from ..errors import ConfigError, InvalidInput
from ..logprobs.model import model_logprobs
from ..losses import kl as kl_mod
from ..losses import preference as losses
from ..reference import ReferenceFree, resolve
from .steps import StepLog, plot_or_skip

log = get_logger(__name__)  # shared warnings: main process only (refmodel.cluster)

LOSSES: tuple[str, ...] = (*losses.DPO_LOSS_TYPES, "simpo", "orpo")
REFERENCE_FREE: tuple[str, ...] = ("simpo", "orpo")


@dataclass(frozen=True)
class TrainConfig:
    """Everything the loop needs; ``batch_size`` is pairs per optimizer step."""

    loss: str = "sigmoid"  # sigmoid | ipo | hinge | robust (DPO family), simpo, orpo
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    batch_size: int = 8
    grad_accum_steps: int = 1
    max_steps: int = 100
    max_length: int | None = DEFAULT_MAX_LENGTH  # TRL's names and rule (refmodel.data): truncate, drop
    truncation_mode: str = DEFAULT_TRUNCATION_MODE
    seed: int = 0
    kl_estimator: str = "k2"  # on offline data k3 explodes where the policy drops a token (see docstring)
    kl_threshold: float | None = None
    lora_r: int = 0  # > 0 wraps the policy in a PEFT LoRA adapter on every linear layer
    lora_alpha: int = 16
    output_dir: str | None = None  # metrics.jsonl and curves.png go here
    progress: bool = True

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}; expected one of {list(LOSSES)}")
        check_settings(self.max_length, self.truncation_mode)
        for name in ("batch_size", "grad_accum_steps", "max_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.grad_accum_steps > self.batch_size:
            raise ConfigError(f"grad_accum_steps ({self.grad_accum_steps}) cannot exceed batch_size "
                              f"({self.batch_size}): every micro-batch needs at least one pair")
        if not self.beta > 0 or not self.learning_rate > 0:
            raise ConfigError(f"beta and learning_rate must be > 0, got {self.beta} and {self.learning_rate}")
        if self.kl_estimator not in kl_mod.ESTIMATORS:
            raise ConfigError(f"unknown kl_estimator {self.kl_estimator!r}; expected one of {list(kl_mod.ESTIMATORS)}")


def tokenize_preferences(data, tokenizer, cfg: TrainConfig = TrainConfig()) -> list[Example]:
    """Preference examples of ``data`` (records, a path or a ``datasets.Dataset``) through the one rule of
    :mod:`refmodel.data` with ``cfg.max_length`` / ``cfg.truncation_mode`` (TRL's DPO tokenization)."""
    examples = load_examples(data, tokenizer, max_length=cfg.max_length, truncation_mode=cfg.truncation_mode)
    for ex in examples:
        if ex.names != ("chosen", "rejected"):
            raise InvalidInput(f"{ex.where}: a {ex.kind} record; the DPO loop needs preference pairs "
                               "(prompt+chosen+rejected, chosen+rejected, or prompt_ids+chosen_ids+rejected_ids)")
    return examples


def pair_logps(policy: nn.Module, reference, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-sequence sums ``[2b]`` (policy with grad, reference without) and the token-level values.

    A reference with ``sequence_logps`` (``Precomputed``) gives its stored float32 sums, so a bf16 store
    costs the sequence-level losses no accuracy; the token values (KL) stay as stored. ``reference=None``
    (the reference-free losses, SimPO and ORPO) leaves out ``ref_logps`` and ``ref_tok``.
    """
    ids, attn, score = batch["input_ids"], batch["attention_mask"], batch["score_mask"]
    tok = model_logprobs(policy, ids, attn, score)
    out = {"logps": tok.sum(1), "tok": tok, "lengths": score.sum(1)}
    if reference is None:
        return out
    with torch.no_grad():
        if hasattr(reference, "sequence_logps"):
            ref = reference.sequence_logps(ids, attn, score)
            out["ref_tok"] = ref.token_logprobs.to(tok.device, torch.float32)
            out["ref_logps"] = ref.sequence_logps.to(tok.device)
        else:
            out["ref_tok"] = reference.logprobs(ids, attn, score).to(tok.device, torch.float32)
            out["ref_logps"] = out["ref_tok"].sum(1)
    return out


def _loss_terms(cfg: TrainConfig, out: dict[str, torch.Tensor], n_pairs: int) -> tuple[losses.PreferenceLoss, torch.Tensor]:
    """The loss output and the *sum* to backpropagate (per-pair losses summed; NLL summed over tokens)."""
    b = n_pairs
    pc, pr = out["logps"][:b], out["logps"][b:]
    lc, lr = out["lengths"][:b], out["lengths"][b:]
    if cfg.loss == "simpo":
        res = losses.simpo(pc, pr, chosen_lengths=lc, rejected_lengths=lr, beta=cfg.beta, gamma=cfg.simpo_gamma,
                           label_smoothing=cfg.label_smoothing)
    elif cfg.loss == "orpo":
        res = losses.orpo(pc, pr, chosen_lengths=lc, rejected_lengths=lr, beta=cfg.beta)
    else:
        rc, rr = out["ref_logps"][:b], out["ref_logps"][b:]
        res = losses.dpo(pc, pr, rc, rr, beta=cfg.beta, loss_type=cfg.loss, label_smoothing=cfg.label_smoothing,
                         chosen_lengths=lc if cfg.loss == "ipo" else None,
                         rejected_lengths=lr if cfg.loss == "ipo" else None)
    return res, res.losses.sum()


def accumulate_gradients(policy: nn.Module, reference, pairs: Sequence[Example], cfg: TrainConfig,
                         pad_id: int = 0) -> dict[str, float]:
    """Forward + backward over ``pairs`` in ``cfg.grad_accum_steps`` micro-batches; gradients add up
    to those of the whole batch. Returns the step's metrics (batch means). Does not step or zero.
    """
    n = len(pairs)
    bounds = [round(i * n / cfg.grad_accum_steps) for i in range(cfg.grad_accum_steps + 1)]
    chosen_tokens = sum(sum(p.completion_masks[0]) for p in pairs)
    sums = {"loss": 0.0, "chosen_rewards": 0.0, "rejected_rewards": 0.0, "margin": 0.0, "accuracy": 0.0,
            "kl": 0.0}
    kl_tokens = 0
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        batch = {k: v.to(_device(policy)) for k, v in collate_examples(pairs[lo:hi], pad_id).items()}
        out = pair_logps(policy, None if cfg.loss in REFERENCE_FREE else reference, batch)
        k = hi - lo
        res, loss_sum = _loss_terms(cfg, out, k)
        total = loss_sum / n
        if cfg.loss == "orpo":  # the NLL term is token-weighted over the whole step's chosen tokens
            total = total - out["logps"][: hi - lo].sum() / chosen_tokens
        total.backward()
        sums["loss"] += float(total.detach()) * n
        sums["chosen_rewards"] += float(res.chosen_rewards.sum())
        sums["rejected_rewards"] += float(res.rejected_rewards.sum())
        sums["margin"] += float(res.margin) * k
        sums["accuracy"] += float(res.accuracy) * k
        if cfg.loss not in REFERENCE_FREE:
            # KL proxy on the *chosen* completions: dataset tokens are not samples of the policy, and on
            # rejected completions (pushed far down by DPO) k3's exp(-log ratio) term explodes.
            mask = batch["score_mask"].clone()
            mask[k:] = False
            kl_tok = kl_mod.estimate(out["tok"].detach(), out["ref_tok"], cfg.kl_estimator, mask=mask)
            sums["kl"] += float(kl_tok.sum())
            kl_tokens += int(mask.sum())
    metrics = {k: v / n for k, v in sums.items()}
    metrics["kl"] = sums["kl"] / max(kl_tokens, 1) if cfg.loss not in REFERENCE_FREE else float("nan")
    return metrics


@torch.no_grad()
def evaluate(policy: nn.Module, reference, pairs: Sequence[Example], cfg: TrainConfig, pad_id: int = 0,
             batch_size: int = 64) -> dict[str, float]:
    """Reward accuracy, margin and loss on held-out ``pairs`` (policy in eval mode, no gradient)."""
    was_training = policy.training
    policy.eval()
    acc = margin = loss = 0.0
    try:
        for lo in range(0, len(pairs), batch_size):
            chunk = pairs[lo:lo + batch_size]
            batch = {k: v.to(_device(policy)) for k, v in collate_examples(chunk, pad_id).items()}
            res, _ = _loss_terms(cfg, pair_logps(policy, None if cfg.loss in REFERENCE_FREE else reference, batch),
                                 len(chunk))
            acc += float(res.accuracy) * len(chunk)
            margin += float(res.margin) * len(chunk)
            loss += float(res.loss) * len(chunk)
    finally:
        policy.train(was_training)
    n = max(len(pairs), 1)
    return {"eval_accuracy": acc / n, "eval_margin": margin / n, "eval_loss": loss / n}


@dataclass
class TrainResult:
    policy: nn.Module
    history: list[dict] = field(default_factory=list)
    metrics_path: Path | None = None
    plot_path: Path | None = None
    final_eval: dict[str, float] = field(default_factory=dict)
    kl_monitor: kl_mod.KLMonitor | None = None
    reference_metrics: dict = field(default_factory=dict)  # e.g. Precomputed's store hits / misses


# What a reference's metrics() keys count (Precomputed's; other references' keys print bare).
_METRIC_MEANING = {"hits": " (sequences read from the store)",
                   "misses": " (sequences not in the store, scored by the fallback)"}


def _report_reference(metrics: dict, echo: bool) -> None:
    """One line on where the reference log-probs came from; a WARNING when any row missed the store.

    Printed at the end of training (the first line of ``refmodel demo``'s output), so it says what its
    numbers count rather than only naming them.
    """
    text = "reference log-probs during training: " + ", ".join(
        (f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}") + _METRIC_MEANING.get(k, "")
        for k, v in metrics.items())
    (log.warning if metrics.get("misses") else log.info)(text)
    if echo:
        from tqdm.auto import tqdm

        tqdm.write(text)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def add_lora(model: nn.Module, r: int = 8, alpha: int = 16, seed: int = 0) -> nn.Module:
    """Wrap ``model`` in a fresh PEFT LoRA adapter on every linear layer (B = 0: the policy starts at the base)."""
    peft = require("peft", "peft")
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # PEFT reads transformers' deprecated `is_gradient_checkpointing` (transformers >= 5): their mismatch, not
        # the user's, and it is the only line `refmodel demo` printed.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return peft.get_peft_model(model, config)


def resolve_reference(policy: nn.Module, reference):
    """Deprecated: ``refmodel.reference.resolve(reference, policy)`` (note the argument order)."""
    warn_deprecated("refmodel.recipes.train.resolve_reference(policy, reference)",
                    "refmodel.reference.resolve(reference, policy)")
    return resolve(reference, policy)


def train(policy: nn.Module, tokenizer, train_pairs, cfg: TrainConfig = TrainConfig(), *,
          reference=None, eval_pairs=None) -> TrainResult:
    """Train ``policy`` on ``train_pairs`` with ``cfg``; see the module docstring for one step.

    ``train_pairs`` / ``eval_pairs``: preference records (a list of dicts, a data path or a
    ``datasets.Dataset``; text or conversational), tokenized by :mod:`refmodel.data` exactly as TRL's
    DPOTrainer does, so a store written by ``refmodel precompute`` with the same settings holds every row.
    ``reference`` is anything :func:`refmodel.reference.resolve` takes (a Reference, a ``ReferenceConfig``,
    a store or model folder, a service URL, ...) or ``None`` (the default config), at temperature 1. Reference-free losses (simpo, orpo) ignore it. A reference with
    ``metrics()`` (``Precomputed``: store hits and fallback misses) is reported at the end.
    """
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.lora_r > 0 and not hasattr(policy, "peft_config"):
        policy = add_lora(policy, cfg.lora_r, cfg.lora_alpha, cfg.seed)
    if cfg.loss in REFERENCE_FREE:
        reference = ReferenceFree()
    else:
        reference = resolve(reference, policy, who="train")
    pad_id = pad_id_of(tokenizer)
    data = tokenize_preferences(train_pairs, tokenizer, cfg)
    held_out = tokenize_preferences(eval_pairs, tokenizer, cfg) if eval_pairs is not None else []
    if len(data) < cfg.batch_size:
        raise ConfigError(f"batch_size={cfg.batch_size} but only {len(data)} training pairs")
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    monitor = kl_mod.KLMonitor(threshold=cfg.kl_threshold)
    out_dir = Path(cfg.output_dir) if cfg.output_dir else None
    result = TrainResult(policy=policy, kl_monitor=monitor)
    log_steps = StepLog(result.history, monitor, out_dir, "train_config.json", cfg)
    order: list[int] = []
    cursor = 0
    rng = random.Random(cfg.seed)
    from tqdm.auto import tqdm

    policy.train()
    bar = tqdm(range(1, cfg.max_steps + 1), desc=f"train {cfg.loss}", disable=not cfg.progress or not is_main_process(),
               unit="step")
    try:
        for step in bar:
            if cursor + cfg.batch_size > len(order):  # new epoch: reshuffle
                order, cursor = list(range(len(data))), 0
                rng.shuffle(order)
            batch = [data[i] for i in order[cursor:cursor + cfg.batch_size]]
            cursor += cfg.batch_size
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            metrics = accumulate_gradients(policy, reference, batch, cfg, pad_id)
            if cfg.max_grad_norm is not None:
                metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            optimizer.step()
            reference.on_step(step, policy)
            metrics.update(step=step, step_time_s=time.perf_counter() - start,
                           peak_memory_bytes=_peak_memory_bytes(_device(policy)))
            log_steps.record(metrics, step, metrics["kl"])
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.2f}")
    finally:
        bar.close()
        log_steps.close()
    if held_out:
        result.final_eval = evaluate(policy, reference, held_out, cfg, pad_id)
    if hasattr(reference, "metrics"):
        result.reference_metrics = dict(reference.metrics())
        _report_reference(result.reference_metrics, cfg.progress)
    if out_dir is not None:
        result.metrics_path = log_steps.metrics_path
        result.plot_path = plot_or_skip(plot_metrics, result.history, out_dir / "curves.png")
    return result


def plot_metrics(history: Sequence[dict], path: str | Path) -> Path:
    """Plot loss, rewards, margin, accuracy, KL and step time against the step into a PNG (the ``plot`` extra)."""
    matplotlib = require("matplotlib", "plot")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    steps = [h["step"] for h in history]
    # The exact held-out KL when the caller measured it (the demo); else say what the logged proxy is.
    kl_panel = ("exact KL, held-out (nats/token)", ["exact_kl"]) if any("exact_kl" in h for h in history) \
        else ("KL proxy: estimator on chosen tokens (nats/token)", ["kl"])
    panels = [("loss", ["loss"]), ("rewards", ["chosen_rewards", "rejected_rewards"]), ("margin", ["margin"]),
              ("reward accuracy", ["accuracy"]), kl_panel, ("step time (s)", ["step_time_s"])]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (title, keys) in zip(axes.flat, panels, strict=True):
        for key in keys:
            pts = [(h["step"], h[key]) for h in history if key in h]  # sparse series (exact_kl) plot as markers
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key, linewidth=1, marker="." if
                    len(pts) < len(steps) else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


__all__ = ["LOSSES", "TrainConfig", "TrainResult", "accumulate_gradients", "add_lora", "evaluate", "pair_logps",
           "plot_metrics", "resolve_reference", "tokenize_preferences", "train"]
