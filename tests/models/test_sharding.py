"""``models.sharding`` in one process: a 1-rank gloo group, FSDP2 on it (shards of the whole), DDP, the errors.

The 2-process checks (half the bytes per rank, gathers across ranks, every strategy against one process)
are in ``tests/reference/test_distributed_strategies.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from refmodel.errors import ConfigError
from refmodel.logprobs.model import model_logprobs, run_in_forward, wrapper_chain
from refmodel.models.fingerprint import fingerprint
from refmodel.models.quantize import model_nbytes
from refmodel.models.sharding import (
    full_parameters,
    full_state_dict,
    is_dtensor,
    local_parameter_bytes,
    sharded_copy,
    sharding_kind,
)
from refmodel.reference import Frozen
from refmodel.testing import load_tiny

# torch 2.6 (the floor) runs FSDP2 forwards on CUDA only: its all-gather calls Stream.record_event, which
# torch.cpu.Stream gained in 2.7. These tests shard on CPU, so they need 2.7 (the lowest-versions job skips them).
needs_cpu_fsdp2 = pytest.mark.skipif(tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 7),
                                     reason="an FSDP2 forward on CPU needs torch>=2.7 (torch.cpu.Stream.record_event)")


@pytest.fixture(scope="module")
def group(one_rank_group):
    """The 1-rank gloo group of tests/conftest.py."""


def _fsdp2(model: nn.Module) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _ids(n: int = 3, t: int = 11) -> torch.Tensor:
    return torch.randint(4, 40, (n, t), generator=torch.Generator().manual_seed(5))


def test_sharding_kind_and_bad_layouts(tiny_model_dirs, group):
    plain, _ = load_tiny(tiny_model_dirs["llama"])
    assert sharding_kind(plain) == "none"
    assert sharding_kind(nn.parallel.DistributedDataParallel(copy.deepcopy(plain))) == "none"
    assert sharding_kind(_fsdp2(copy.deepcopy(plain))) == "fsdp2"
    marked = copy.deepcopy(plain)
    marked.lm_head.weight.ds_id = 7  # DeepSpeed ZeRO-3 marks each partitioned parameter; no import needed
    assert sharding_kind(marked) == "zero3"

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    tp = nn.Linear(4, 4)  # DTensor parameters without fully_shard: tensor parallel, not supported
    tp.weight = nn.Parameter(distribute_tensor(tp.weight.detach(), init_device_mesh("cpu", (1,)), [Shard(0)]))
    with pytest.raises(ConfigError, match="DTensor parameters but no fully_shard"):
        sharding_kind(tp)
    with pytest.raises(ConfigError, match="DTensor parameters"):
        Frozen(tp)


def test_fsdp1_is_refused_with_the_way_out(tiny_model_dirs, group):
    from torch.distributed.fsdp import FullyShardedDataParallel

    plain, _ = load_tiny(tiny_model_dirs["llama"])
    try:
        wrapped = FullyShardedDataParallel(plain, device_id=torch.device("cpu"))
    except (RuntimeError, ValueError, AssertionError) as err:  # an FSDP1 build that refuses the CPU
        pytest.skip(f"FSDP1 does not wrap on this CPU build: {err}")
    with pytest.raises(ConfigError, match="FSDP1.*fully_shard"):
        sharding_kind(wrapped)
    with pytest.raises(ConfigError, match="FSDP1"):
        fingerprint(wrapped)


@needs_cpu_fsdp2
def test_model_logprobs_of_an_fsdp2_model_with_gradients(tiny_model_dirs, group):
    """Before: the backbone and lm_head.weight were used behind the root's back (mixed Tensor and DTensor)."""
    plain, _ = load_tiny(tiny_model_dirs["llama"])
    sharded = _fsdp2(copy.deepcopy(plain))
    ids = _ids()
    expected = model_logprobs(plain, ids)
    out = model_logprobs(sharded, ids)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    expected.sum().backward()
    out.sum().backward()
    for (name, p), q in zip(sharded.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, atol=1e-6, rtol=1e-5, msg=name)


@needs_cpu_fsdp2
def test_full_parameters_state_dict_fingerprint_and_bytes(tiny_model_dirs, group):
    plain, _ = load_tiny(tiny_model_dirs["llama"])
    sharded = _fsdp2(copy.deepcopy(plain))
    assert all(is_dtensor(p) for p in sharded.parameters())
    with full_parameters(sharded) as inside:
        assert inside is sharded
        assert not any(is_dtensor(p) for p in sharded.parameters())
        for p, q in zip(sharded.parameters(), plain.parameters(), strict=True):
            assert torch.equal(p, q)
    assert all(is_dtensor(p) for p in sharded.parameters())  # sharded again, as it was
    with full_parameters(sharded, writable=True), torch.no_grad():
        sharded.lm_head.weight.mul_(2.0)
    torch.testing.assert_close(sharded.lm_head.weight.full_tensor(), 2.0 * plain.lm_head.weight, atol=0, rtol=0)
    with full_parameters(sharded), torch.no_grad():  # read-only: a write goes with the gathered copy
        sharded.lm_head.weight.mul_(0.5)
    with torch.no_grad():
        sharded.lm_head.weight.to_local().mul_(0.5)
    state = full_state_dict(sharded)
    assert state.keys() == plain.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())
    assert fingerprint(sharded) == fingerprint(plain) == fingerprint(nn.parallel.DistributedDataParallel(plain))
    assert local_parameter_bytes(sharded) == local_parameter_bytes(plain) == model_nbytes(plain)  # 1 rank: all
    with full_parameters(plain):  # a plain model: nothing to do
        pass


@needs_cpu_fsdp2
def test_frozen_from_an_fsdp2_policy_is_a_sharded_copy(tiny_model_dirs, group):
    """Before: ``FSDP does not support deepcopy``."""
    plain, _ = load_tiny(tiny_model_dirs["llama"])
    policy = _fsdp2(copy.deepcopy(plain))
    ids = _ids()
    frozen = Frozen.from_policy(policy)
    assert sharding_kind(frozen.model) == "fsdp2" and frozen.model is not policy
    assert frozen.fingerprint == fingerprint(plain)
    torch.testing.assert_close(frozen.logprobs(ids), model_logprobs(plain, ids), atol=1e-6, rtol=0)
    assert all(is_dtensor(p) for p in frozen.model.parameters())  # its root reshards after the forward too
    assert frozen.memory_bytes == local_parameter_bytes(frozen.model)
    with torch.no_grad():  # a copy: the policy moving leaves it alone
        next(policy.parameters()).to_local().add_(1.0)
    torch.testing.assert_close(frozen.logprobs(ids), model_logprobs(plain, ids), atol=1e-6, rtol=0)
    loaded = Frozen(tiny_model_dirs["llama"], shard_like=policy)  # a folder, sharded like the policy
    assert sharding_kind(loaded.model) == "fsdp2" and loaded.fingerprint == fingerprint(plain)
    torch.testing.assert_close(loaded.logprobs(ids), model_logprobs(plain, ids), atol=1e-6, rtol=0)
    assert sharding_kind(Frozen(tiny_model_dirs["llama"], shard_like=plain).model) == "none"
    half = Frozen.from_policy(policy, dtype="bfloat16")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    with pytest.raises(ConfigError, match="sharded model.*quantize"):
        Frozen(sharded_copy(policy), quantize="int8")
    with pytest.raises(ConfigError, match="sharded model.*offload_to_cpu"):
        Frozen(sharded_copy(policy), offload_to_cpu=True)
    with pytest.raises(ConfigError, match="needs an FSDP2"):
        sharded_copy(plain)


@needs_cpu_fsdp2
def test_a_reference_built_before_the_policy_was_sharded_shards_like_it_later(tiny_model_dirs, group):
    """What the TRL trainers do when training begins (the policy is sharded by accelerate after ``reference=``
    was built): before, such a reference stayed a whole copy on every rank."""
    from refmodel.reference import Synced

    plain, _ = load_tiny(tiny_model_dirs["llama"])
    ids = _ids()
    frozen = Frozen(tiny_model_dirs["llama"])
    synced = Synced(copy.deepcopy(plain), ref_model_sync_steps=1)
    offloaded = Frozen(tiny_model_dirs["llama"], offload_to_cpu=True)
    assert frozen.shard_like(plain) is False and sharding_kind(frozen.model) == "none"  # a plain policy: as is
    policy = _fsdp2(copy.deepcopy(plain))
    assert frozen.shard_like(policy) is True and frozen.sharded
    assert sharding_kind(frozen.model) == "fsdp2" and frozen.fingerprint == fingerprint(plain)
    torch.testing.assert_close(frozen.logprobs(ids), model_logprobs(plain, ids), atol=1e-6, rtol=0)
    assert frozen.shard_like(policy) is False  # once
    assert synced.shard_like(policy) is True and sharding_kind(synced.frozen.model) == "fsdp2"
    torch.testing.assert_close(synced.logprobs(ids), model_logprobs(plain, ids), atol=1e-6, rtol=0)
    assert offloaded.shard_like(policy) is False and sharding_kind(offloaded.model) == "none"


def test_run_in_forward_runs_hooks_and_restores_forward(tiny_model_dirs):
    plain, _ = load_tiny(tiny_model_dirs["llama"])
    calls = []
    plain.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    plain.register_forward_hook(lambda m, args, out: calls.append("post"))
    own = plain.forward
    plain.forward = own  # an instance forward (accelerate sets one) must come back as it was
    assert run_in_forward(wrapper_chain(plain), lambda: calls.append("fn") or 3) == 3
    assert calls == ["pre", "fn", "post"] and plain.__dict__["forward"] is own
    del plain.forward
    run_in_forward([plain], lambda: None)
    assert "forward" not in plain.__dict__
    with pytest.raises(ValueError, match="boom"):
        run_in_forward([plain], lambda: (_ for _ in ()).throw(ValueError("boom")))
    assert "forward" not in plain.__dict__
