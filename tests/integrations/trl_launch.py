"""The TRL trainers with refmodel references under a launcher: one script, many cases, one launch.

Run as ``torchrun --nproc_per_node 2 trl_launch.py SPEC.json`` (each rank writes ``result-RANK.json`` into
the spec's ``out``), or called in-process (:func:`run`) for the 1-process values. A case is
``(trainer, reference, backend)``: the trainer and its data, the reference strategy (:data:`REFERENCES`)
and how the policy is wrapped (:data:`BACKENDS`). The global batch is the same in both runs (the whole
dataset in one step: 4 pairs / examples, 2 GRPO prompts x 4 greedy generations), split over the ranks,
so the first-step loss (the mean over ranks of per-rank means over equal shares) must equal the
1-process one.

Besides the losses, each rank reports what the metric and logging rules promise under a launcher
(``refmodel.cluster``): the logged ``refmodel/store_hits`` / ``store_misses`` / ``ref_rows`` (reduced over
the ranks) next to this rank's own counters, and a :class:`refmodel.kl.KLMonitor` fed a rank-dependent KL.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch
import trl
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_helpers import COMMON, GRPO_COMMON, first_log, length_reward, load, pairs, prompts, unpaired

from refmodel import Frozen, Precomputed, Remote
from refmodel.cluster import launch_ranks
from refmodel.integrations.trl import DPOTrainer, GRPOTrainer, KTOTrainer
from refmodel.kl import KLMonitor
from refmodel.precompute.job import precompute

GLOBAL_BATCH = 4  # pairs (DPO), examples (KTO); GRPO: 2 prompts x num_generations 4 = 8 completions
STORED_PAIRS = 3  # the store holds the first 3 of the 4 pairs: the 4th misses on whichever rank gets it

# How the policy is wrapped: TRL config fields. FSDP2 / ZeRO-3 go here once the model-based strategies
# shard with the policy (issue 24), e.g. "fsdp2": {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}},
# "zero3": {"deepspeed": {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
# "train_batch_size": "auto", "gradient_accumulation_steps": "auto"}}; the launch stays the same.
BACKENDS: dict[str, dict] = {"ddp": {}}


def _store(spec: dict, world: int) -> Precomputed:
    """The first STORED_PAIRS pairs precomputed here (split over the ranks under a launcher, with its
    progress bar on the main process only), the rest answered by a Frozen fallback."""
    out = Path(spec["out"]) / f"store-{world}"
    store = precompute(spec["reference"], pairs(GLOBAL_BATCH)[:STORED_PAIRS], out, dtype="float32",
                       shard_examples=1, progress=True)
    return Precomputed(store, fallback=Frozen(spec["reference"]))


REFERENCES = {
    "store": _store,
    "service": lambda spec, world: Remote(spec["service"], "reference"),
    "frozen": lambda spec, world: Frozen(spec["reference"]),
    "frozen_sampling": lambda spec, world: Frozen(spec["reference"], temperature=GRPO_COMMON["temperature"]),
}

CASES = [  # (trainer, reference, backend)
    ("dpo", "store", "ddp"),
    ("dpo", "service", "ddp"),
    ("kto", "frozen", "ddp"),
    ("grpo", "frozen_sampling", "ddp"),
]


def run_case(trainer: str, reference: str, backend: str, spec: dict) -> dict:
    _, world, _ = launch_ranks()
    share = GLOBAL_BATCH // world
    out = str(Path(spec["out"]) / f"{trainer}-{reference}-{backend}-{world}")
    ref = REFERENCES[reference](spec, world)
    policy, tok = load(spec["policy"])
    common = {**COMMON, **BACKENDS[backend], "per_device_train_batch_size": share}
    if trainer == "dpo":
        t = DPOTrainer(policy, args=trl.DPOConfig(out, **common), train_dataset=Dataset.from_list(pairs(GLOBAL_BATCH)),
                       processing_class=tok, reference=ref)
    elif trainer == "kto":  # no KL term: TRL's KL completions are in-batch pairs, which a split batch changes
        t = KTOTrainer(policy, args=trl.KTOConfig(out, **common, loss_type="apo_zero_unpaired"),
                       train_dataset=Dataset.from_list(unpaired(GLOBAL_BATCH)), processing_class=tok, reference=ref)
    else:  # greedy generations: the same completions whatever the split (sampling would draw per rank)
        cfg = trl.GRPOConfig(out, **{**GRPO_COMMON, **BACKENDS[backend], "per_device_train_batch_size": 2 * share},
                             generation_kwargs={"do_sample": False})
        t = GRPOTrainer(policy, reward_funcs=length_reward, args=cfg, processing_class=tok,
                        train_dataset=Dataset.from_list(prompts(GLOBAL_BATCH // 2)), reference=ref,
                        kl_threshold=1e-12)
    t.train()
    runner = t.reference_runner
    logged = first_log(t)
    return {"case": f"{trainer}/{reference}/{backend}", "loss": logged["loss"],
            "logged": {k: v for k, v in logged.items() if k.startswith("refmodel/") or k == "kl"},
            "mine": {"rows": runner.rows, "store_hits": runner.store_hits, "store_misses": runner.store_misses}}


def run(spec: dict, cases=CASES) -> list[dict]:
    torch.manual_seed(0)
    results = [run_case(*case, spec) for case in cases]
    rank, _, _ = launch_ranks()
    monitor = KLMonitor(threshold=1e-9, name="launch test KL")
    monitor.update(float(rank + 1))  # ranks 0 and 1: 1.0 and 2.0; averaged over the ranks
    results.append({"case": "kl_monitor", "last": monitor.last, "warned": monitor.warned})
    return results


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    results = run(spec)
    (Path(spec["out"]) / f"result-{rank}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


if __name__ == "__main__" and "RANK" in os.environ:
    main()
