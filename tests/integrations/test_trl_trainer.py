"""What the three trainers share (``integrations.trl._trainer``): under FSDP or ZeRO-3, TRL builds no reference model.

TRL 1.16's DPO and KTO trainers load a reference copy from the policy's ``_name_or_path`` under FSDP even
with ``precompute_ref_log_probs=True``; with ``reference=`` they must load nothing. accelerate picks FSDP
only for GPU processes, so the test runs a world of one process whose accelerate state says "GPUs"
(``PartialState.distributed_type = MULTI_GPU``, set after the config resolved its device): the trainer
then gets a real FSDP accelerator (``is_fsdp_enabled``) on CPU. The policy's ``_name_or_path`` is a folder
that does not exist, so any load of a reference model fails the test (it did before the fix, in TRL's
``create_model_from_path``). DeepSpeed ZeRO-3 runs on CPU in that world as it is (``deepspeed=`` config).
"""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("trl")

import torch
import torch.distributed as dist
import trl
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from datasets import Dataset
from trl_helpers import COMMON, GRPO_COMMON, length_reward, load, make_models, pairs, prompts, unpaired

from refmodel import Frozen
from refmodel.integrations.trl import DPOTrainer, GRPOTrainer, KTOTrainer
from refmodel.testing import free_port

pytestmark = pytest.mark.slow  # three TRL trainers built (~40 s on 2 shared cores)
FSDP = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2})
ZERO3 = dict(deepspeed={"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
                        "train_batch_size": "auto", "gradient_accumulation_steps": "auto"})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("trl_trainer"))


@pytest.fixture
def one_rank(monkeypatch):
    """A launched world of one process (torchrun's variables); accelerate's state and the group are undone after."""
    environ = dict(os.environ)
    linear = torch.nn.functional.linear
    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(name, value)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # a DeepSpeed config would make later from_pretrained calls partition (zero.Init)
    if "deepspeed" in sys.modules:
        sys.modules["deepspeed"].comm.comm.cdb = None  # DeepSpeed's handle on the group destroyed below
    # ZeRO-3's engine leaves F.linear patched (zero3_linear_wrap: `weight.t()`, which torchao's quantized
    # tensors do not implement); a training process is ZeRO-3 throughout, this test process is not
    torch.nn.functional.linear = linear
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()  # TrainingArguments sets accelerate's variables (ACCELERATE_*, FSDP_*) for the process
    os.environ.update(environ)


def under_fsdp(cfg):
    """``cfg`` (FSDP asked for), with accelerate believing this process runs on GPUs, so it grants FSDP."""
    assert cfg.device.type == "cpu"  # resolves the config's PartialState first
    PartialState().distributed_type = DistributedType.MULTI_GPU
    return cfg


def nowhere(policy, tmp_path):
    policy.config._name_or_path = str(tmp_path / "not-on-this-node")
    return policy


def test_dpo_and_kto_under_fsdp_load_no_reference_model(models, one_rank, tmp_path):
    policy_dir, ref_dir = models
    policy, tok = load(policy_dir)
    nowhere(policy, tmp_path)
    cfg = under_fsdp(trl.DPOConfig(str(tmp_path / "dpo"), **COMMON, **FSDP))
    dpo = DPOTrainer(model=policy, args=cfg, processing_class=tok, train_dataset=Dataset.from_list(pairs(8)),
                     reference=Frozen(str(ref_dir)))
    assert dpo.is_fsdp_enabled and dpo.accelerator.distributed_type == DistributedType.FSDP  # restored after init
    assert dpo.ref_model is None and isinstance(dpo.reference, Frozen)
    assert cfg.precompute_ref_log_probs is False  # the user's config, as given

    policy, tok = load(policy_dir)
    nowhere(policy, tmp_path)
    cfg = under_fsdp(trl.KTOConfig(str(tmp_path / "kto"), **COMMON, **FSDP))
    kto = KTOTrainer(model=policy, args=cfg, processing_class=tok, train_dataset=Dataset.from_list(unpaired(8)),
                     reference=Frozen(str(ref_dir)))
    assert kto.is_fsdp_enabled and kto.ref_model is None and isinstance(kto.reference, Frozen)


def test_grpo_under_fsdp_loads_no_reference_model(models, one_rank, tmp_path):
    policy_dir, ref_dir = models
    policy, tok = load(policy_dir)
    nowhere(policy, tmp_path)
    cfg = under_fsdp(trl.GRPOConfig(str(tmp_path / "grpo"), **GRPO_COMMON, **FSDP))
    grpo = GRPOTrainer(model=policy, reward_funcs=length_reward, args=cfg, processing_class=tok,
                       train_dataset=Dataset.from_list(prompts(8)), reference=Frozen(str(ref_dir), temperature=0.7))
    assert grpo.is_fsdp_enabled and grpo.beta == 0.1
    assert isinstance(grpo.reference, Frozen) and not isinstance(grpo.ref_model, torch.nn.Module)



def test_dpo_and_kto_under_zero3_load_no_reference_model(models, one_rank, tmp_path):
    pytest.importorskip("deepspeed")
    policy_dir, ref_dir = models
    for trainer, config_cls, data in ((DPOTrainer, trl.DPOConfig, pairs), (KTOTrainer, trl.KTOConfig, unpaired)):
        policy, tok = load(policy_dir)
        nowhere(policy, tmp_path)
        cfg = config_cls(str(tmp_path / trainer.__name__), **COMMON, **ZERO3)
        t = trainer(model=policy, args=cfg, processing_class=tok, train_dataset=Dataset.from_list(data(8)),
                    reference=Frozen(str(ref_dir)))
        assert t.is_deepspeed_enabled and t.accelerator.distributed_type == DistributedType.DEEPSPEED
        assert t.ref_model is None and isinstance(t.reference, Frozen)
