"""The TRL trainers with refmodel references under a launcher: one script, many cases, one launch.

Run as ``torchrun --nproc_per_node 2 trl_launch.py SPEC.json`` (each rank writes ``result-RANK.json`` into
the spec's ``out``), or called in-process (:func:`run`) for the 1-process values. A case is
``(trainer, reference, backend)``: the trainer and its data, the reference strategy (:data:`REFERENCES`)
and how the policy is wrapped (:data:`BACKENDS`). The global batch is the same in both runs (the whole
dataset in one step: 4 pairs / examples, 2 GRPO prompts x 4 greedy generations), split over the ranks,
so the first-step loss (the mean over ranks of per-rank means over equal shares) must equal the
1-process one. In one process every backend is the plain model, so :func:`run` runs the "ddp" cases only
there. Under "fsdp2" and "zero3" the trainer itself shards the policy (accelerate's FSDP2 plugin, told it
runs on GPUs; DeepSpeed's engine on CPU), and each rank reports the reference's per-rank bytes, the
policy's sharding kind, the TR-DPO syncs and whether TRL holds a reference model.

Besides the losses, each rank reports what the metric and logging rules promise under a launcher
(``refmodel.cluster``): the logged ``refmodel/store_hits`` / ``store_misses`` / ``ref_rows`` (reduced over
the ranks) next to this rank's own counters, and a :class:`refmodel.kl.KLMonitor` fed a rank-dependent KL.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import trl
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_helpers import COMMON, GRPO_COMMON, first_log, length_reward, load, pairs, prompts, unpaired

from refmodel import Frozen, Precomputed, ReferenceConfig, Remote
from refmodel.cluster import launch_ranks
from refmodel.integrations.trl import DPOTrainer, GRPOTrainer, KTOTrainer
from refmodel.kl import KLMonitor
from refmodel.models.sharding import sharding_kind
from refmodel.precompute.job import precompute

GLOBAL_BATCH = 4  # pairs (DPO), examples (KTO); GRPO: 2 prompts x num_generations 4 = 8 completions
STORED_PAIRS = 3  # the store holds the first 3 of the 4 pairs: the 4th misses on whichever rank gets it

# How the policy is wrapped: TRL config fields. accelerate grants FSDP to GPU processes only, so under
# "fsdp2" the config's PartialState is told it runs on GPUs (as in test_trl_trainer.py); the processes
# stay on the CPU (gloo). ZeRO-3 runs on CPU as it is. In one process every backend is the plain model,
# so the 1-process value of a case is its "ddp" run.
BACKENDS: dict[str, dict] = {
    "ddp": {},
    "fsdp2": {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}},
    "zero3": {"deepspeed": {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
                            "train_batch_size": "auto", "gradient_accumulation_steps": "auto"}},
}
# A LoRA policy whose adapter is not zero (init_lora_weights=False, seeded), so that the base model
# (adapter-off) differs from the policy and moves the first step's loss.
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
PEFT_REFERENCES = {"adapter", "synced_peft"}


def _store(spec: dict, world: int) -> Precomputed:
    """The first STORED_PAIRS pairs precomputed here (split over the ranks under a launcher, with its
    progress bar on the main process only; once per run, reused by every backend), the rest answered by
    a Frozen fallback."""
    if world not in _STORES:
        _STORES[world] = precompute(spec["reference"], pairs(GLOBAL_BATCH)[:STORED_PAIRS],
                                    Path(spec["out"]) / f"store-{world}", dtype="float32", shard_examples=1,
                                    progress=True)
    return Precomputed(_STORES[world], fallback=Frozen(spec["reference"]))


_STORES: dict[int, object] = {}  # world size -> the store precomputed for it


REFERENCES = {
    "store": _store,
    "service": lambda spec, world: Remote(spec["service"], "reference"),
    "frozen": lambda spec, world: Frozen(spec["reference"]),
    "frozen_sampling": lambda spec, world: Frozen(spec["reference"], temperature=GRPO_COMMON["temperature"]),
    "adapter": lambda spec, world: "adapter",  # AdapterDisabled of the LoRA policy (resolved inside TRL)
    # TR-DPO, a (soft, alpha 0.6) sync after every step: the first step's reference is the policy itself (loss
    # ln 2); these cases run 2 steps, so the second step's loss checks the sync under each backend.
    "synced_full": lambda spec, world: ReferenceConfig(sync_ref_model=True, ref_model_sync_steps=1),
    "synced_peft": lambda spec, world: ReferenceConfig(sync_ref_model=True, ref_model_sync_steps=1),
}
SAME_AS_POLICY = {"synced_full", "synced_peft"}  # references equal to the policy at step 1: loss ln 2

DPO_REFERENCES = ("store", "service", "frozen", "adapter", "synced_full", "synced_peft")

CASES = [  # (trainer, reference, backend); ZeRO-3 last (see _undo_backend)
    *[(trainer, reference, backend) for backend in BACKENDS
      for trainer, reference in [*(("dpo", r) for r in DPO_REFERENCES), ("kto", "frozen"),
                                 ("grpo", "frozen_sampling"), ("grpo", "adapter")]],
]


def _policy(spec: dict, reference: str):
    policy, tok = load(spec["policy"])
    if reference in PEFT_REFERENCES:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)  # the same adapter on every rank and in the 1-process run
        policy = get_peft_model(policy, LoraConfig(**LORA))
    return policy, tok


def _backend(cfg, backend: str):
    if backend == "fsdp2":
        assert cfg.device.type == "cpu"  # resolves the config's PartialState first
        PartialState().distributed_type = DistributedType.MULTI_GPU  # accelerate then grants FSDP (on CPU)
    return cfg


def _undo_backend() -> None:
    """accelerate's state and the HF DeepSpeed config back to none: the next case starts afresh (an active
    DeepSpeed config would make later ``from_pretrained`` calls partition their weights)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state(reset_partial_state=True)
    unset_hf_deepspeed_config()


def run_case(trainer: str, reference: str, backend: str, spec: dict) -> dict:
    _, world, _ = launch_ranks()
    share = GLOBAL_BATCH // world
    out = str(Path(spec["out"]) / f"{trainer}-{reference}-{backend}-{world}")
    ref = REFERENCES[reference](spec, world)
    policy, tok = _policy(spec, reference)
    common = {**COMMON, **BACKENDS[backend], "per_device_train_batch_size": share,
              "max_steps": 2 if reference in SAME_AS_POLICY else 1}
    try:
        if trainer == "dpo":
            t = DPOTrainer(policy, args=_backend(trl.DPOConfig(out, **common), backend),
                           train_dataset=Dataset.from_list(pairs(GLOBAL_BATCH)), processing_class=tok, reference=ref)
        elif trainer == "kto":  # no KL term: TRL's KL completions are in-batch pairs, which a split batch changes
            t = KTOTrainer(policy, args=_backend(trl.KTOConfig(out, **common, loss_type="apo_zero_unpaired"), backend),
                           train_dataset=Dataset.from_list(unpaired(GLOBAL_BATCH)), processing_class=tok,
                           reference=ref)
        else:  # greedy generations: the same completions whatever the split (sampling would draw per rank)
            cfg = trl.GRPOConfig(out, **{**GRPO_COMMON, **BACKENDS[backend], "per_device_train_batch_size": 2 * share},
                                 generation_kwargs={"do_sample": False})
            t = GRPOTrainer(policy, reward_funcs=length_reward, args=_backend(cfg, backend), processing_class=tok,
                            train_dataset=Dataset.from_list(prompts(GLOBAL_BATCH // 2)), reference=ref,
                            kl_threshold=1e-12)
        t.train()
        wrapped = {"distributed": str(t.accelerator.distributed_type), "sharding": sharding_kind(t.model),
                   "syncs": getattr(t.reference, "syncs", None),
                   "trl_ref_model": isinstance(getattr(t, "ref_model", None), torch.nn.Module)}
    finally:
        _undo_backend()
    runner = t.reference_runner
    logged = first_log(t)
    return {"case": f"{trainer}/{reference}/{backend}", "loss": logged["loss"],
            "losses": [h["loss"] for h in t.state.log_history if "loss" in h],
            "reference": type(t.reference).__name__, "ref_bytes": getattr(t.reference, "memory_bytes", None),
            **wrapped,
            "logged": {k: v for k, v in logged.items() if k.startswith("refmodel/") or k == "kl"},
            "mine": {"rows": runner.rows, "store_hits": runner.store_hits, "store_misses": runner.store_misses}}


def run(spec: dict, cases=CASES) -> list[dict]:
    """Each case's results; in one process only the "ddp" runs (every backend is the plain model there)."""
    torch.manual_seed(0)
    if launch_ranks()[1] == 1:
        cases = [c for c in cases if c[2] == "ddp"]
    results = []
    for case in cases:
        start = time.perf_counter()
        try:
            results.append({**run_case(*case, spec), "seconds": time.perf_counter() - start})
        except Exception:
            if not spec.get("keep_going"):  # debugging only: report the error and go on with the next case
                raise
            import traceback

            results.append({"case": "/".join(case), "error": traceback.format_exc()[-3000:]})
    rank, _, _ = launch_ranks()
    monitor = KLMonitor(threshold=1e-9, name="launch test KL")
    monitor.update(float(rank + 1))  # ranks 0 and 1: 1.0 and 2.0; averaged over the ranks
    results.append({"case": "kl_monitor", "last": monitor.last, "warned": monitor.warned})
    return results


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank = torch.distributed.get_rank()
    results = run(spec, [tuple(c) for c in spec.get("cases", CASES)])  # "cases": a subset, when debugging
    (Path(spec["out"]) / f"result-{rank}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


if __name__ == "__main__" and "RANK" in os.environ:
    main()
