"""The training loop on a real tiny Llama: one step helps, accumulation is exact, outputs are written."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from refmodel import model_logprobs
from refmodel.data import collate_examples
from refmodel.errors import ConfigError
from refmodel.recipes.train import TrainConfig, accumulate_gradients, tokenize_preferences, train
from refmodel.testing import load_tiny, preference_pairs


class FrozenCopy:
    """Minimal in-test reference: a frozen deep copy scored with model_logprobs."""

    def __init__(self, policy):
        self.model = copy.deepcopy(policy).eval().requires_grad_(False)
        self.fingerprint, self.memory_bytes, self.steps = "test-frozen", 0, []

    @torch.no_grad()
    def logprobs(self, input_ids, attention_mask=None, score_mask=None):
        return model_logprobs(self.model, input_ids, attention_mask, score_mask)

    def on_step(self, step, policy):
        self.steps.append(step)


@pytest.fixture
def llama(tiny_model_dirs):
    model, tok = load_tiny(tiny_model_dirs["llama"])
    return model.float(), tok


def _loss_on(policy, reference, batch, cfg):
    policy.zero_grad(set_to_none=True)
    metrics = accumulate_gradients(policy, reference, batch, cfg, pad_id=0)
    policy.zero_grad(set_to_none=True)
    return metrics["loss"]


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "simpo", "orpo"])
def test_one_step_changes_policy_and_lowers_loss_on_fixed_batch(llama, loss):
    model, tok = llama
    pairs = preference_pairs(8, seed=1)
    cfg = TrainConfig(loss=loss, beta=0.5 if loss != "simpo" else 2.0, learning_rate=3e-3, batch_size=8,
                      max_steps=1, progress=False, max_grad_norm=None)
    ref = FrozenCopy(model)
    batch = tokenize_preferences(pairs, tok)
    before_params = [p.detach().clone() for p in model.parameters()]
    before = _loss_on(model, ref, batch, cfg)
    result = train(model, tok, pairs, cfg, reference=ref)
    after = _loss_on(result.policy, ref, batch, cfg)
    changed = sum(not torch.equal(a, b) for a, b in zip(before_params, model.parameters(), strict=True))
    assert changed == len(before_params)
    assert after < before - 1e-4, (before, after)
    if loss == "sigmoid":
        assert before == pytest.approx(torch.nn.functional.softplus(torch.tensor(0.0)).item(), abs=1e-6)  # log 2
        assert ref.steps == [1]


@pytest.mark.parametrize("loss", ["sigmoid", "orpo"])
@pytest.mark.parametrize("accum", [2, 3])
def test_grad_accumulation_equals_full_batch(llama, loss, accum):
    """2x4 (and uneven 3+3+2) micro-batches give the gradient of one batch of 8.

    Tolerance 1e-5: float32 sums of the same terms in a different order and padding widths.
    """
    model, tok = llama
    pairs = tokenize_preferences(preference_pairs(8, seed=2), tok)
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy off the reference so the DPO gradient is not trivial
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ref = FrozenCopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    grads = {}
    for steps in (1, accum):
        model.zero_grad(set_to_none=True)
        cfg = TrainConfig(loss=loss, batch_size=8, grad_accum_steps=steps, progress=False)
        metrics = accumulate_gradients(model, ref, pairs, cfg, pad_id=0)
        grads[steps] = ([p.grad.clone() for p in model.parameters()], metrics)
    for g1, g2 in zip(grads[1][0], grads[accum][0], strict=True):
        torch.testing.assert_close(g2, g1, rtol=0, atol=1e-5)
    assert grads[accum][1]["loss"] == pytest.approx(grads[1][1]["loss"], abs=1e-5)
    assert grads[accum][1]["accuracy"] == pytest.approx(grads[1][1]["accuracy"])
    # a per-micro-batch mean would differ for the uneven split: check the test could fail
    if accum == 3:
        assert any((g.abs() > 1e-3).any() for g in grads[1][0])


def test_metrics_and_plot_written(llama, tmp_path):
    model, tok = llama
    pairs = preference_pairs(24, seed=3)
    cfg = TrainConfig(batch_size=4, grad_accum_steps=2, max_steps=5, progress=False, output_dir=str(tmp_path))
    result = train(model, tok, pairs[:16], cfg, reference=FrozenCopy(model), eval_pairs=pairs[16:])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for key in ("loss", "chosen_rewards", "rejected_rewards", "margin", "accuracy", "kl", "step_time_s",
                "peak_memory_bytes"):
        assert all(key in r for r in rows), key
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: policy == reference
    assert rows[-1]["kl"] > 0
    png = tmp_path / "curves.png"
    assert result.plot_path == png and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(result.final_eval) == {"eval_accuracy", "eval_margin", "eval_loss"}
    assert result.kl_monitor.count == 5


def test_lora_policy_trains_only_adapter(llama):
    pytest.importorskip("peft")
    model, tok = llama
    base = [(p, p.detach().clone()) for p in model.parameters()]  # PEFT keeps these Parameter objects
    cfg = TrainConfig(loss="simpo", beta=2.0, batch_size=4, max_steps=2, lora_r=4, progress=False,
                      learning_rate=1e-2)
    result = train(model, tok, preference_pairs(8, seed=4), cfg)
    assert hasattr(result.policy, "peft_config")
    assert all(torch.equal(p, before) for p, before in base)
    lora_b = [p for n, p in result.policy.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at 0 and has moved


def test_config_and_data_errors(llama):
    _, tok = llama
    with pytest.raises(ConfigError, match=r"expected one of \['sigmoid', 'ipo', 'hinge', 'robust', 'simpo', 'orpo'\]"):
        TrainConfig(loss="dpo")
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        TrainConfig(batch_size=2, grad_accum_steps=3)
    with pytest.raises(ValueError, match="fits no accepted type"):
        tokenize_preferences([{"prompt": "what is 1 plus 1 ?", "chosen": "2"}], tok)
    with pytest.raises(ValueError, match="the DPO loop needs preference pairs"):
        tokenize_preferences([{"prompt": "what is 1 plus 1 ?", "completion": "2"}], tok)
    batch = collate_examples(tokenize_preferences(preference_pairs(2, seed=5), tok))
    assert batch["input_ids"].shape[0] == 4 and (batch["score_mask"] <= batch["attention_mask"]).all()
