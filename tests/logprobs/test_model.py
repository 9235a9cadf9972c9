"""model_logprobs against log_softmax of the model's own logits, for every tiny family.

Tolerance 1e-5 nats: both sides are fp32; they differ only in summation order (chunked head,
padded batches running different matmul shapes).
"""

import pytest
import torch

from refmodel import head_logprobs, model_logprobs
from refmodel.errors import InvalidBatch
from refmodel.logprobs.head import naive_token_logprobs
from refmodel.logprobs.model import logit_transform
from refmodel.testing import load_tiny

ATOL = 1e-5


def _reference(model, ids, mask=None, temperature=1.0):
    mask = torch.ones_like(ids) if mask is None else mask
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float() / temperature
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(lp, (1, 0))


def _ids(tok, n=3, t=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(6, len(tok), (n, t), generator=g)


@torch.no_grad()
def test_equals_model_logits(tiny):
    model, tok = tiny
    ids = _ids(tok)
    out = model_logprobs(model, ids)
    assert out.dtype == torch.float32 and out.shape == ids.shape
    assert torch.equal(out[:, 0], torch.zeros(3))
    torch.testing.assert_close(out, _reference(model, ids), atol=ATOL, rtol=0)
    unfused = model_logprobs(model, ids, use_fused_linear_logprobs=False)
    torch.testing.assert_close(unfused, out, atol=ATOL, rtol=0)


@torch.no_grad()
def test_temperature_and_entropy(tiny):
    model, tok = tiny
    ids = _ids(tok, 2, 9)
    res = model_logprobs(model, ids, temperature=0.6, return_entropy=True)
    torch.testing.assert_close(res.logprobs, _reference(model, ids, temperature=0.6), atol=ATOL, rtol=0)
    logits = model(ids).logits.float()[:, :-1] / 0.6
    lp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(res.entropy[:, 1:], -(lp.exp() * lp).sum(-1), atol=ATOL, rtol=0)


@torch.no_grad()
def test_independent_of_padding_side_and_batch_mates(tiny):
    model, tok = tiny
    a, b = _ids(tok, 1, 7, seed=1)[0], _ids(tok, 1, 12, seed=2)[0]
    alone_a = model_logprobs(model, a[None])[0]
    alone_b = model_logprobs(model, b[None])[0]
    pad = tok.pad_token_id
    right = torch.stack([torch.cat([a, torch.full((5,), pad)]), b])
    right_mask = (torch.arange(12)[None] < torch.tensor([[7], [12]])).long()
    left = torch.stack([torch.cat([torch.full((5,), pad), a]), b])
    left_mask = right_mask.flip(1) * torch.tensor([[1], [0]]) + torch.tensor([[0], [1]])
    out_r = model_logprobs(model, right, right_mask)
    out_l = model_logprobs(model, left, left_mask)
    torch.testing.assert_close(out_r[0, :7], alone_a, atol=ATOL, rtol=0)
    torch.testing.assert_close(out_l[0, 5:], alone_a, atol=ATOL, rtol=0)
    torch.testing.assert_close(out_r[1], alone_b, atol=ATOL, rtol=0)
    assert torch.equal(out_r[0, 7:], torch.zeros(5)) and torch.equal(out_l[0, :6], torch.zeros(6))


@torch.no_grad()
def test_score_mask_selects_positions(tiny):
    model, tok = tiny
    ids = _ids(tok, 2, 10)
    score = torch.zeros_like(ids, dtype=torch.bool)
    score[:, 6:] = True
    out = model_logprobs(model, ids, score_mask=score)
    full = model_logprobs(model, ids)
    assert torch.equal(out[:, :6], torch.zeros(2, 6))
    torch.testing.assert_close(out[:, 6:], full[:, 6:], atol=ATOL, rtol=0)
    assert torch.equal(model_logprobs(model, ids, score_mask=torch.zeros_like(score)), torch.zeros(2, 10))


def test_policy_gradients_match_full_logits(tiny_model_dirs):
    model, tok = load_tiny(tiny_model_dirs["llama"])
    ids = _ids(tok, 2, 8)
    weights = torch.rand(2, 8)
    (model_logprobs(model, ids) * weights).sum().backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (_reference(model, ids) * weights).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("target_modules", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_peft_lora_including_head(tiny_model_dirs, target_modules):
    peft = pytest.importorskip("peft")
    model, tok = load_tiny(tiny_model_dirs["llama"])
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, lora_dropout=0.0)
    policy = peft.get_peft_model(model, cfg)
    for name, p in policy.named_parameters():  # non-zero B so the adapter changes the output
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    ids = _ids(tok, 2, 9)
    with torch.no_grad():
        expected = _reference(policy, ids)
        out = model_logprobs(policy, ids)
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
        with policy.disable_adapter():
            base = model_logprobs(policy, ids)
            torch.testing.assert_close(base, _reference(policy, ids), atol=ATOL, rtol=0)
        assert (base - out).abs().max() > 1e-3, "the adapter must change the log-probs"
    model_logprobs(policy, ids).sum().backward()
    head_b = [p for n, p in policy.named_parameters() if "lm_head" in n and "lora_B" in n]
    for p in head_b:  # LoRA on the head must train, not be silently skipped
        assert p.grad is not None and p.grad.abs().sum() > 0


class _HalfDropout(torch.nn.Module):
    """A deterministic stand-in for LoRA dropout: proves the fused path applies the adapter's dropout."""

    def forward(self, x):
        return 0.5 * x


def test_peft_lora_head_dropout_module_is_applied(tiny_model_dirs):
    peft = pytest.importorskip("peft")
    model, tok = load_tiny(tiny_model_dirs["gpt2"])
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "lm_head"], lora_dropout=0.3)
    policy = peft.get_peft_model(model, cfg)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    policy.eval()  # get_peft_model returns a training-mode model: the backbone's dropout would differ
    head = policy.get_base_model().lm_head
    head.lora_dropout["default"] = _HalfDropout()
    ids = _ids(tok, 2, 9)
    with torch.no_grad():
        torch.testing.assert_close(model_logprobs(policy, ids), _reference(policy, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("make,match", [
    (lambda ids: (ids.float(), None, None), "integer token ids"),
    (lambda ids: (ids[0], None, None), r"\[B, T\] integer tensor"),
    (lambda ids: (ids, torch.ones(2, 3), None), "attention_mask must have the shape"),
    (lambda ids: (ids, torch.full_like(ids, 2), None), "only 0/1"),
    (lambda ids: (ids, torch.cat([torch.ones(2, 9), torch.zeros(2, 1)], 1).long(), torch.ones_like(ids)),
     "score_mask marks padded positions"),
    (lambda ids: (ids + 1000, None, None), "outside the vocabulary"),
])
def test_bad_batches(tiny_model_dirs, make, match):
    model, tok = load_tiny(tiny_model_dirs["llama"])
    ids, attn, score = make(_ids(tok, 2, 10))
    with pytest.raises(InvalidBatch, match=match):
        model_logprobs(model, ids, attn, score)


def test_empty_and_single_token_batches(tiny_model_dirs):
    model, _ = load_tiny(tiny_model_dirs["gpt2"])
    assert model_logprobs(model, torch.zeros(0, 5, dtype=torch.long)).shape == (0, 5)
    assert torch.equal(model_logprobs(model, torch.tensor([[7]])), torch.zeros(1, 1))


@torch.no_grad()
def test_padded_positions_may_hold_any_id(tiny_model_dirs):
    model, tok = load_tiny(tiny_model_dirs["llama"])
    ids = _ids(tok, 2, 8)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    clean = model_logprobs(model, ids.masked_fill(mask == 0, tok.pad_token_id), mask)
    for filler in (-100, len(tok) + 7):
        torch.testing.assert_close(model_logprobs(model, ids.masked_fill(mask == 0, filler), mask), clean)


@torch.no_grad()
def test_use_liger_without_cuda_falls_back_to_the_fused_op_and_says_so(tiny, caplog):
    import logging

    import refmodel.logprobs.liger

    model, tok = tiny
    ids = _ids(tok, 2, 8)
    refmodel.logprobs.liger._warned.clear()
    with caplog.at_level(logging.WARNING, logger="refmodel.logprobs.liger"):
        out = model_logprobs(model, ids, use_liger=True)
    # The tiny model sits on the CPU, so Liger cannot run on any machine (with or without CUDA): the
    # fallback must equal the full log_softmax, and say why it fell back.
    torch.testing.assert_close(out, _reference(model, ids), atol=ATOL, rtol=0)
    assert "Liger needs CUDA" in caplog.text


@pytest.mark.gpu
def test_liger_on_gpu_matches_the_naive_log_softmax():
    pytest.importorskip("liger_kernel")
    from refmodel.logprobs import naive_token_logprobs
    from refmodel.logprobs.liger import liger_token_logprobs

    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(64, 128, device="cuda", generator=g)
    w = torch.randn(1000, 128, device="cuda", generator=g) / 128**0.5
    t = torch.randint(0, 1000, (64,), device="cuda", generator=g)
    t[::7] = -100
    for kwargs in ({}, {"temperature": 0.7, "logit_scale": 1.3}, {"softcap": 5.0}):
        torch.testing.assert_close(liger_token_logprobs(h, w, t, **kwargs), naive_token_logprobs(h, w, t, **kwargs),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_head_that_is_not_a_linear_map_runs_as_a_module_with_the_logit_transform(tiny_model_dirs, family):
    """DoRA on the head cannot be folded into one matrix: the head runs as a module on scored rows,
    and gemma2's final soft-cap (5.0) must still apply."""
    peft = pytest.importorskip("peft")
    model, tok = load_tiny(tiny_model_dirs[family])
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], use_dora=True, lora_dropout=0.0)
    policy = peft.get_peft_model(model, cfg).eval()
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    ids = _ids(tok, 2, 9)
    score = torch.ones_like(ids, dtype=torch.bool)
    score[0, :5] = False
    with torch.no_grad():
        expected = _reference(policy, ids) * score
        torch.testing.assert_close(model_logprobs(policy, ids, score_mask=score), expected, atol=ATOL, rtol=0)
        out = model_logprobs(policy, ids, score_mask=score, temperature=0.7, return_entropy=True)
        torch.testing.assert_close(out.logprobs, _reference(policy, ids, temperature=0.7) * score,
                                   atol=ATOL, rtol=0)


@torch.no_grad()
def test_head_logprobs_applies_the_models_own_head_and_transform(tiny):
    model, tok = tiny
    hidden = torch.randn(2, 5, model.config.hidden_size)
    targets = torch.randint(0, len(tok), (2, 5))
    targets[1, 2:] = -100
    head, tf = model.get_output_embeddings(), logit_transform(model.config)
    expected = naive_token_logprobs(hidden, head.weight, targets, bias=head.bias, temperature=0.8,
                                    logit_scale=tf.logit_scale, softcap=tf.softcap)
    out = head_logprobs(model, hidden, targets, temperature=0.8)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    assert (out[1, 2:] == 0).all()


@torch.no_grad()
def test_head_log_softmax_is_the_full_distribution_behind_head_logprobs(tiny):
    """head_log_softmax (whole [.., V] distributions, for full-softmax KLs) gathered at the targets equals
    head_logprobs, and each row is a distribution (logsumexp 0)."""
    from refmodel.logprobs.model import head_log_softmax

    model, tok = tiny
    hidden = torch.randn(2, 5, model.config.hidden_size)
    targets = torch.randint(0, len(tok), (2, 5))
    full = head_log_softmax(model, hidden, temperature=0.7)
    assert full.dtype == torch.float32 and full.shape == (2, 5, model.config.vocab_size)
    torch.testing.assert_close(full.gather(-1, targets[..., None])[..., 0],
                               head_logprobs(model, hidden, targets, temperature=0.7), atol=ATOL, rtol=0)
    torch.testing.assert_close(full.logsumexp(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
