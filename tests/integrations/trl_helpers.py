"""Shared set-up of the TRL integration tests: tiny models, a BOS+EOS tokenizer, configs, stores, spies."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from refmodel.testing import (
    load_tiny,
    make_tiny_model,
    preference_pairs,
    run_cli,
    write_jsonl,
)

# float32 everywhere: TRL's configs default to bf16=True, which would put both sides under CPU autocast.
COMMON = dict(per_device_train_batch_size=4, max_steps=1, logging_steps=1, report_to=[], save_strategy="no",
              use_cpu=True, bf16=False, seed=0, learning_rate=1e-3, disable_tqdm=True, dataloader_num_workers=0)


def make_models(root: Path) -> tuple[Path, Path]:
    """``(policy_dir, reference_dir)``: two different tiny Llamas sharing a BOS+EOS tokenizer (``<s> $A </s>``).

    The reference differs from the policy, so a wrong reference moves the first step's loss.
    """
    out = [make_tiny_model("llama", root / name, seed=seed, tokenizer="bos_eos")
           for name, seed in (("policy", 1), ("reference", 0))]
    return out[0], out[1]


def load(path: Path):
    model, tok = load_tiny(path)
    model.train()
    return model, tok


def pairs(n: int, conversational: bool = False) -> list[dict]:
    rows = preference_pairs(n, seed=3)
    if not conversational:
        return rows
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]


def unpaired(n: int, conversational: bool = False) -> list[dict]:
    rows = []
    for i, r in enumerate(pairs(n, conversational)):
        rows.append({"prompt": r["prompt"], "completion": r["chosen"] if i % 2 else r["rejected"],
                     "label": bool(i % 2)})
    return rows


def truncate(ids: list[int], mask: list[int], max_length: int | None, mode: str = "keep_start"):
    if max_length is None:
        return ids, mask
    sl = slice(None, max_length) if mode == "keep_start" else slice(-max_length, None)
    return ids[sl], mask[sl]


def trl_sequences(dataset, completions: tuple[str, ...], max_length: int | None, mode: str = "keep_start"):
    """The ``(ids, completion mask)`` TRL's collator builds from its tokenized dataset, truncation included."""
    out = []
    for row in dataset:
        for name in completions:
            ids = list(row["prompt_ids"]) + list(row[name])
            mask = [0] * len(row["prompt_ids"]) + [1] * len(row[name])
            out.append(truncate(ids, mask, max_length, mode))
    return out


def precompute_store(sequences, model_dir: Path, out: Path) -> Path:
    """``refmodel precompute`` (the CLI, float32 storage) over pre-tokenized sequences."""
    data = write_jsonl([{"input_ids": ids, "score_mask": mask} for ids, mask in sequences], out.with_suffix(".jsonl"))
    run_cli("precompute", "--model", model_dir, "--data", data, "--out", out, "--dtype", "float32", "--max-length", 0)
    return out


def precompute_records(records: list[dict], model_dir: Path, out: Path, max_length: int | None,
                       truncation_mode: str = "keep_start", dtype: str = "float32") -> Path:
    """``refmodel precompute`` (the CLI) over the raw records, with the trainer's TRL settings."""
    data = write_jsonl(records, out.with_suffix(".jsonl"))
    run_cli("precompute", "--model", model_dir, "--data", data, "--out", out, "--dtype", dtype,
            "--max-length", 0 if max_length is None else max_length, "--truncation-mode", truncation_mode)
    return out


class ForwardCounter:
    """Counts forward calls of a module (a spy, not a mock: the module runs as usual)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1

    def remove(self) -> None:
        self._handle.remove()


@contextlib.contextmanager
def count_model_loads(monkeypatch, *modules):
    """Count TRL's ``create_model_from_path`` calls in ``modules`` (how TRL builds its reference copy)."""
    calls = []
    for module in modules:
        original = module.create_model_from_path

        def spy(*args, _original=original, **kwargs):
            calls.append(args)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "create_model_from_path", spy)
    yield calls


def first_log(trainer) -> dict:
    return next(h for h in trainer.state.log_history if "loss" in h)


def prompts(n: int) -> list[dict]:
    """Prompt-only records (GRPO) of different lengths, so TRL left-pads them."""
    return [{"prompt": " ".join(r["prompt"].split()[: 2 + i % 5])} for i, r in enumerate(preference_pairs(n, seed=5))]


def length_reward(completions, **kwargs) -> list[float]:
    return [float(len(c)) for c in completions]


GRPO_COMMON = dict(COMMON, per_device_train_batch_size=8, num_generations=4, max_completion_length=8, beta=0.1, temperature=0.7)


def capture_generations(trainer) -> list[dict]:
    """Record every output of TRL's ``_generate_and_score_completions`` (ids, masks, reference log-probs)."""
    seen: list[dict] = []
    original = trainer._generate_and_score_completions

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out)
        return out

    trainer._generate_and_score_completions = spy
    return seen


def generation_batch(out: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(input_ids, attention_mask, logits_to_keep)`` of a GRPO generation batch."""
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    attn = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    return ids, attn, out["completion_ids"].shape[1]
