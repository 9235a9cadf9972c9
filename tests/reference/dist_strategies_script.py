"""Every model-based reference strategy under a distributed backend against one process, in ONE launch.

Run by ``tests/reference/test_distributed_strategies.py``::

    torchrun --nproc_per_node 2 tests/reference/dist_strategies_script.py POLICY_DIR REF_DIR OUT_DIR --backends ddp,fsdp2,zero3

Each rank first computes the one-process values with plain models (the same calls, one thread, the same
batch: what ``python script`` alone would get), then wraps or shards copies of them with each backend and
runs refmodel's own strategies and DPO loop on the whole batch (every rank the same batch, so averaged
gradients equal the one-process gradients). Writes ``OUT_DIR/rank<r>.jsonl`` (the ranks' stdout interleave),
one JSON line per backend and part:
``{"rank", "backend", "diffs": {check: max |distributed - one process|}, "equal": {check: bool},
"bytes": {...}}``; the test asserts ``diffs <= 1e-6`` (float32) and every ``equal``.

A backend is an entry of :data:`BACKENDS`: ``wrap(model) -> (trained, given)``, the module the loop trains
(DDP's wrapper, the sharded model) and the one handed to refmodel's strategies; and ``sharded`` (whether
the reference copy should hold less than the full model per rank). A backend whose training and loading
differ (DeepSpeed ZeRO-3: ``engine.backward``/``engine.step``, ``Frozen(path)`` under an active
``HfDeepSpeedConfig``) gives ``cases(policy_dir)`` instead, run once; ``zero3`` writes one line
``{"rank", "backend": "zero3", "zero3": {case: value or "ErrorClass: message"}}`` (:func:`run_zero3`). It runs
last: its ``HfDeepSpeedConfig`` makes later loads partitioned while alive, and importing DeepSpeed is slow.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from refmodel.data import collate_examples, pad_id_of
from refmodel.logprobs.lm_head import LMHead
from refmodel.logprobs.model import model_logprobs
from refmodel.losses import preference
from refmodel.models.fingerprint import fingerprint
from refmodel.models.loading import load_tokenizer
from refmodel.models.quantize import model_nbytes
from refmodel.models.sharding import full_parameters, local_parameter_bytes
from refmodel.recipes.train import (
    TrainConfig,
    accumulate_gradients,
    add_lora,
    pair_logps,
    tokenize_preferences,
)
from refmodel.reference import AdapterDisabled, Frozen, Synced
from refmodel.testing import load_tiny, preference_pairs


@dataclass
class Backend:
    wrap: Callable[[nn.Module], tuple[nn.Module, nn.Module]] | None
    sharded: bool
    cases: Callable[[str], dict] | None = None  # a backend with its own cases (run instead of run_full/run_peft)


def _ddp(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    return nn.parallel.DistributedDataParallel(model), model


def _fsdp2(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.get_base_model().model.layers if hasattr(model, "peft_config") else model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, model




def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def _lora(model: nn.Module) -> nn.Module:
    import peft

    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], lora_dropout=0.0)
    torch.manual_seed(0)  # PEFT draws lora_A from the global generator: the same adapter on every rank
    policy = peft.get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.named_parameters():  # non-zero B: the adapter changes the output
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return policy


def _optimizer(trained: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, made before any forward as a training script does: after an FSDP2
    forward the root's registered parameters are its gathered copies until the next backward reshards them."""
    return torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=cfg.learning_rate)


def _step(trained: nn.Module, optimizer, reference, pairs, cfg: TrainConfig) -> float:
    """One step of the DPO loop: forward + backward (``accumulate_gradients``) and the optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    loss = accumulate_gradients(trained, reference, pairs, cfg)["loss"]
    optimizer.step()
    return loss


# --- ZeRO-3 (DeepSpeed engine steps with SGD, refmodel's own DPO loss) ------------------------------
LR, ALPHA, BETA = 0.1, 0.6, 0.1
CONFIG = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "zero_allow_untested_optimizer": True}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to ``max(1, |b|)``: log-probs reach -20 here, where one float32 step is 2e-6."""
    a, b = a.detach().float(), b.detach().float()
    return float(((a - b).abs() / b.abs().clamp(min=1.0)).max())


def dpo_loss(policy, reference, batch) -> torch.Tensor:
    """Sigmoid DPO loss of refmodel's loop (``pair_logps`` + ``preference.dpo``), mean over the pairs."""
    out = pair_logps(policy, reference, batch)
    b = out["logps"].shape[0] // 2
    return preference.dpo(out["logps"][:b], out["logps"][b:], out["ref_logps"][:b], out["ref_logps"][b:],
                          beta=BETA).loss


def train_step(policy, reference, batch, engine=None):
    """One DPO step with SGD: the loss before it, then ``reference.on_step(1, policy)``."""
    loss = dpo_loss(policy, reference, batch)
    if engine is None:
        opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=LR)
        loss.backward()
        opt.step()
    else:
        engine.backward(loss)
        engine.step()
    reference.on_step(1, policy)
    return float(loss.detach())


def engine_of(model):
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, config=CONFIG, optimizer=torch.optim.SGD(params, lr=LR),
                                      model_parameters=params)
    return engine


def run_zero3(path: str) -> dict:
    """Every strategy under ZeRO-3 (s2's cases): ``{case: value}`` or the error a case raised (reported, not
    raised: the test names the failing case and the other cases still run)."""
    import deepspeed

    # DeepSpeed compiles a shared-memory CPU collective on first use (minutes); gloo does the same job here.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    torch.manual_seed(0)
    deepspeed.init_distributed("gloo")  # the group is already up: DeepSpeed uses it
    model, tok = load_tiny(path)
    pairs = tokenize_preferences(preference_pairs(2), tok, TrainConfig())
    batch = collate_examples(pairs, pad_id_of(tok))  # [chosen; rejected], right-padded
    ids, attn, score = batch["input_ids"], batch["attention_mask"], batch["score_mask"]
    res: dict = {}

    # --- one process: plain models ---------------------------------------------------------------------------
    plain_lp = model_logprobs(model, ids, attn, score)
    plain_fp = fingerprint(model)
    plain_bytes = model_nbytes(model)
    policy = load_tiny(path)[0]
    plain_full_ref = Synced(policy, ref_model_sync_steps=1, ref_model_mixup_alpha=ALPHA)
    plain_full_loss = train_step(policy, plain_full_ref, batch)
    plain_full_after = plain_full_ref.logprobs(ids, attn, score)
    peft_policy = add_lora(load_tiny(path)[0], r=4, seed=1)
    plain_peft_ref = Synced(peft_policy, ref_model_sync_steps=1, ref_model_mixup_alpha=ALPHA)
    plain_peft_loss = train_step(peft_policy, plain_peft_ref, batch)
    plain_peft_after = plain_peft_ref.logprobs(ids, attn, score)
    plain_peft_policy = model_logprobs(peft_policy, ids, attn, score)

    def case(name: str, fn):
        """``fn()``, recorded in ``res[name]`` (a number or flag as it is, anything else as "ok"), or its error's
        class and message (reported, not raised: the test names the failing case and the other cases still run)."""
        try:
            value = fn()
        except Exception as exc:
            res[name] = f"{type(exc).__name__}: {exc}"[:400]
            return None
        res[name] = value if isinstance(value, (bool, int, float, list)) else "ok"
        return value

    # --- ZeRO-3: a full policy -------------------------------------------------------------------------------
    policy = load_tiny(path)[0]
    engine = engine_of(policy)
    res["partitioned"] = policy.lm_head.weight.numel() == 0
    case("model_logprobs", lambda: rel_diff(model_logprobs(policy, ids, attn, score), plain_lp))
    case("fingerprint", lambda: fingerprint(policy) == plain_fp)
    case("head_outside_gather", lambda: LMHead.from_model(policy))
    frozen = case("from_policy_ref", lambda: Frozen.from_policy(policy))
    case("from_policy", lambda: rel_diff(frozen.logprobs(ids, attn, score), plain_lp))
    case("from_policy_fingerprint", lambda: frozen.fingerprint == plain_fp)
    case("from_policy_bytes", lambda: [frozen.memory_bytes, plain_bytes])
    synced = case("synced_full_ref", lambda: Synced(policy, ref_model_sync_steps=1, ref_model_mixup_alpha=ALPHA))
    case("dpo_loss", lambda: abs(train_step(policy, synced, batch, engine) - plain_full_loss))
    case("synced_full", lambda: rel_diff(synced.logprobs(ids, attn, score), plain_full_after))
    res["synced_full_changed"] = rel_diff(plain_full_after, plain_lp)  # the step did move the reference

    # --- ZeRO-3: Frozen(path) under an active config (TRL's script order) ----------------------------------
    from transformers.integrations import HfDeepSpeedConfig

    hf_config = HfDeepSpeedConfig(CONFIG)  # active while referenced
    loaded = case("frozen_path_ref", lambda: Frozen(path))
    case("frozen_path", lambda: rel_diff(loaded.logprobs(ids, attn, score), plain_lp))
    case("frozen_path_bytes", lambda: [loaded.memory_bytes, plain_bytes])
    case("frozen_path_fingerprint", lambda: loaded.fingerprint == plain_fp)
    case("frozen_offload", lambda: Frozen(path, offload_to_cpu=True))  # DeepSpeed's offload_param does that
    unprepared = load_tiny(path)[0]  # partitioned by zero.Init, and no engine gathers it
    case("unprepared_model", lambda: model_logprobs(unprepared, ids, attn, score))

    # --- ZeRO-3: a PEFT LoRA policy ------------------------------------------------------------------------
    peft_policy = add_lora(load_tiny(path)[0], r=4, seed=1)
    peft_engine = engine_of(peft_policy)
    case("adapter_disabled", lambda: rel_diff(AdapterDisabled(peft_policy).logprobs(ids, attn, score), plain_lp))
    case("adapter_disabled_fingerprint", lambda: AdapterDisabled(peft_policy).fingerprint == plain_fp)
    synced_peft = case("synced_peft_ref",
                       lambda: Synced(peft_policy, ref_model_sync_steps=1, ref_model_mixup_alpha=ALPHA))
    case("dpo_loss_peft", lambda: abs(train_step(peft_policy, synced_peft, batch, peft_engine) - plain_peft_loss))
    case("synced_peft", lambda: rel_diff(synced_peft.logprobs(ids, attn, score), plain_peft_after))
    case("peft_policy_after_step", lambda: rel_diff(model_logprobs(peft_policy, ids, attn, score), plain_peft_policy))
    res["synced_peft_changed"] = rel_diff(plain_peft_after, plain_lp)
    del hf_config  # later loads are plain again
    return res


BACKENDS: dict[str, Backend] = {"ddp": Backend(_ddp, sharded=False), "fsdp2": Backend(_fsdp2, sharded=True),
                                "zero3": Backend(None, sharded=True, cases=run_zero3)}


def run_full(backend: Backend, policy_dir: str, ref_dir: str, pairs, batch, cfg) -> dict:
    """model_logprobs, Frozen (path, from_policy), Synced (full), the DPO step and fingerprints."""
    diffs: dict[str, float] = {}
    equal: dict[str, bool] = {}
    plain, _ = load_tiny(policy_dir)
    plain.train()
    assert backend.wrap is not None
    trained, given = backend.wrap(copy.deepcopy(plain))
    trained.train()
    opt, one_opt = _optimizer(trained, cfg), _optimizer(plain, cfg)
    with torch.no_grad():
        diffs["model_logprobs"] = _diff(model_logprobs(given, *batch), model_logprobs(plain, *batch))
    one_frozen, frozen = Frozen.from_policy(plain), Frozen.from_policy(given)
    diffs["Frozen.from_policy"] = _diff(frozen.logprobs(*batch), one_frozen.logprobs(*batch))
    equal["Frozen.from_policy fingerprint"] = frozen.fingerprint == one_frozen.fingerprint
    equal["fingerprint"] = fingerprint(given) == fingerprint(plain) == fingerprint(trained)
    full_bytes = model_nbytes(plain)
    bytes_ = {"full": full_bytes, "Frozen.from_policy": frozen.memory_bytes,
              "policy": local_parameter_bytes(given)}
    if backend.sharded:
        equal["Frozen.from_policy sharded"] = frozen.memory_bytes < full_bytes
    else:
        equal["Frozen.from_policy whole"] = frozen.memory_bytes == full_bytes
    with full_parameters(given):
        equal["full_parameters"] = all(type(p) is nn.Parameter for p in given.parameters())
        diffs["full_parameters"] = max(_diff(p, q) for p, q in zip(given.parameters(), plain.parameters(),
                                                                    strict=True))

    ref_path, one_ref_path = Frozen(ref_dir, shard_like=given), Frozen(ref_dir)
    diffs["Frozen(path, shard_like=policy)"] = _diff(ref_path.logprobs(*batch), one_ref_path.logprobs(*batch))
    equal["Frozen(path) fingerprint"] = ref_path.fingerprint == one_ref_path.fingerprint
    bytes_["Frozen(path, shard_like=policy)"] = ref_path.memory_bytes
    synced, one_synced = Synced(given, ref_model_sync_steps=1), Synced(plain, ref_model_sync_steps=1)
    loss = _step(trained, opt, ref_path, pairs, cfg)
    one_loss = _step(plain, one_opt, one_ref_path, pairs, cfg)
    diffs["DPO step-1 loss (Frozen path)"] = abs(loss - one_loss)
    synced.on_step(1, given)
    one_synced.on_step(1, plain)
    diffs["Synced full after a step"] = _diff(synced.logprobs(*batch), one_synced.logprobs(*batch))
    equal["Synced full fingerprint"] = synced.fingerprint == one_synced.fingerprint
    with torch.no_grad():
        diffs["policy after a step"] = _diff(model_logprobs(given, *batch), model_logprobs(plain, *batch))
    # Frozen.from_policy as the DPO reference: the loss of a second step from the stepped policies
    loss2 = _step(trained, opt, frozen, pairs, cfg)
    one_loss2 = _step(plain, one_opt, one_frozen, pairs, cfg)
    diffs["DPO step-2 loss (Frozen.from_policy)"] = abs(loss2 - one_loss2)
    bytes_["Synced full"] = synced.memory_bytes
    return {"diffs": diffs, "equal": equal, "bytes": bytes_}


def run_peft(backend: Backend, policy_dir: str, pairs, batch, cfg) -> dict:
    """AdapterDisabled and Synced (PEFT) with a real LoRA policy (head included), the DPO step."""
    diffs: dict[str, float] = {}
    equal: dict[str, bool] = {}
    base, _ = load_tiny(policy_dir)
    base_fingerprint = fingerprint(base)  # before PEFT wraps its layers in place
    plain = _lora(base)
    plain.train()
    assert backend.wrap is not None
    trained, given = backend.wrap(copy.deepcopy(plain))
    trained.train()
    opt, one_opt = _optimizer(trained, cfg), _optimizer(plain, cfg)
    off, one_off = AdapterDisabled(given), AdapterDisabled(plain)
    diffs["AdapterDisabled"] = _diff(off.logprobs(*batch), one_off.logprobs(*batch))
    equal["AdapterDisabled fingerprint"] = off.fingerprint == one_off.fingerprint == base_fingerprint
    with torch.no_grad():
        diffs["model_logprobs PEFT"] = _diff(model_logprobs(given, *batch), model_logprobs(plain, *batch))
    synced, one_synced = Synced(given, ref_model_sync_steps=1), Synced(plain, ref_model_sync_steps=1)
    diffs["Synced PEFT before a step"] = _diff(synced.logprobs(*batch), one_synced.logprobs(*batch))
    loss = _step(trained, opt, off, pairs, cfg)
    one_loss = _step(plain, one_opt, one_off, pairs, cfg)
    diffs["DPO step-1 loss (AdapterDisabled)"] = abs(loss - one_loss)
    synced.on_step(1, given)
    one_synced.on_step(1, plain)
    diffs["Synced PEFT after a step"] = _diff(synced.logprobs(*batch), one_synced.logprobs(*batch))
    equal["Synced PEFT fingerprint"] = synced.fingerprint == one_synced.fingerprint
    return {"diffs": diffs, "equal": equal, "bytes": {"AdapterDisabled": off.memory_bytes,
                                                      "Synced PEFT": synced.memory_bytes}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("policy_dir")
    parser.add_argument("ref_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--backends", default="ddp,fsdp2")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    tok = load_tokenizer(args.policy_dir)
    cfg = TrainConfig(batch_size=4, learning_rate=1e-2, max_length=64, progress=False)
    pairs = tokenize_preferences(preference_pairs(4, seed=3), tok, cfg)
    batch_dict = collate_examples(pairs, tok.pad_token_id)
    batch = (batch_dict["input_ids"], batch_dict["attention_mask"], batch_dict["score_mask"])
    with open(os.path.join(args.out_dir, f"rank{dist.get_rank()}.jsonl"), "w") as out:
        for name in args.backends.split(","):
            backend = BACKENDS[name]
            if backend.cases is not None:
                out.write(json.dumps({"rank": dist.get_rank(), "backend": name,
                                      name: backend.cases(args.policy_dir)}) + "\n")
                continue
            for part in (run_full(backend, args.policy_dir, args.ref_dir, pairs, batch, cfg),
                         run_peft(backend, args.policy_dir, pairs, batch, cfg)):
                out.write(json.dumps({"rank": dist.get_rank(), "backend": name, **part}) + "\n")
                out.flush()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
