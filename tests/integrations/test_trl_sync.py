"""TR-DPO with PEFT inside TRL (which TRL refuses): refmodel's Synced LoRA reference follows TRL's rule."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")

import torch
import trl
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from trl.trainer.callbacks import SyncRefModelCallback
from trl_helpers import COMMON, load, make_models, pairs

from refmodel import ReferenceConfig, Synced, model_logprobs
from refmodel.integrations.trl import DPOTrainer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("sync-models"))


class FullModelTRDPO(TrainerCallback):
    """The full-model TR-DPO reference, moved by TRL's own ``SyncRefModelCallback.sync_target_model``
    towards the merged policy (base + LoRA delta) at TRL's sync steps."""

    def __init__(self, reference: torch.nn.Module):
        self.reference = reference
        self.syncs = 0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % args.ref_model_sync_steps == 0:
            merged = copy.deepcopy(model).merge_and_unload()
            SyncRefModelCallback.sync_target_model(merged, self.reference, args.ref_model_mixup_alpha)
            self.syncs += 1


def train_tr_dpo(models, tmp_path, alpha: float, reference=None, steps: int = 3):
    policy, tok = load(models[0])
    full_ref, _ = load(models[0])  # a fresh LoRA is zero: the initial reference is the base model
    full_ref.eval()
    shadow = FullModelTRDPO(full_ref)
    args = trl.DPOConfig(output_dir=str(tmp_path / "out"), sync_ref_model=True, ref_model_sync_steps=1,
                         ref_model_mixup_alpha=alpha, **{**COMMON, "max_steps": steps, "learning_rate": 2e-2})
    trainer = DPOTrainer(policy, args=args, train_dataset=Dataset.from_list(pairs(12)), processing_class=tok,
                         peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
                         callbacks=[shadow], reference=reference)
    trainer.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ids, attn, score = batch["input_ids"], batch["attention_mask"], batch["completion_mask"].bool()
    ours = trainer.reference.logprobs(ids, attn, score)
    want = model_logprobs(full_ref, ids, attn, score)
    base = model_logprobs(load(models[0])[0], ids, attn, score)
    return trainer, shadow, ours, want, base


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [1.0, 0.6], ids=["hard", "soft"])
def test_peft_tr_dpo_equals_the_full_model_rule(models, tmp_path, alpha):
    trainer, shadow, ours, want, base = train_tr_dpo(models, tmp_path, alpha)
    ref = trainer.reference
    assert isinstance(ref, Synced) and ref.lora is not None  # a LoRA adapter, not a second base model
    assert ref.syncs == shadow.syncs == 3
    assert (want - base).abs().max() > 1e-3  # the reference really moved
    assert (ours - want).abs().max() <= 1e-5  # exact: rank concatenation (soft) or a bit copy (hard)
    assert ref.lora.rank == (4 if alpha == 1.0 else 4 * 4)  # each soft sync adds the policy's rank
    assert ref.memory_bytes < sum(p.numel() * 4 for p in load(models[0])[0].parameters()) / 10


@pytest.mark.slow
def test_max_rank_bounds_the_reference_within_the_reported_error(models, tmp_path):
    trainer, _, ours, want, base = train_tr_dpo(models, tmp_path, 0.6,
                                                reference=ReferenceConfig(sync_ref_model=True, max_rank=4))
    ref = trainer.reference
    assert ref.lora.rank == 4 and 0 < ref.max_truncation_error < 1
    # truncating the reference delta moves its log-probs by a fraction of how far the reference moved
    assert (ours - want).abs().max() <= 0.25 * (want - base).abs().max()


@pytest.mark.slow
def test_a_per_epoch_synced_reference_syncs_once_per_epoch(models, tmp_path):
    """``Synced.per_epoch`` copies the policy at the end of every epoch inside TRL (the callback once had no
    epoch hook: 0 syncs after 3 epochs), and never at a step."""
    policy, tok = load(models[0])
    ref = Synced.per_epoch(policy)
    args = trl.DPOConfig(output_dir=str(tmp_path / "out"),
                         **{**COMMON, "max_steps": -1, "num_train_epochs": 3, "learning_rate": 2e-2})
    trainer = DPOTrainer(policy, args=args, train_dataset=Dataset.from_list(pairs(8)), processing_class=tok,
                         reference=ref)
    trainer.train()
    assert trainer.state.global_step == 6  # 8 pairs, 4 per step: 2 steps per epoch
    assert ref.syncs == 3
    # the last sync ran after the last step: the reference is the trained policy
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ids, attn, score = batch["input_ids"], batch["attention_mask"], batch["completion_mask"].bool()
    with torch.no_grad():
        trained = model_logprobs(trainer.model.eval(), ids, attn, score)
        initial = model_logprobs(load(models[0])[0].eval(), ids, attn, score)
    torch.testing.assert_close(ref.logprobs(ids, attn, score), trained, atol=1e-5, rtol=0)
    assert (trained - initial).abs().max() > 1e-3  # the policy did move, so the check above can fail
