"""The GRPO recipe: it learns the built-in verifiable task with the exact KL bounded; beta=0 builds no
reference; the reference and old log-probs are computed once per rollout batch (counted) and the
micro-batch size does not change the run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from refmodel.errors import ConfigError
from refmodel.recipes.grpo import GRPOConfig, evaluate_rewards, grpo
from refmodel.reference import AdapterDisabled
from refmodel.testing import load_tiny, verifiable_answer, verifiable_prompts, verifiable_reward

FAST = dict(prompts_per_step=4, num_generations=4, max_new_tokens=2, progress=False, lora_r=8, lora_alpha=16)


def test_verifiable_task_reward_is_exact():
    prompts = verifiable_prompts()
    assert len(prompts) == 20 and verifiable_answer(prompts[7]) == "8"
    conv = [{"role": "user", "content": "what comes after 19"}]
    r = verifiable_reward([prompts[7], prompts[7], prompts[7], conv, "hello"], ["8", "8 .", "9", "20", "8"])
    assert r.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]


def test_beta_zero_builds_no_reference(tiny_model_dirs, tmp_path):
    model, tok = load_tiny(tiny_model_dirs["llama"])
    (tmp_path / "metrics.jsonl").write_text("a DPO run's rows\n")  # `refmodel demo --algo grpo` after dpo
    res = grpo(model, tok, verifiable_prompts(), [verifiable_reward],
               GRPOConfig(beta=0.0, max_steps=2, output_dir=str(tmp_path), **FAST))
    assert res.reference is None
    assert all(h["ref_calls"] == 0 and math.isnan(h["kl_estimated"]) and math.isnan(h["kl_exact"])
               for h in res.history)
    assert (tmp_path / "metrics.jsonl").read_text() == "a DPO run's rows\n"  # GRPO writes its own file
    assert res.metrics_path == tmp_path / "grpo_metrics.jsonl"
    rows = [json.loads(line) for line in res.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert {"reward_mean", "reward_std", "clip_fraction", "entropy", "time_rollout_s", "time_policy_s"} <= set(rows[0])
    assert (tmp_path / "grpo_curves.png").stat().st_size > 10_000


class CountingReference(AdapterDisabled):
    calls = 0

    def logprobs(self, *args, **kwargs):
        type(self).calls += 1
        return super().logprobs(*args, **kwargs)


@pytest.mark.parametrize("num_iterations", [1, 3])
def test_reference_and_old_logps_once_per_rollout_batch(tiny_model_dirs, num_iterations):
    from refmodel.recipes.train import add_lora

    model, tok = load_tiny(tiny_model_dirs["llama"])
    policy = add_lora(model, r=8, alpha=16)
    ref = CountingReference(policy)
    CountingReference.calls = 0
    cfg = GRPOConfig(beta=0.04, max_steps=2, num_iterations=num_iterations, micro_batch_size=8, exact_kl_every=0,
                     **FAST)
    res = grpo(policy, tok, verifiable_prompts(), [verifiable_reward], cfg, reference=ref)
    per_batch = math.ceil(4 * 4 / 8)
    assert CountingReference.calls == 2 * per_batch  # not 2 * per_batch * num_iterations
    assert [h["ref_calls"] for h in res.history] == [per_batch, per_batch]
    # the old-policy pass runs once per batch when needed, and not at all when on-policy
    assert [h["old_calls"] for h in res.history] == [per_batch if num_iterations > 1 else 0] * 2
    assert res.history[-1]["optimizer_step"] == 2 * num_iterations


def test_micro_batch_size_does_not_change_the_step(tiny_model_dirs):
    """Step 1 on the same seeded rollouts: loss, estimated and exact KL within 1e-5 for micro-batch 1 vs 8.

    (Only step 1: with zero advantages the loss is the KL alone, ~1e-13 apart between batchings, and Adam
    scales even such a gradient up to a full learning-rate step, so later steps legitimately diverge.)
    """
    runs = []
    for mb in (1, 8):
        model, tok = load_tiny(tiny_model_dirs["llama"])
        cfg = GRPOConfig(beta=0.04, max_steps=1, micro_batch_size=mb, **FAST)
        runs.append(grpo(model, tok, verifiable_prompts(), [verifiable_reward], cfg).history[0])
    a, b = runs
    assert a["ref_calls"] == 16 and b["ref_calls"] == 2
    for key in ("reward_mean", "loss", "kl_estimated", "kl_exact", "ratio_mean", "entropy"):
        assert abs(a[key] - b[key]) <= 1e-5, (key, a[key], b[key])


def test_bad_config_and_reward_functions(tiny_model_dirs):
    with pytest.raises(ConfigError, match="num_generations"):
        GRPOConfig(num_generations=1)
    with pytest.raises(ConfigError, match="beta"):
        GRPOConfig(beta=-1.0)
    model, tok = load_tiny(tiny_model_dirs["llama"])
    with pytest.raises(ConfigError, match="one float per completion"):
        grpo(model, tok, verifiable_prompts(), [lambda p, c: [1.0]], GRPOConfig(max_steps=1, **FAST))


@pytest.mark.slow
def test_grpo_learns_the_verifiable_task_with_bounded_kl(tiny_model_dirs, tmp_path):
    """Measured: reward of fresh samples 0.006 -> 0.625 over 120 steps (8 prompts x 16 samples, LoRA r=16,
    lr 1e-3, beta 0.04), max exact KL 3.47 nats/token."""
    torch.set_num_threads(1)
    model, tok = load_tiny(tiny_model_dirs["llama"])
    prompts = verifiable_prompts()
    cfg = GRPOConfig(max_steps=120, micro_batch_size=128, progress=False, output_dir=str(tmp_path), kl_threshold=50.0)
    before = evaluate_rewards(model, tok, prompts, [verifiable_reward], cfg.sampling)
    res = grpo(model, tok, prompts, [verifiable_reward], cfg)
    after = evaluate_rewards(res.policy, tok, prompts, [verifiable_reward], cfg.sampling)
    assert before < 0.05 and after > 0.4, (before, after)
    kls = [h["kl_exact"] for h in res.history]
    assert kls[0] == pytest.approx(0.0, abs=1e-6)  # the LoRA policy starts at its reference
    assert max(kls) < 10.0 and not res.kl_monitor.warned
    first, last = res.history[0], res.history[-1]
    assert last["reward_mean"] > first["reward_mean"] + 0.3


@pytest.mark.parametrize("head_lora", [False, True])
def test_fused_policy_loss_gives_the_same_step(tiny_model_dirs, head_lora):
    """use_fused_policy_loss (the loss inside the LM head) equals model_logprobs + policy_loss: the step-1
    loss and the LoRA gradients after one step (float32, 1e-5), with a KL term and two iterations; also with
    LoRA on the LM head itself (folded into the fused head, it trains)."""
    from refmodel.recipes.grpo import policy_step
    from refmodel.recipes.train import add_lora
    from refmodel.rl import generate_rollouts, group_advantages, score_rollouts

    model, tok = load_tiny(tiny_model_dirs["llama"])
    if head_lora:
        import peft

        torch.manual_seed(0)
        policy = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                            target_modules=["q_proj", "v_proj", "lm_head"]))
    else:
        policy = add_lora(model, r=8, alpha=16)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn(p.shape) * 0.1)  # the policy differs from its reference
    ref = AdapterDisabled(policy)
    results = []
    for fused in (False, True):
        cfg = GRPOConfig(beta=0.04, use_fused_policy_loss=fused, grad_accum_steps=2, loss_type="grpo", **FAST)
        ro = generate_rollouts(policy, tok, verifiable_prompts(4), cfg.sampling.__class__(4, 3, seed=5))
        adv = group_advantages(torch.arange(ro.batch_size, dtype=torch.float32) % 3, 4)
        scored = score_rollouts(policy, ref, ro, need_old=True, beta=cfg.beta)
        policy.zero_grad(set_to_none=True)
        metrics = policy_step(policy, scored, adv, cfg)
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        results.append((metrics, grads))
    (m0, g0), (m1, g1) = results
    assert abs(m0["loss"] - m1["loss"]) <= 1e-5 and abs(m0["kl_estimated"] - m1["kl_estimated"]) <= 1e-5
    assert g0.keys() == g1.keys() and len(g0) > 0
    assert not head_lora or any("lm_head" in n for n in g1), "LoRA on the head must get a gradient"
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-4)


def test_full_fine_tuning_gets_a_frozen_copy_and_the_monitor_warns(tiny_model_dirs, caplog):
    import logging

    from refmodel.reference import Frozen

    model, tok = load_tiny(tiny_model_dirs["llama"])
    cfg = GRPOConfig(**{**FAST, "lora_r": 0}, beta=0.04, max_steps=3, learning_rate=1e-2, kl_threshold=1e-4)
    def text_length(prompts, completions):  # varies within every group, so the policy moves from step 1
        return [float(len(c)) for c in completions]

    with caplog.at_level(logging.WARNING, logger="refmodel"):
        res = grpo(model, tok, verifiable_prompts(), [text_length], cfg)
    assert isinstance(res.reference, Frozen) and res.reference.memory_bytes > 0
    assert not hasattr(res.policy, "peft_config")
    assert res.history[0]["kl_exact"] == pytest.approx(0.0, abs=1e-6) and res.history[-1]["kl_exact"] > 1e-4
    assert res.kl_monitor.warned and any("exceeds the threshold" in r.getMessage() for r in caplog.records)


def test_the_recipe_builds_one_policy_loss_config_and_passes_it_through(tiny_model_dirs):
    """GRPOConfig -> one PolicyLossConfig (checked at construction); policy_step's loss and gradients equal
    policy_loss with that config on the same inputs (the step's log-probs, old and reference log-probs)."""
    from refmodel.logprobs.model import model_logprobs
    from refmodel.losses import PolicyLossConfig, policy_loss
    from refmodel.recipes.grpo import policy_step
    from refmodel.recipes.train import add_lora
    from refmodel.rl import generate_rollouts, group_advantages, score_rollouts

    with pytest.raises(ConfigError, match="absolute"):
        GRPOConfig(loss_type="cispo", **FAST)  # at construction, not at the first step
    with pytest.raises(ConfigError, match="unknown KL estimator"):
        GRPOConfig(kl_estimator="k4", **FAST)
    cfg = GRPOConfig(beta=0.04, loss_type="dr_grpo", epsilon_high=0.28, kl_estimator="low_var_kl", **FAST)
    assert cfg.policy_loss_config == PolicyLossConfig(loss_type="dr_grpo", epsilon_high=0.28, beta=0.04,
                                                      kl_estimator="k3", max_completion_length=cfg.max_new_tokens)
    model, tok = load_tiny(tiny_model_dirs["llama"])
    policy = add_lora(model, r=8, alpha=16)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn(p.shape) * 0.1)  # the policy differs from its reference
    ro = generate_rollouts(policy, tok, verifiable_prompts(4), cfg.sampling.__class__(4, 3, seed=5))
    adv = group_advantages(torch.arange(ro.batch_size, dtype=torch.float32) % 3, 4)
    scored = score_rollouts(policy, AdapterDisabled(policy), ro, need_old=True, beta=cfg.beta)
    policy.zero_grad(set_to_none=True)
    metrics = policy_step(policy, scored, adv, cfg)
    got = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)
    lp = model_logprobs(policy, ro.input_ids, ro.attention_mask, ro.completion_mask, temperature=ro.temperature)
    res = policy_loss(lp, scored.old_logprobs, adv, ro.completion_mask, config=cfg.policy_loss_config,
                      ref_logprobs=scored.ref_logprobs)
    res.loss.backward()
    assert metrics["loss"] == pytest.approx(float(res.loss.detach()), rel=1e-6, abs=1e-9)
    assert got.keys() and all(torch.allclose(got[n], p.grad, rtol=1e-5, atol=1e-7)
                              for n, p in policy.named_parameters() if p.grad is not None)


def test_fused_policy_loss_of_an_fsdp2_policy(tiny_model_dirs, one_rank_group):
    """The fused loss runs inside the policy's hooked forward: an FSDP2 policy (1 rank) gives the plain loss and
    gradients. Before: its backbone and head weight were used behind the root's back (mixed Tensor and DTensor)."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from refmodel.losses.policy_config import PolicyLossConfig
    from refmodel.recipes.grpo import _fused_loss

    plain, _ = load_tiny(tiny_model_dirs["llama"])
    sharded = copy.deepcopy(plain)
    mesh = init_device_mesh("cpu", (1,))
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    ids = torch.randint(4, 40, (3, 9), generator=torch.Generator().manual_seed(2))
    attn = torch.ones_like(ids)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 4:] = True
    adv = torch.tensor([0.5, -1.0, 2.0])
    args = (ids, attn, mask, None, adv, None, None, 1.0, PolicyLossConfig())
    expected, out = _fused_loss(plain, *args), _fused_loss(sharded, *args)
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-6, rtol=0)
    expected.loss.backward()
    out.loss.backward()
    for (name, p), q in zip(sharded.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, atol=1e-6, rtol=1e-5, msg=name)
