"""refmodel.kl.exact against full-softmax KLs: the model's own logits for the three tiny families (untied,
tied, soft-capped), a biased head with logit scale and soft-cap, under temperature; values and gradients.

Tolerances: float64 1e-10 (the tiled sums differ from the full softmax only by rounding order); float32 2e-5
absolute on the KL (nats) and 1e-4 relative on the gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch
from loss_helpers import MatmulFlops, lora_head_policy
from torch.utils._python_dispatch import TorchDispatchMode

import refmodel
from refmodel.errors import ConfigError, InvalidInput
from refmodel.logprobs.model import backbone_of, unwrap_causal_lm
from refmodel.losses import policy_loss
from refmodel.losses.kl import LMHead, exact, naive_exact
from refmodel.testing import load_tiny

F64 = dict(rtol=1e-10, atol=1e-10)


def _model_kl(policy, ref, ids, temperature):
    """KL from the models' own forward (their own head, tying and soft-capping), full [B, T, V]."""
    logp = torch.log_softmax(policy(input_ids=ids).logits.double() / temperature, -1)
    logq = torch.log_softmax(ref(input_ids=ids).logits.double() / temperature, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def _hidden(model, ids):
    causal = model
    return causal.model(input_ids=ids)[0] if hasattr(causal, "model") else causal.transformer(input_ids=ids)[0]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_exact_matches_the_models_full_softmax(tiny, family, temperature):
    policy, _ = tiny
    policy = policy.double()
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(6, policy.config.vocab_size, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.no_grad():
        want = _model_kl(policy, ref, ids, temperature) * mask
        hp, hr = _hidden(policy, ids), _hidden(ref, ids)
    head_p, head_r = LMHead.from_model(policy), LMHead.from_model(ref)
    if family == "gemma2":
        assert head_p.softcap == 5.0
    got = exact(hp, head_p, hr, head_r, mask, temperature=temperature, chunk_size=5, vocab_chunk_size=17)
    torch.testing.assert_close(got, want, **F64)
    assert (got[mask] > 0).all() and not got[~mask].any()


@pytest.mark.parametrize("family,kind", [("llama", "lora"), ("gemma2", "lora"), ("llama", "modules_to_save")])
def test_lora_on_the_head_matches_the_models_full_softmax(tiny_model_dirs, family, kind):
    """A real PEFT adapter on lm_head (LoRA target, or a modules_to_save copy): exact KL from LMHead.from_model
    equals the KL of the models' own logits, and so do the gradients of every trainable parameter (the head's
    lora_A / lora_B or its saved copy, the backbone's adapters). float64, 1e-10."""
    policy, ref = lora_head_policy(load_tiny(tiny_model_dirs[family])[0], kind)
    head = LMHead.from_model(policy)
    assert LMHead is refmodel.logprobs.lm_head.LMHead and LMHead is refmodel.losses.kl_exact.LMHead
    if kind == "lora":
        assert len(head.lora) == 1, "the head's LoRA must be folded in, not dropped"
    ids = torch.randint(6, policy.config.vocab_size, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    up = torch.rand(2, 9, dtype=torch.float64)
    named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    with torch.no_grad():
        hr = backbone_of(ref)(input_ids=ids)[0]
    hp = backbone_of(unwrap_causal_lm(policy))(input_ids=ids)[0]
    got = exact(hp, head, hr, LMHead.from_model(ref), mask, temperature=0.7, chunk_size=5, vocab_chunk_size=17)
    want = _model_kl(policy, ref, ids, 0.7) * mask
    torch.testing.assert_close(got, want, **F64)
    assert (got[mask] > 1e-4).all()
    g_got = torch.autograd.grad((got * up).sum(), params)
    g_want = torch.autograd.grad((want * up).sum(), params)
    for (name, _), a, b in zip(named, g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, **F64, msg=name)
    head_grads = [g for (name, _), g in zip(named, g_got, strict=True) if "lm_head" in name]
    assert head_grads and all(g.abs().sum() > 0 for g in head_grads), "the head's adapter must train"


@pytest.mark.parametrize("softcap,logit_scale,bias", [(None, 1.0, False), (None, 1.0, True), (2.5, 1.7, True),
                                                      (4.0, 0.8, False)])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_values_and_gradients_against_naive_float64(softcap, logit_scale, bias, temperature):
    g = torch.Generator().manual_seed(1)
    B, T, H, H_ref, V = 2, 7, 12, 10, 53
    hp = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    hr = torch.randn(B, T, H_ref, generator=g, dtype=torch.float64)
    wp = (0.7 * torch.randn(V, H, generator=g, dtype=torch.float64)).requires_grad_()
    bp = torch.randn(V, generator=g, dtype=torch.float64).requires_grad_() if bias else None
    wr = 0.7 * torch.randn(V, H_ref, generator=g, dtype=torch.float64)
    br = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    mask = torch.rand(B, T, generator=g) > 0.3
    P, R = LMHead(wp, bp, logit_scale, softcap), LMHead(wr, br, 1.0, softcap)
    ours = exact(hp, P, hr, R, mask, temperature=temperature, chunk_size=4, vocab_chunk_size=16)
    naive = naive_exact(hp, P, hr, R, mask, temperature=temperature)
    torch.testing.assert_close(ours, naive, **F64)
    up = torch.randn(B, T, generator=g, dtype=torch.float64)
    leaves = [hp, wp] + ([bp] if bias else [])
    got = torch.autograd.grad((ours * up).sum(), leaves)
    want = torch.autograd.grad((naive * up).sum(), leaves)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **F64)


def test_gradcheck_small():
    g = torch.Generator().manual_seed(2)
    hp = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    wp = torch.randn(11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    hr, wr = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(11, 3, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w: exact(h, LMHead(w, softcap=3.0), hr, wr, temperature=0.8, vocab_chunk_size=4), (hp, wp))


def test_float32_tolerance_and_zero_kl_for_the_same_model():
    g = torch.Generator().manual_seed(3)
    hp = torch.randn(64, 32, generator=g, requires_grad=True)
    wp = torch.randn(1000, 32, generator=g) * 0.3
    hr = hp.detach() + 0.1 * torch.randn(64, 32, generator=g)
    ours = exact(hp, wp, hr, wp)
    naive = naive_exact(hp.double(), wp.double(), hr.double(), wp.double())
    torch.testing.assert_close(ours.double(), naive, rtol=1e-4, atol=2e-5)
    (ga,) = torch.autograd.grad(ours.sum(), hp)
    hp64 = hp.detach().double().requires_grad_()
    (gb,) = torch.autograd.grad(naive_exact(hp64, wp.double(), hr.double(), wp.double()).sum(), hp64)
    torch.testing.assert_close(ga.double(), gb, rtol=1e-4, atol=1e-5)
    same = exact(hp.detach(), wp, hp.detach(), wp)
    assert same.abs().max() < 1e-5


def test_as_the_loss_kl_estimator_full():
    """kl_estimator='full' with full_kl=exact(...) == the same loss built from full softmaxes (value, dh)."""
    g = torch.Generator().manual_seed(4)
    B, T, H, V = 3, 5, 8, 40
    hp = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    hr = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.2
    losses, grads = [], []
    for logp_fn, kl_fn in ((refmodel.token_logprobs, exact), (refmodel.logprobs.naive_token_logprobs, naive_exact)):
        out = policy_loss(logp_fn(hp, w, targets), None, adv, mask, loss_type="grpo", beta=0.1,
                          kl_estimator="full", full_kl=kl_fn(hp, w, hr, w, mask))
        losses.append(out.loss)
        grads.append(torch.autograd.grad(out.loss, hp)[0])
    torch.testing.assert_close(losses[0], losses[1], **F64)
    torch.testing.assert_close(grads[0], grads[1], **F64)


def test_refmodel_kl_exact_is_exported_and_validates():
    assert refmodel.kl.exact is exact
    h, w = torch.randn(2, 3, 4), torch.randn(9, 4)
    with pytest.raises(InvalidInput, match="vocabularies differ"):
        exact(h, w, h, torch.randn(8, 4))
    with pytest.raises(InvalidInput, match="ref_hidden"):
        exact(h, w, torch.randn(2, 3, 5), w)
    with pytest.raises(InvalidInput, match="mask"):
        exact(h, w, h, w, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(InvalidInput, match="temperature"):
        exact(h, w, h, w, temperature=0.0)
    with pytest.raises(InvalidInput, match="LMHead"):
        exact(h, "lm_head", h, w)
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=30)
    # DoRA rescales the head's column norms: no linear map expresses it, so there is no LMHead for it
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules=["lm_head"], use_dora=True))
    with pytest.raises(ConfigError, match="not a linear map"):
        LMHead.from_model(model)
    assert LMHead.from_model_or_none(model) is None


def test_demo_heldout_exact_kl_matches_the_models_logits(tiny_model_dirs):
    """The demo's KL panel: exact KL per completion token of held-out pairs, 0 for the reference itself."""
    from refmodel.data import collate_examples
    from refmodel.recipes.demo import heldout_exact_kl
    from refmodel.recipes.train import tokenize_preferences
    from refmodel.testing import load_tiny, preference_pairs

    base, tok = load_tiny(tiny_model_dirs["llama"])
    policy = copy.deepcopy(base)
    with torch.no_grad():
        policy.lm_head.weight.add_(0.2 * torch.randn_like(policy.lm_head.weight))
    batch = collate_examples(tokenize_preferences(preference_pairs(6, seed=1), tok), tok.pad_token_id)
    assert heldout_exact_kl(base, base, batch) == pytest.approx(0.0, abs=1e-6)
    got = heldout_exact_kl(policy, base, batch)
    attn, score = batch["attention_mask"], batch["score_mask"]
    with torch.no_grad():
        pos = (attn.long().cumsum(1) - 1).clamp(min=0)
        kwargs = dict(input_ids=batch["input_ids"], attention_mask=attn.long(), position_ids=pos)
        logp = torch.log_softmax(policy(**kwargs).logits[:, :-1].double(), -1)
        logq = torch.log_softmax(base(**kwargs).logits[:, :-1].double(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    mask = score[:, 1:]
    assert got == pytest.approx(float(kl[mask].mean()), rel=1e-4)


def test_cost_four_matmul_units_for_dh_and_three_more_for_a_trainable_head():
    """2 logit matmuls + 2 accumulations in the forward, none for dh in the backward; dW recomputes (2) + 1."""
    g = torch.Generator().manual_seed(5)
    n, H, V = 48, 16, 300
    hp = torch.randn(n, H, generator=g, requires_grad=True)
    hr = torch.randn(n, H, generator=g)
    for trainable, units in ((False, 4), (True, 7)):
        wp = torch.randn(V, H, generator=g).requires_grad_(trainable)
        counter = MatmulFlops()
        with counter:
            exact(hp, wp, hr, torch.randn(V, H, generator=g), chunk_size=16, vocab_chunk_size=64).sum().backward()
        assert counter.flops == units * 2 * n * H * V


class _Upcasts(TorchDispatchMode):
    """The most elements of any float32 copy an op made (an upcast whole weight would be ``V x H``)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        res = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ == "_to_copy" and res.dtype == torch.float32:
            self.largest = max(self.largest, res.numel())
        return res


@pytest.mark.parametrize("trainable", [False, True])
def test_bf16_heads_upcast_per_tile_equal_the_whole_upcast_at_default_tiles(trainable):
    """bf16 heads on CPU, V = 5003 (the rule's 4096-column tiles leave 907): the same KL and gradients as the same
    values upcast to float32 first (1e-5 absolute on the KL; gradients to one bf16 rounding), and no float32 copy of
    a whole weight."""
    g = torch.Generator().manual_seed(21)
    vocab = 5003
    hp32, hr32 = torch.randn(40, 12, generator=g), torch.randn(40, 8, generator=g)
    wp32, wr32 = 0.5 * torch.randn(vocab, 12, generator=g), 0.5 * torch.randn(vocab, 8, generator=g)
    out = {}
    for name, dt in (("tiles", torch.bfloat16), ("whole", torch.float32)):
        hp = hp32.bfloat16().to(dt).requires_grad_()
        wp = wp32.bfloat16().to(dt).requires_grad_(trainable)
        with _Upcasts() as probe:
            kl = exact(hp, wp, hr32.bfloat16().to(dt), wr32.bfloat16().to(dt))
            kl.sum().backward()
        out[name] = (kl.detach(), hp.grad, wp.grad, probe.largest)
    kl, dh, dw, largest = out["tiles"]
    assert largest <= 4096 * 12 < vocab * 12
    torch.testing.assert_close(kl, out["whole"][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(dh, out["whole"][1].bfloat16(), rtol=1e-2, atol=1e-4)
    if trainable:
        torch.testing.assert_close(dw, out["whole"][2].bfloat16(), rtol=1e-2, atol=1e-4)
