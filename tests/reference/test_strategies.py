"""Every strategy gives the same log-probs for the same weights, and never changes or trains.

Tolerance 1e-5 nats: the strategies run the same fp32 kernels on the same weights; the only
differences are summation orders (a LoRA delta added as x A^T B^T instead of merged into W), which
stay around 1e-6 on these tiny models.
"""

from __future__ import annotations

import copy

import pytest
import torch
from ref_helpers import ListStore, make_batch

import refmodel
from refmodel import model_logprobs
from refmodel.errors import ConfigError, FingerprintMismatch, StoreMiss
from refmodel.reference import AdapterDisabled, Frozen, Precomputed, Reference, ReferenceFree, Synced
from refmodel.testing.lora import lora_policy, perturb_adapter

TOL = dict(atol=1e-5, rtol=0)


@pytest.fixture
def batch(tiny):
    """4 right-padded prompt+chosen rows of the built-in data; completion scored (see ref_helpers)."""
    return make_batch(tiny[1])



def _expected(model, batch):
    with torch.no_grad():
        return model_logprobs(model, *batch)


def test_every_strategy_same_logprobs(tiny_model_dirs, family, tiny, batch):
    model, _ = tiny
    want = _expected(model, batch)
    assert want.dtype == torch.float32 and want.abs().sum() > 0
    policy = lora_policy(model)
    with torch.no_grad():
        assert (model_logprobs(policy, *batch) - want).abs().max() > 1e-3  # the adapter matters
    store = ListStore(refmodel.fingerprint(model))
    store.add(batch[0], batch[1], _expected(model, (batch[0], batch[1])))
    strategies = {
        "frozen_path": Frozen(tiny_model_dirs[family], attn_implementation="eager"),
        "frozen_copy": Frozen.from_policy(model),
        "adapter_disabled": AdapterDisabled(policy),
        "synced_full": Synced(model),
        "precomputed": Precomputed(store),
    }
    for name, ref in strategies.items():
        assert isinstance(ref, Reference), name
        got = ref.logprobs(*batch)
        assert got.dtype == torch.float32 and got.shape == batch[0].shape, name
        torch.testing.assert_close(got, want, **TOL, msg=f"{family}/{name}")
        assert not got.requires_grad
    # Same weights, same fingerprint, whatever the strategy (AdapterDisabled names the base model).
    fps = {name: ref.fingerprint for name, ref in strategies.items()}
    assert set(fps.values()) == {refmodel.fingerprint(model)}, fps


def test_named_adapter_and_peft_synced_match_merged_model(family, tiny, batch):
    model, _ = tiny
    policy = lora_policy(model)
    from peft import LoraConfig

    policy.add_adapter("sft", LoraConfig(r=2, lora_alpha=3, target_modules="all-linear"))
    perturb_adapter(policy, seed=7, adapter="sft")
    policy.get_base_model().requires_grad_(False)
    for n, p in policy.named_parameters():
        p.requires_grad_(".default." in n)
    # The reference adapter, merged alone into a plain model, is what AdapterDisabled("sft") must give.
    sft_only = copy.deepcopy(policy)
    sft_only.set_adapter("sft")
    merged_sft = sft_only.merge_and_unload()
    named = AdapterDisabled(policy, adapter_name="sft")
    torch.testing.assert_close(named.logprobs(*batch), _expected(merged_sft, batch), **TOL)
    assert named.memory_bytes == sum(p.numel() * 4 for n, p in policy.named_parameters() if ".sft." in n) > 0
    assert policy.active_adapter == "default"
    # A synced PEFT reference starts as a copy of the policy adapter.
    synced = Synced(policy, ref_model_sync_steps=4)
    merged_policy = copy.deepcopy(policy).merge_and_unload()
    torch.testing.assert_close(synced.logprobs(*batch), _expected(merged_policy, batch), **TOL)


def _train_step(policy, batch, ref):
    """One real optimizer step on a DPO-style loss that uses the reference's log-probs."""
    policy.train()
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.5)
    ids, attn, score = batch
    ref_lp = ref.logprobs(ids, attn, score)
    pol_lp = model_logprobs(policy, ids, attn, score)
    loss = -torch.nn.functional.logsigmoid((pol_lp - ref_lp).sum(1)[0::2] - (pol_lp - ref_lp).sum(1)[1::2]).mean() \
        - pol_lp.sum() / score.sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return ref_lp


@pytest.mark.parametrize("kind", ["frozen", "adapter_disabled", "synced_full", "synced_lora"])
def test_reference_never_changes_and_gets_no_grad(family, tiny, batch, kind):
    model, _ = tiny
    # LoRA dropout: a reference call that left the policy in training mode would give other log-probs
    policy = lora_policy(model, lora_dropout=0.1) if kind in ("adapter_disabled", "synced_lora") \
        else copy.deepcopy(model)
    ref = {"frozen": lambda: Frozen.from_policy(policy), "adapter_disabled": lambda: AdapterDisabled(policy),
           "synced_full": lambda: Synced(policy, ref_model_sync_steps=3),
           "synced_lora": lambda: Synced(policy, ref_model_sync_steps=3)}[kind]()
    before_ref = ref.logprobs(*batch)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    with torch.no_grad():
        before_pol = model_logprobs(policy.eval(), *batch)
    ref_params = {n: p.detach().clone() for n, p in policy.named_parameters() if n not in trainable} \
        if kind in ("adapter_disabled", "synced_lora") else \
        {n: p.detach().clone() for n, p in (ref.frozen.model if kind == "synced_full" else ref.model).named_parameters()}
    for step in (1, 2):
        seen = _train_step(policy, batch, ref)
        ref.on_step(step, policy)  # no sync before step 3
        torch.testing.assert_close(seen, before_ref, atol=0, rtol=0)
    assert policy.training  # the reference call did not flip the policy to eval
    assert all(m.training for m in policy.modules())
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable
    with torch.no_grad():
        assert (model_logprobs(policy.eval(), *batch) - before_pol).abs().max() > 1e-4  # the policy did move
    torch.testing.assert_close(ref.logprobs(*batch), before_ref, atol=0, rtol=0)
    owner = policy if kind in ("adapter_disabled", "synced_lora") else \
        (ref.frozen.model if kind == "synced_full" else ref.model)
    for n, p in owner.named_parameters():
        if n in ref_params:
            assert p.grad is None and torch.equal(p, ref_params[n]), n
            if owner is not policy:
                assert not p.requires_grad, n


def test_precomputed_miss_and_fallback(tiny, batch):
    model, tok = tiny
    ids, attn, score = batch
    store = ListStore(refmodel.fingerprint(model))
    store.add(ids[:2], attn[:2], _expected(model, (ids[:2], attn[:2])))
    with pytest.raises(StoreMiss, match="refmodel precompute.*fallback="):
        Precomputed(store).logprobs(ids, attn, score)
    pre = Precomputed(store, fallback=Frozen.from_policy(model))
    torch.testing.assert_close(pre.logprobs(ids, attn, score), _expected(model, batch), **TOL)
    assert pre.misses == 2 and pre.memory_bytes > 0
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(FingerprintMismatch, match=store.fingerprint):
        Precomputed(store, fallback=Frozen(other))
    assert Precomputed(store).memory_bytes == 0 and Precomputed(store).fingerprint == store.fingerprint


def test_reference_free():
    ref = ReferenceFree()
    assert isinstance(ref, Reference) and ref.fingerprint == "reference-free" and ref.memory_bytes == 0
    with pytest.raises(ConfigError, match="ORPO, SimPO.*needs another\\s+strategy"):
        ref.logprobs(torch.zeros(1, 3, dtype=torch.long))


def test_wrong_constructions_fail_with_advice(tiny):
    model, _ = tiny
    with pytest.raises(ConfigError, match="needs a PEFT model.*Frozen.from_policy"):
        AdapterDisabled(model)
    policy = lora_policy(model)
    with pytest.raises(ConfigError, match="not loaded in the policy.*'default'"):
        AdapterDisabled(policy, adapter_name="sft")
    with pytest.raises(ConfigError, match="active \\(trained\\) adapter"):
        AdapterDisabled(policy, adapter_name="default")
    with pytest.raises(ConfigError, match="AdapterDisabled"):
        Frozen.from_policy(policy)
    with pytest.raises(ConfigError, match="unknown quantization mode 'int3'"):
        Frozen(model, quantize="int3")
    biased = lora_policy(model)  # e.g. LoraConfig(bias="all") or a user unfreezing a norm
    next(p for n, p in biased.named_parameters() if "lora_" not in n).requires_grad_(True)
    with pytest.raises(ConfigError, match="trains base parameters.*bias='none'"):
        AdapterDisabled(biased)
    frozen = Frozen.from_policy(model)
    with pytest.raises(ConfigError, match="policy object itself"):
        Frozen(model).on_step(1, model)
    assert frozen.memory_bytes > 0


def test_memory_bytes_counts_storage_once(tiny):
    model, _ = tiny
    ref = Frozen.from_policy(model)
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in ref.model.parameters()}
    buffers = sum(b.numel() * b.element_size() for b in ref.model.buffers())
    assert ref.memory_bytes == sum(unique.values()) + buffers
    assert AdapterDisabled(lora_policy(model)).memory_bytes == 0


def test_frozen_dtype_and_temperature(tiny, batch):
    model, _ = tiny
    bf16 = Frozen.from_policy(model, dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert bf16.fingerprint != Frozen.from_policy(model).fingerprint
    torch.testing.assert_close(bf16.logprobs(*batch), _expected(model, batch), atol=0.1, rtol=0)  # bf16 weights
    hot = Frozen.from_policy(model, temperature=2.0)
    with torch.no_grad():
        want = model_logprobs(model, *batch, temperature=2.0)
    torch.testing.assert_close(hot.logprobs(*batch), want, **TOL)
    assert hot.fingerprint == refmodel.fingerprint(model, temperature=2.0)


@pytest.mark.gpu
def test_offload_to_cpu_moves_for_the_call_only(tiny):
    model, tok = tiny
    ids, attn, score = make_batch(tok)
    ref = Frozen.from_policy(model, offload_to_cpu=True)
    got = ref.logprobs(ids.cuda(), attn.cuda(), score.cuda())
    assert got.device.type == "cuda" and next(ref.model.parameters()).device.type == "cpu"
    torch.testing.assert_close(got.cpu(), _expected(model, (ids, attn, score)), atol=1e-4, rtol=0)
