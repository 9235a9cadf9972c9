"""Every model-based reference strategy under DeepSpeed ZeRO-3, run by ``test_zero3_strategies.py`` through
``torchrun --nproc_per_node 2`` (gloo, CPU); one launch for all cases, since importing DeepSpeed is slow.

Each rank first computes the one-process values on plain models (no DeepSpeed), then the same under ZeRO-3, and
records the largest absolute difference per case; rank 0 prints ``ZERO3_RESULT <json>`` with every rank's
figures. ``argv[1]``: a tiny llama folder (``refmodel.testing.make_tiny_model``).
"""

from __future__ import annotations

import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from refmodel.data import collate_examples, pad_id_of
from refmodel.logprobs.lm_head import LMHead
from refmodel.logprobs.model import model_logprobs
from refmodel.losses import preference
from refmodel.models.fingerprint import fingerprint
from refmodel.models.quantize import model_nbytes
from refmodel.recipes.train import TrainConfig, add_lora, pair_logps, tokenize_preferences
from refmodel.reference import AdapterDisabled, Frozen, Synced
from refmodel.testing import load_tiny, preference_pairs

# DeepSpeed compiles a shared-memory CPU collective on first use (minutes); gloo does the same job here.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

LR, ALPHA, BETA = 0.1, 0.6, 0.1
CONFIG = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "zero_allow_untested_optimizer": True}


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
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
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, config=CONFIG, optimizer=torch.optim.SGD(params, lr=LR),
                                      model_parameters=params)
    return engine


def main(path: str) -> None:
    torch.manual_seed(0)
    deepspeed.init_distributed("gloo")
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
    case("model_logprobs", lambda: diff(model_logprobs(policy, ids, attn, score), plain_lp))
    case("fingerprint", lambda: fingerprint(policy) == plain_fp)
    case("head_outside_gather", lambda: LMHead.from_model(policy))
    frozen = case("from_policy_ref", lambda: Frozen.from_policy(policy))
    case("from_policy", lambda: diff(frozen.logprobs(ids, attn, score), plain_lp))
    case("from_policy_fingerprint", lambda: frozen.fingerprint == plain_fp)
    case("from_policy_bytes", lambda: [frozen.memory_bytes, plain_bytes])
    synced = case("synced_full_ref", lambda: Synced(policy, ref_model_sync_steps=1, ref_model_mixup_alpha=ALPHA))
    case("dpo_loss", lambda: abs(train_step(policy, synced, batch, engine) - plain_full_loss))
    case("synced_full", lambda: diff(synced.logprobs(ids, attn, score), plain_full_after))
    res["synced_full_changed"] = diff(plain_full_after, plain_lp)  # the step did move the reference

    # --- ZeRO-3: Frozen(path) under an active config (TRL's script order) ----------------------------------
    from transformers.integrations import HfDeepSpeedConfig

    hf_config = HfDeepSpeedConfig(CONFIG)  # noqa: F841  (active while referenced)
    loaded = case("frozen_path_ref", lambda: Frozen(path))
    case("frozen_path", lambda: diff(loaded.logprobs(ids, attn, score), plain_lp))
    case("frozen_path_bytes", lambda: [loaded.memory_bytes, plain_bytes])
    case("frozen_path_fingerprint", lambda: loaded.fingerprint == plain_fp)
    case("frozen_offload", lambda: Frozen(path, offload_to_cpu=True))  # DeepSpeed's offload_param does that
    unprepared = load_tiny(path)[0]  # partitioned by zero.Init, and no engine gathers it
    case("unprepared_model", lambda: model_logprobs(unprepared, ids, attn, score))

    # --- ZeRO-3: a PEFT LoRA policy ------------------------------------------------------------------------
    peft_policy = add_lora(load_tiny(path)[0], r=4, seed=1)
    peft_engine = engine_of(peft_policy)
    case("adapter_disabled", lambda: diff(AdapterDisabled(peft_policy).logprobs(ids, attn, score), plain_lp))
    case("adapter_disabled_fingerprint", lambda: AdapterDisabled(peft_policy).fingerprint == plain_fp)
    synced_peft = case("synced_peft_ref",
                       lambda: Synced(peft_policy, ref_model_sync_steps=1, ref_model_mixup_alpha=ALPHA))
    case("dpo_loss_peft", lambda: abs(train_step(peft_policy, synced_peft, batch, peft_engine) - plain_peft_loss))
    case("synced_peft", lambda: diff(synced_peft.logprobs(ids, attn, score), plain_peft_after))
    case("peft_policy_after_step", lambda: diff(model_logprobs(peft_policy, ids, attn, score), plain_peft_policy))
    res["synced_peft_changed"] = diff(plain_peft_after, plain_lp)

    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, res)
    if dist.get_rank() == 0:
        print("ZERO3_RESULT " + json.dumps(everyone), flush=True)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
