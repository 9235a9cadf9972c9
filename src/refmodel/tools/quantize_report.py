"""``refmodel quantize-report``: what quantizing a reference model costs on real preference data.

For each mode, against the unquantized reference loaded from the same directory, on the scored
(completion) tokens of chosen and rejected sequences:

- per-token ``|Δ log p|`` of the actual token (mean, p99), from :func:`refmodel.model_logprobs`;
- mean ``KL(ref || quantized)`` of the full next-token distributions (nats per token), from the
  models' own logits, so soft-capping and logit scales are included;
- model bytes (parameters + buffers as stored) and scoring time of ``model_logprobs`` over the data.

How the speed column is measured, so that it says the same thing from run to run (it used to swing
from 0.85x to 71x: one cold pass of the reference, page-faulting its memory-mapped weights, against
warm passes of the quantized model, on a machine shared with other jobs):

- each model first makes ``warmup`` full passes over the data (lazy init, page faults, kernel choice);
- then ``repeats`` rounds, each timing one full pass of the reference and one of the quantized model
  back to back (alternating which goes first), so both see the same machine load;
- ``speed_vs_ref`` is the median over rounds of ``t_ref / t_quantized``; ``seconds`` is the median pass
  time. The reference row's ``seconds`` is its median over all those rounds.

Models load through the one safe loader (:func:`refmodel.models.loading.load_model`): safetensors
only, never the folder's own code.

Published points to compare with (llama.cpp perplexity README, Llama-3-8B, KL vs the 16-bit model):
q8_0 mean KL ~0.0014 nats, q4_K_M ~0.031, q4_0 ~0.072.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import ConfigError, DataFormatError, MissingDependency
from ..logprobs.model import model_logprobs, shifted_logits, validate_batch
from ..logprobs.transform import full_log_softmax
from ..models.loading import check_model_folder, load_reference_model, load_tokenizer
from ..models.quantize import QUANT_MODES, check_mode, model_nbytes

log = logging.getLogger(__name__)

PUBLISHED = "llama.cpp, Llama-3-8B vs 16-bit: mean KL q8_0 ~0.0014, q4_K_M ~0.031, q4_0 ~0.072 nats/token"


def read_pairs(path: str | Path, max_pairs: int | None = None) -> list[dict[str, str]]:
    """``{"prompt", "chosen", "rejected"}`` rows of a data file (JSONL, Parquet or an HF dataset folder)."""
    from ..data import load_records  # JSONL / Parquet / HF folder, with FILE:LINE locations

    rows = []
    for where, row in load_records(path):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected")):
            raise DataFormatError(f"{where}: expected an object with string fields "
                                  f"'prompt', 'chosen' and 'rejected'")
        rows.append(row)
        if max_pairs is not None and len(rows) >= max_pairs:
            break
    if not rows:
        raise DataFormatError(f"{path}: no preference pairs found")
    return rows


def build_batches(tokenizer, pairs, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Right-padded ``(input_ids, attention_mask, score_mask)`` batches of prompt + chosen / rejected,
    tokenized and padded by :mod:`refmodel.data` (TRL's rule, no truncation)."""
    from ..data import collate, load_examples, pad_id_of

    seqs = [s for ex in load_examples(pairs, tokenizer, max_length=None) for s in ex.sequences()]
    batches = []
    for start in range(0, len(seqs), batch_size):
        b = collate(seqs[start:start + batch_size], pad_id_of(tokenizer))
        batches.append((b["input_ids"], b["attention_mask"], b["score_mask"]))
    return batches


@torch.no_grad()
def _scored_log_dist(model, input_ids, attn, score) -> torch.Tensor:
    """``[N, V]`` float32 log-softmax of the model's own logits predicting each token that
    :func:`refmodel.model_logprobs` scores: the same rows in the same order (``validate_batch``'s rule, positions
    from the mask), so the KL and the ``|Δ log p|`` columns describe the same tokens."""
    attn, scored = validate_batch(input_ids, attn, score)
    return full_log_softmax(shifted_logits(model, input_ids, attn)[scored[:, 1:]])


@torch.no_grad()
def _score(model, batches, device) -> tuple[list[torch.Tensor], float]:
    """Log-probs of every batch and the wall time of one pass over them (seconds)."""
    out, start = [], time.perf_counter()
    for ids, attn, score in batches:
        out.append(model_logprobs(model, ids.to(device), attn.to(device), score.to(device)).cpu())
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def _paired_speed(ref, model, batches, device, repeats: int,
                  ref_times: list[float] | None = None) -> tuple[float, float]:
    """``(median seconds of the quantized pass, median of t_ref / t_quantized)`` over ``repeats`` rounds.

    The reference's pass times are appended to ``ref_times`` when given.
    """
    q_times, ratios = [], []
    for r in range(repeats):
        order = (ref, model) if r % 2 == 0 else (model, ref)  # alternate, so drift does not favour one
        times = {id(m): _score(m, batches, device)[1] for m in order}
        q_times.append(times[id(model)])
        ratios.append(times[id(ref)] / max(times[id(model)], 1e-12))
        if ref_times is not None:
            ref_times.append(times[id(ref)])
    return statistics.median(q_times), statistics.median(ratios)


def quantize_report(model_path: str | Path, data_path: str | Path, max_pairs: int = 64,
                    modes: tuple[str, ...] = QUANT_MODES, batch_size: int = 8, dtype=None,
                    device: str = "cpu", repeats: int = 5, warmup: int = 1) -> list[dict]:
    """Measure each quantization mode against the unquantized reference; returns one dict per mode.

    ``repeats`` paired timing rounds after ``warmup`` full passes per model (see the module docstring).
    """
    for mode in modes:
        check_mode(mode)
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    check_model_folder(model_path)  # refuse an unsafe folder before spending time on the data
    tokenizer = load_tokenizer(model_path)
    batches = build_batches(tokenizer, read_pairs(data_path, max_pairs), batch_size)
    ref = load_reference_model(model_path, dtype=dtype, device=device)
    for _ in range(warmup):
        _score(ref, batches, device)
    ref_lp, _ = _score(ref, batches, device)
    ref_times: list[float] = []
    ref_bytes = model_nbytes(ref)
    rows = [{"mode": "none", "bytes": ref_bytes, "mem_ratio": 1.0, "mean_abs_dlogp": 0.0, "p99_abs_dlogp": 0.0,
             "max_abs_dlogp": 0.0, "mean_kl": 0.0, "seconds": None, "speed_vs_ref": 1.0}]
    for mode in tqdm(modes, desc="quantize-report", disable=len(modes) < 2):
        try:
            model = load_reference_model(model_path, dtype=dtype, device=device, quantize=mode)
        except (MissingDependency, RuntimeError, NotImplementedError, ImportError) as exc:
            rows.append({"mode": mode, "error": f"{type(exc).__name__}: {exc}"})
            continue
        for _ in range(warmup):
            _score(model, batches, device)
        q_lp, _ = _score(model, batches, device)
        q_s, speed = _paired_speed(ref, model, batches, device, repeats, ref_times)
        deltas, kls = [], []
        for (ids, attn, score), a, b in zip(batches, ref_lp, q_lp, strict=True):
            deltas.append((a - b).abs()[validate_batch(ids, attn, score)[1]])
            p_ref = _scored_log_dist(ref, ids.to(device), attn.to(device), score.to(device))
            p_q = _scored_log_dist(model, ids.to(device), attn.to(device), score.to(device))
            kls.append((p_ref.exp() * (p_ref - p_q)).sum(-1).cpu())
        delta, kl = torch.cat(deltas).double(), torch.cat(kls).double()
        nbytes = model_nbytes(model)
        rows.append({"mode": mode, "bytes": nbytes, "mem_ratio": nbytes / ref_bytes,
                     "mean_abs_dlogp": delta.mean().item(), "p99_abs_dlogp": torch.quantile(delta, 0.99).item(),
                     "max_abs_dlogp": delta.max().item(), "mean_kl": kl.mean().item(),
                     "seconds": q_s, "speed_vs_ref": speed, "scored_tokens": delta.numel()})
        del model
    if not ref_times:  # no mode could run: time the reference alone
        ref_times = [_score(ref, batches, device)[1] for _ in range(repeats)]
    rows[0]["seconds"] = statistics.median(ref_times)
    return rows


def format_report(rows: list[dict]) -> str:
    """The report as a fixed-width table (one row per mode, ratios against the unquantized reference)."""
    lines = [f"{'mode':<10}{'MiB':>9}{'mem/ref':>9}{'mean|dlogp|':>13}{'p99|dlogp|':>12}{'max|dlogp|':>12}"
             f"{'mean KL':>11}{'score s':>9}{'speed/ref':>11}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['mode']:<10}  unavailable: {r['error']}")
            continue
        lines.append(f"{r['mode']:<10}{r['bytes'] / 2**20:>9.3f}{r['mem_ratio']:>9.3f}{r['mean_abs_dlogp']:>13.5f}"
                     f"{r['p99_abs_dlogp']:>12.5f}{r['max_abs_dlogp']:>12.5f}{r['mean_kl']:>11.6f}"
                     f"{r['seconds']:>9.3f}{r['speed_vs_ref']:>11.2f}")
    lines.append(f"# published: {PUBLISHED}")
    return "\n".join(lines)


__all__ = ["build_batches", "format_report", "quantize_report", "read_pairs"]
