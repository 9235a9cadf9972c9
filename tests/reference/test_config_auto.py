"""``ReferenceConfig`` refuses impossible combinations at construction; ``auto`` follows its rules and says so."""

from __future__ import annotations

import copy
import logging

import pytest

from refmodel.errors import ConfigError
from refmodel.reference import AdapterDisabled, Frozen, ReferenceConfig, ReferenceFree, Synced, auto
from refmodel.reference.base import module_bytes
from refmodel.testing.lora import lora_policy


@pytest.mark.parametrize("kwargs, advice", [
    (dict(sync_ref_model=True, precompute_ref_log_probs=True, load_reference_logprobs="s"), "use one or the other"),
    (dict(sync_ref_model=True, load_reference_logprobs="s"), "go stale"),
    (dict(reference_free=True, sync_ref_model=True), "reference_free=True means no reference.*sync_ref_model"),
    (dict(reference_free=True, ref_model_path="m"), "drop them, or set reference_free=False"),
    (dict(ref_model_mixup_alpha=0.0), "in \\(0, 1\\]"),
    (dict(ref_model_mixup_alpha=1.2), "1 = hard copy"),
    (dict(ref_model_sync_steps=0), "integer >= 1"),
    (dict(ref_model_sync_steps=2.5), "integer >= 1"),
    (dict(precompute_ref_log_probs=True), "load_reference_logprobs=PATH.*refmodel\\s+precompute"),
    (dict(cache_reference_logprobs=True), "load_reference_logprobs=PATH"),
    (dict(sync_ref_model=True, remote_url="http://127.0.0.1:1"), "cannot be synced"),
    (dict(sync_ref_model=True, ref_model_path="m"), "starts the reference from the policy"),
    (dict(sync_ref_model=True, quantize="int8"), "fixed Frozen reference"),
    (dict(quantize="fp3"), "unknown quantization mode 'fp3'"),
    (dict(dtype="float8"), "dtype 'float8' is not supported"),
    (dict(temperature=0), "temperature must be a finite number > 0"),
    (dict(remote_model="tiny"), "need remote_url"),
    (dict(max_local_bytes=10), "needs\\s+remote_url"),
    (dict(max_rank=4), "set sync_ref_model=True or drop max_rank"),
])
def test_config_refuses_wrong_combinations(kwargs, advice):
    with pytest.raises(ConfigError, match=advice):
        ReferenceConfig(**kwargs)


def test_config_accepts_the_known_names():
    cfg = ReferenceConfig(sync_ref_model=True, ref_model_mixup_alpha=0.9, ref_model_sync_steps=64,
                          use_fused_linear_logprobs=False, cast_logprobs_to_fp32=False)
    assert cfg.ref_model_mixup_alpha == 0.9 and cfg.sync_ref_model
    with pytest.raises(AttributeError):
        cfg.sync_ref_model = False  # frozen


def _choose(caplog, policy, cfg=None):
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="refmodel"):
        ref = auto(policy, cfg) if cfg is not None else auto(policy)
    lines = [r for r in caplog.records if r.name.startswith("refmodel") and r.levelno >= logging.INFO]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelno == logging.INFO
    return ref, lines[0].getMessage()


def test_auto_follows_the_rules(caplog, tiny_model_dirs):
    from refmodel.testing import load_tiny

    model, _ = load_tiny(tiny_model_dirs["llama"])
    policy = copy.deepcopy(model)
    ref, line = _choose(caplog, policy)
    assert isinstance(ref, Frozen) and ref.model is not policy
    assert "Frozen, because default: a frozen copy of the policy" in line and str(ref.memory_bytes) in line

    ref, line = _choose(caplog, policy, ReferenceConfig(reference_free=True))
    assert isinstance(ref, ReferenceFree) and "reference_free=True" in line

    ref, line = _choose(caplog, policy, ReferenceConfig(sync_ref_model=True, ref_model_sync_steps=8))
    assert isinstance(ref, Synced) and ref.frozen is not None and "TR-DPO: every 8 steps" in line

    peft_policy = lora_policy(model)
    ref, line = _choose(caplog, peft_policy)
    assert isinstance(ref, AdapterDisabled) and "PEFT model" in line and "extra memory 0 bytes" in line

    ref, line = _choose(caplog, peft_policy, ReferenceConfig(sync_ref_model=True, ref_model_mixup_alpha=1.0))
    assert isinstance(ref, Synced) and ref.lora is not None and "LoRA reference adapter" in line

    ref, line = _choose(caplog, policy, ReferenceConfig(ref_model_path=str(tiny_model_dirs["gpt2"])))
    assert isinstance(ref, Frozen) and type(ref.model).__name__.startswith("GPT2") and "ref_model_path" in line

    # Hybrid: a service is configured but the model fits the local budget, so it stays local.
    size = module_bytes(policy)
    cfg = ReferenceConfig(remote_url="http://127.0.0.1:9", remote_model="tiny", max_local_bytes=size)
    ref, line = _choose(caplog, policy, cfg)
    assert isinstance(ref, Frozen) and f"({size} <= {size} bytes)" in line and "stays local" in line




def test_auto_checks_a_store_against_the_policy_without_copying_it(tiny_model_dirs, tmp_path, monkeypatch, caplog):
    """The store's fingerprint is compared with the frozen copy the rules would build; that copy is only
    hashed, never kept (it holds weights, so it is no fallback): the policy is hashed in place."""
    import torch

    from refmodel.errors import FingerprintMismatch
    from refmodel.reference import Precomputed
    from refmodel.store import LogprobStore
    from refmodel.testing import load_tiny

    policy, _ = load_tiny(tiny_model_dirs["llama"])
    other, _ = load_tiny(tiny_model_dirs["gpt2"])
    for name, model, temperature in (("match", policy, 0.7), ("other", other, 0.7)):
        LogprobStore.create(tmp_path / name, Frozen.from_policy(model, temperature=temperature).fingerprint).close()
    deep_copies = []
    real_deepcopy = copy.deepcopy

    def counting_deepcopy(x, memo=None, _nil=[]):  # noqa: B006 (copy.deepcopy's own signature)
        if x is policy:
            deep_copies.append(x)
        return real_deepcopy(x, memo, _nil)

    monkeypatch.setattr(copy, "deepcopy", counting_deepcopy)
    ref, line = _choose(caplog, policy, ReferenceConfig(load_reference_logprobs=str(tmp_path / "match"),
                                                        temperature=0.7))
    assert isinstance(ref, Precomputed) and ref.fallback is None and "misses raise" in line
    with pytest.raises(FingerprintMismatch, match="precompute the store again"):
        auto(policy, ReferenceConfig(load_reference_logprobs=str(tmp_path / "other"), temperature=0.7))
    with pytest.raises(FingerprintMismatch):  # the temperature is part of the identity
        auto(policy, ReferenceConfig(load_reference_logprobs=str(tmp_path / "match")))
    assert deep_copies == []
    # a cast copy has other bytes, so it is built (and dropped) to be hashed: still the same rule
    with pytest.raises(FingerprintMismatch):
        auto(policy, ReferenceConfig(load_reference_logprobs=str(tmp_path / "match"), temperature=0.7,
                                     dtype="bfloat16"))
    assert len(deep_copies) == 1 and all(p.dtype == torch.float32 for p in policy.parameters())
