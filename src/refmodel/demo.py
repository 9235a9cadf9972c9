"""``refmodel demo``: the main job on the built-in tiny model and preference data."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .logprobs import model_logprobs
from .testing import builtin_dataset_path, load_tiny, make_tiny_model

log = logging.getLogger(__name__)


def run_demo(out: str | Path = "runs/demo", n_pairs: int = 256) -> dict:
    """Score the built-in pairs' completions with the fused head and with full logits; print both."""
    import json

    out = Path(out)
    model_dir = make_tiny_model("llama", out / "model")
    model, tok = load_tiny(model_dir)
    pairs = [json.loads(x) for x in builtin_dataset_path().read_text().splitlines()[:n_pairs]]
    texts = [p["prompt"] + " " + p["chosen"] for p in pairs]
    enc = tok(texts, return_tensors="pt", padding=True)
    prompt_len = torch.tensor([len(tok(p["prompt"])["input_ids"]) for p in pairs])
    score = (torch.arange(enc["input_ids"].shape[1])[None] >= prompt_len[:, None]) & enc["attention_mask"].bool()
    results = {}
    with torch.no_grad():
        for name, fused in (("fused head", True), ("full logits", False)):
            start = time.perf_counter()
            lp = model_logprobs(model, enc["input_ids"], enc["attention_mask"], score,
                                use_fused_linear_logprobs=fused)
            results[name] = (lp.sum(1), time.perf_counter() - start)
    diff = (results["fused head"][0] - results["full logits"][0]).abs().max().item()
    print(f"scored {n_pairs} chosen completions of the built-in dataset with a tiny Llama ({model_dir})")
    for name, (sums, secs) in results.items():
        print(f"  {name:<12} mean sequence log-prob {sums.mean().item():9.4f} nats   {secs * 1e3:7.1f} ms")
    print(f"  max |difference| between the two: {diff:.2e} nats")
    return {"max_abs_diff": diff}
