"""``refmodel.models.zero3`` in one process: the inference config made from a training config (TRL's
``prepare_deepspeed`` rules), the active config, and plain models passing through untouched. The partitioned paths
run on 2 processes in ``tests/reference/test_distributed_strategies.py`` (its zero3 backend, in the one torchrun launch)."""

from __future__ import annotations

import gc

import pytest
import torch

from refmodel.errors import ConfigError
from refmodel.logprobs.lm_head import full_shape, is_partitioned
from refmodel.models import sharding, zero3
from refmodel.models.quantize import model_nbytes

TRAINING = {
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
    "scheduler": {"type": "WarmupLR"},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"},
                          "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": 7},
}


def test_inference_config_drops_training_blocks_and_unresolved_values():
    cfg = zero3.inference_config(TRAINING, hidden_size=64)
    assert "optimizer" not in cfg and "scheduler" not in cfg
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and "offload_optimizer" not in zero
    assert zero["offload_param"] == {"device": "cpu"}  # the policy's parameter offload applies to the reference
    # TRL's sizes fill what was unset or "auto"; a value the user set stays.
    assert zero["reduce_bucket_size"] == 64 * 64 and zero["stage3_param_persistence_threshold"] == 640
    assert zero["stage3_prefetch_bucket_size"] == 7
    assert "auto" not in repr(cfg) and cfg["bf16"] == {}
    assert cfg["train_micro_batch_size_per_gpu"] == 1  # DeepSpeed asks for a batch size even for inference
    assert TRAINING["zero_optimization"]["stage"] == 2 and "optimizer" in TRAINING  # the input is not changed


def test_inference_config_of_nothing_is_bare_stage_3():
    assert zero3.inference_config(None) == {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
    kept = zero3.inference_config({"train_batch_size": 8, "zero_optimization": {"stage": 3}})
    assert kept == {"train_batch_size": 8, "zero_optimization": {"stage": 3}}


def test_active_config_is_transformers_hf_deepspeed_config_while_it_lives():
    pytest.importorskip("accelerate")
    # transformers 4.x registers the config before checking for DeepSpeed: without it the half-built config
    # stays registered (the traceback holds it) and every later from_pretrained in the session fails
    pytest.importorskip("deepspeed")
    from transformers.integrations import HfDeepSpeedConfig

    assert zero3.active_config() is None
    holder = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    try:
        assert zero3.active_config()["zero_optimization"]["stage"] == 3
    finally:
        del holder
        gc.collect()
    assert zero3.active_config() is None  # transformers holds it by weak reference: later loads are plain again


def test_plain_models_pass_through(tiny):
    model, _ = tiny
    assert sharding.sharding_kind(model) == "none" and not zero3.is_zero3(model) and not zero3.is_prepared(model)
    assert not any(is_partitioned(p) for p in model.parameters())
    assert full_shape(model.lm_head.weight) == model.lm_head.weight.shape
    with zero3.full_parameters(model), sharding.full_parameters(model, writable=True):
        pass  # nothing to gather: no DeepSpeed needed
    state = zero3.full_state_dict(model)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [n for n, _ in zero3.full_tensors(model)] == sorted(model.state_dict())
    assert sharding.local_parameter_bytes(model) == model_nbytes(model)


def test_partitioned_copy_refuses_a_model_without_a_hugging_face_class():
    with pytest.raises(ConfigError, match="not a Hugging Face model.*Frozen\\(path\\)"):
        zero3.partitioned_copy(torch.nn.Linear(3, 2))
