"""Scoring once per rollout batch: micro-batch invariance, every Reference strategy gives the same
step-1 loss, a quantized one reports its drift, the exact KL against a float64 full softmax."""

from __future__ import annotations

import copy

import pytest
import torch
from rl_helpers import eos_likely, make_rollouts

from refmodel.errors import ConfigError
from refmodel.reference import AdapterDisabled, Frozen, Synced
from refmodel.rl import (
    exact_kl,
    group_advantages,
    needs_old_logprobs,
    policy_logprobs,
    policy_loss_fn,
    reference_drift,
    reference_logprobs,
    score_rollouts,
)
from refmodel.testing import ServeProcess, load_tiny
from refmodel.testing.lora import lora_policy, perturb_adapter


@pytest.fixture(scope="module")
def base_tok(tiny_model_dirs):
    model, tok = load_tiny(tiny_model_dirs["llama"])
    return eos_likely(model), tok


@pytest.fixture(scope="module")
def setup(base_tok):
    base, tok = base_tok
    policy = lora_policy(base)
    rollouts = make_rollouts(policy, tok, n_prompts=4, generations=4, max_new_tokens=5)
    return base, tok, policy, rollouts


def test_micro_batch_1_and_8_agree(setup):
    base, _, policy, ro = setup
    ref = AdapterDisabled(policy)
    r1, calls1 = reference_logprobs(ref, ro, micro_batch_size=1)
    r8, calls8 = reference_logprobs(ref, ro, micro_batch_size=8)
    assert (calls1, calls8) == (16, 2)
    assert (r1 - r8).abs().max() <= 1e-5
    o1, _ = policy_logprobs(policy, ro, micro_batch_size=1)
    o8, _ = policy_logprobs(policy, ro, micro_batch_size=8)
    assert (o1 - o8).abs().max() <= 1e-5
    assert (r1[~ro.completion_mask] == 0).all() and (r1[ro.completion_mask] < 0).all()


def test_old_pass_only_when_off_policy(setup):
    _, _, policy, ro = setup
    assert not needs_old_logprobs(1) and needs_old_logprobs(2) and needs_old_logprobs(1, importance_correction=True)
    on = score_rollouts(policy, None, ro, need_old=False, beta=0.0)
    assert on.old_logprobs is None and on.ref_logprobs is None and on.ref_calls == 0
    with pytest.raises(ConfigError, match="no reference"):
        score_rollouts(policy, None, ro, need_old=False, beta=0.1)


def test_temperature_mismatch_is_refused(setup):
    _, tok, policy, _ = setup
    hot = make_rollouts(policy, tok, temperature=0.7)
    with pytest.raises(ConfigError, match="temperature=0.7"):
        reference_logprobs(AdapterDisabled(policy), hot)
    reference_logprobs(AdapterDisabled(policy, temperature=0.7), hot)


def _step1_loss(policy, ref_logprobs, ro, beta=0.1):
    rewards = torch.arange(ro.batch_size, dtype=torch.float32) % 3
    adv = group_advantages(rewards, ro.num_generations)
    lp = policy_logprobs(policy, ro)[0]
    return float(policy_loss_fn(lp, None, adv, ro.completion_mask, ref_logprobs=ref_logprobs, beta=beta).loss)


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tmp_path_factory):
    srv = ServeProcess(["--model", f"tiny={tiny_model_dirs['llama']}"], tmp_path_factory.mktemp("srv") / "server.log")
    yield srv
    srv.stop()


def test_every_strategy_gives_the_same_step1_loss(tiny_model_dirs, server, tmp_path):
    """Base = the saved tiny llama; every strategy's reference is that base; the policy differs from it."""
    from refmodel.reference import Remote

    base, tok = load_tiny(tiny_model_dirs["llama"])
    policy = lora_policy(base, perturb=False)
    synced = Synced(policy, ref_model_sync_steps=1000)  # its adapter copies B = 0: the base, until a sync
    policy.add_adapter("ref0", copy.deepcopy(policy.peft_config["default"]))  # B = 0 too: a named reference = base
    policy.set_adapter("default")
    for n, p in policy.named_parameters():
        if ".ref0." in n:
            p.requires_grad_(False)
    perturb_adapter(policy)  # the policy moves away; the references stay at the base
    ro = make_rollouts(policy, tok, n_prompts=4, generations=4, max_new_tokens=5)
    strategies = {
        "frozen": Frozen(copy.deepcopy(base)),
        "frozen offloaded": Frozen(copy.deepcopy(base), offload_to_cpu=True),
        "adapter disabled": AdapterDisabled(policy),
        "named adapter": AdapterDisabled(policy, adapter_name="ref0"),
        "synced (PEFT)": synced,
        "remote": Remote(server.url, "tiny"),
    }
    losses = {name: _step1_loss(policy, reference_logprobs(ref, ro)[0], ro) for name, ref in strategies.items()}
    first = losses["frozen"]
    assert abs(first - _step1_loss(policy, None, ro, beta=0.0)) > 1e-3  # the KL term is really there
    for name, loss in losses.items():
        assert abs(loss - first) <= 1e-5, (name, losses)
    quant = Frozen(copy.deepcopy(base), quantize="int8")
    drift = reference_drift(quant, strategies["frozen"], ro)
    q_loss = _step1_loss(policy, reference_logprobs(quant, ro)[0], ro)
    assert 0 < drift["max_abs"] < 0.5 and drift["mean_abs"] <= drift["max_abs"]
    assert abs(q_loss - first) < 0.05  # int8's drift moves the loss a little, and reference_drift says by how much
    strategies["remote"].close()


def _naive_kl(p_model, q_model, ro, temperature):
    """Float64 full-softmax KL(p || q) per completion token, from the models' own logits (eval: no dropout)."""
    p_model.eval()
    q_model.eval()
    with torch.no_grad():
        kw = dict(input_ids=ro.input_ids, attention_mask=ro.attention_mask.long(),
                  position_ids=(ro.attention_mask.long().cumsum(1) - 1).clamp(min=0))
        lp = torch.log_softmax(p_model(**kw).logits.double()[:, :-1] / temperature, -1)
        lq = torch.log_softmax(q_model(**kw).logits.double()[:, :-1] / temperature, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    m = ro.completion_mask[:, 1:]
    return float(kl[m].mean())


@pytest.mark.parametrize("fam", ["llama", "gpt2", "gemma2"])
def test_exact_kl_matches_a_float64_full_softmax(tiny_model_dirs, fam):
    base, tok = load_tiny(tiny_model_dirs[fam])
    policy = lora_policy(base)
    ro = make_rollouts(policy, tok, n_prompts=3, generations=3, max_new_tokens=4, temperature=0.8)
    ref = AdapterDisabled(policy, temperature=0.8)
    want = _naive_kl(policy, base, ro, 0.8)
    got = exact_kl(policy, ref, ro, micro_batch_size=4)
    assert want > 1e-3
    assert abs(got - want) <= 1e-5 * max(1.0, want)
    assert abs(exact_kl(policy, Frozen(copy.deepcopy(base), temperature=0.8), ro) - want) <= 1e-5 * max(1.0, want)


@pytest.mark.parametrize("use_dora", [False, True])
def test_exact_kl_with_an_adapter_on_the_lm_head(tiny_model_dirs, use_dora):
    """LoRA on lm_head goes through the tiled kl.exact (LMHead folds it); DoRA, no linear map, through the
    row-chunked full softmax of the head module. Both equal the float64 full softmax of the models' logits."""
    from peft import LoraConfig, get_peft_model

    base, tok = load_tiny(tiny_model_dirs["llama"])
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0, use_dora=use_dora)
    policy = get_peft_model(copy.deepcopy(base), cfg)
    perturb_adapter(policy)
    ro = make_rollouts(policy, tok, n_prompts=2, generations=3, max_new_tokens=4, temperature=0.8)
    want = _naive_kl(policy, base, ro, 0.8)
    got = exact_kl(policy, AdapterDisabled(policy, temperature=0.8), ro, micro_batch_size=4, row_chunk=5)
    assert want > 1e-3
    assert abs(got - want) <= 1e-5 * max(1.0, want)


def test_exact_kl_of_fsdp2_sharded_models(tiny_model_dirs, one_rank_group):
    """An FSDP2 policy (1 rank) and its references, sharded or not, give the plain models' exact KL: both run
    inside their hooked forwards. Before: the backbones ran behind the roots' backs (mixed Tensor and DTensor)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def shard(model):
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.base_model.model.model.layers if hasattr(model, "peft_config") else model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    base, tok = load_tiny(tiny_model_dirs["llama"])
    policy = lora_policy(copy.deepcopy(base))
    ro = make_rollouts(policy, tok, n_prompts=2, generations=3, max_new_tokens=4, temperature=0.8)
    merged = copy.deepcopy(policy).merge_and_unload()  # the same policy without an adapter, to shard plainly
    want_frozen = exact_kl(merged, Frozen(copy.deepcopy(base), temperature=0.8), ro, micro_batch_size=4)
    want_adapter = exact_kl(policy, AdapterDisabled(policy, temperature=0.8), ro, micro_batch_size=4)
    assert want_frozen > 1e-3 and abs(want_frozen - want_adapter) <= 1e-5

    sharded = shard(copy.deepcopy(merged))
    for ref in (Frozen(copy.deepcopy(base), temperature=0.8),                  # a whole reference
                Frozen(shard(copy.deepcopy(base)), temperature=0.8)):      # a sharded one
        assert abs(exact_kl(sharded, ref, ro, micro_batch_size=4) - want_frozen) <= 1e-5
    sharded_lora = shard(copy.deepcopy(policy))                             # adapter off, inside the policy
    got = exact_kl(sharded_lora, AdapterDisabled(sharded_lora, temperature=0.8), ro, micro_batch_size=4)
    assert abs(got - want_adapter) <= 1e-5
