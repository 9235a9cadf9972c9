"""fused_policy_loss == policy_loss(token_logprobs(...)): values, statistics and gradients (hidden, head, bias).

Tolerances: float64 1e-11 relative / 1e-12 absolute (only the summation order differs); float32 1e-5
relative / 1e-6 absolute on the loss and 1e-4 / 1e-6 on the gradients (fp32 logits and log-sum-exp in
both paths, different blocking).
"""

from __future__ import annotations

import pytest
import torch
from loss_helpers import MatmulFlops, lora_head_policy
from torch.utils._python_dispatch import TorchDispatchMode

from refmodel import token_logprobs
from refmodel.errors import InvalidInput
from refmodel.logprobs import naive_token_logprobs
from refmodel.logprobs.model import backbone_of, unwrap_causal_lm
from refmodel.logprobs.tiles import block_shape
from refmodel.losses import fused_policy, fused_policy_loss, policy_loss
from refmodel.losses.kl import LMHead, exact
from refmodel.losses.policy import LOSS_AGG_MODES, LOSS_TYPES

F64 = dict(rtol=1e-11, atol=1e-12)
B, T, H, V = 3, 7, 16, 101


def _setup(dtype=torch.float64, seed=0, trainable=True, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=dtype).requires_grad_()
    w = (0.5 * torch.randn(V, H, generator=g, dtype=dtype)).requires_grad_(trainable)
    b = torch.randn(V, generator=g, dtype=dtype).requires_grad_(trainable) if bias else None
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[1] = False  # an empty completion
    mask[1, 0] = True
    y = torch.where(mask, y, torch.full_like(y, -100))  # padding ids are never read
    with torch.no_grad():
        lp = token_logprobs(h, w, y, bias=b)
    old = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)).to(dtype)
    ref = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)).to(dtype)
    rollout = old + 0.1 * torch.randn(B, T, generator=g, dtype=dtype)
    adv = torch.randn(B, generator=g, dtype=dtype)
    return h, w, b, y, mask, old, ref, rollout, adv


def _compare(h, w, b, y, mask, old, adv, head=None, tol=F64, grad_tol=None, **kw):
    head = head or {}
    fused = fused_policy_loss(h, w, y, old, adv, mask, head_bias=b, **head, **kw)
    unfused = policy_loss(token_logprobs(h, w, y, bias=b, **head), old, adv, mask, **kw)
    torch.testing.assert_close(fused.loss, unfused.loss, **tol)
    fm, um = fused.metrics(), unfused.metrics()
    assert fm.keys() == um.keys()
    for k in fm:
        assert fm[k] == pytest.approx(um[k], rel=1e-6, abs=1e-9), k
    leaves = [t for t in (h, w, b) if t is not None and t.requires_grad]
    got = torch.autograd.grad(fused.loss, leaves)
    want = torch.autograd.grad(unfused.loss, leaves)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, **(grad_tol or tol))
    return fused


@pytest.mark.parametrize("agg", [None, *LOSS_AGG_MODES])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_types_and_aggregations(loss_type, agg):
    h, w, b, y, mask, old, ref, _, adv = _setup(seed=LOSS_TYPES.index(loss_type))
    _compare(h, w, b, y, mask, old, adv, loss_type=loss_type, loss_agg_mode=agg, ref_logprobs=ref, beta=0.05,
             epsilon_high=5.0 if loss_type == "cispo" else 0.28)


@pytest.mark.parametrize("est", ["k1", "k2", "k3", "abs", "k3+", "low_var_kl", "mse"])
@pytest.mark.parametrize("bias_kl", [False, True])
def test_kl_estimators(est, bias_kl):
    h, w, b, y, mask, old, ref, _, adv = _setup(seed=1)
    _compare(h, w, b, y, mask, old, adv, ref_logprobs=ref, beta=0.2, kl_estimator=est, use_bias_correction_kl=bias_kl,
             dual_clip=2.0, delta=1.5)


@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])  # the sequence levels fall back
@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
@pytest.mark.parametrize("on_policy", [False, True])
def test_levels_rollout_is_and_on_policy(level, mode, on_policy):
    h, w, b, y, mask, old, ref, rollout, adv = _setup(seed=2)
    _compare(h, w, b, y, mask, None if on_policy else old, adv, importance_sampling_level=level, ref_logprobs=ref,
             beta=0.1, rollout_logprobs=rollout, vllm_importance_sampling_mode=mode,
             vllm_importance_sampling_clip_max=1.5, vllm_importance_sampling_clip_min=0.5)


@pytest.mark.parametrize("trainable,bias", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("head", [dict(), dict(temperature=0.7), dict(softcap=3.0, logit_scale=1.3, temperature=0.8)])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_frozen_trainable_bias_and_logit_transform(trainable, bias, head, chunk_size):
    h, w, b, y, mask, old, ref, _, adv = _setup(seed=3, trainable=trainable, bias=bias)
    _compare(h, w, b, y, mask, old, adv, head=dict(head, chunk_size=chunk_size), loss_type="grpo", ref_logprobs=ref,
             beta=0.04)


def test_float32_tolerances():
    h, w, b, y, mask, old, ref, _, adv = _setup(dtype=torch.float32, seed=4)
    _compare(h, w, b, y, mask, old, adv, tol=dict(rtol=1e-5, atol=1e-6), grad_tol=dict(rtol=1e-4, atol=1e-6),
             ref_logprobs=ref, beta=0.1, head=dict(softcap=5.0))


def test_bfloat16_head_and_hidden():
    """bf16 operands (CPU: upcast once, fp32 logits in both paths): loss 1e-3, gradients 2e-2 relative."""
    h, w, b, y, mask, old, ref, _, adv = _setup(dtype=torch.float32, seed=8, bias=False)
    h = h.detach().bfloat16().requires_grad_()
    w = w.detach().bfloat16().requires_grad_()
    _compare(h, w, None, y, mask, old, adv, tol=dict(rtol=1e-3, atol=1e-4), grad_tol=dict(rtol=2e-2, atol=1e-3),
             ref_logprobs=ref, beta=0.1)


def test_full_kl_term_keeps_its_gradient():
    h, w, b, y, mask, old, ref, _, adv = _setup(seed=5)
    hr = torch.randn(B, T, 8, dtype=torch.float64)
    wr = torch.randn(V, 8, dtype=torch.float64)
    fused = fused_policy_loss(h, w, y, old, adv, mask, head_bias=b, beta=0.1, kl_estimator="full",
                              full_kl=exact(h, LMHead(w, b), hr, wr, mask))
    unfused = policy_loss(token_logprobs(h, w, y, bias=b), old, adv, mask, beta=0.1, kl_estimator="full",
                          full_kl=exact(h, LMHead(w, b), hr, wr, mask))
    torch.testing.assert_close(fused.loss, unfused.loss, **F64)
    for a, e in zip(torch.autograd.grad(fused.loss, [h, w, b]), torch.autograd.grad(unfused.loss, [h, w, b]),
                    strict=True):
        torch.testing.assert_close(a, e, **F64)


def test_tiny_family_heads(tiny, family):
    """Real heads: llama (untied), gpt2 (tied), gemma2 (tied, soft-capped) with their config's transform."""
    model, _ = tiny
    head = LMHead.from_model(model)
    g = torch.Generator().manual_seed(6)
    vocab, hidden = head.weight.shape
    h = torch.randn(2, 5, hidden, generator=g, requires_grad=True)
    y = torch.randint(0, vocab, (2, 5), generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        lp = token_logprobs(h, head.weight, y, softcap=head.softcap)
    old = lp + 0.1 * torch.randn(2, 5, generator=g)
    _compare(h, head.weight, head.bias, y, mask, old, torch.tensor([1.0, -0.5]), head=dict(softcap=head.softcap),
             tol=dict(rtol=1e-5, atol=1e-6), grad_tol=dict(rtol=1e-4, atol=1e-6), ref_logprobs=old, beta=0.1)


@pytest.mark.parametrize("family,kind", [("llama", "lora"), ("gemma2", "lora"), ("llama", "modules_to_save")])
def test_lora_on_the_head_equals_the_models_full_logits(tiny_model_dirs, family, kind):
    """fused_policy_loss(hidden, LMHead.from_model(policy), ...) with a real PEFT adapter on lm_head equals
    policy_loss over log_softmax of the model's own logits: the loss and the gradient of every trainable
    parameter (head lora_A / lora_B or its modules_to_save copy, the backbone's adapters). float64, 1e-10."""
    from refmodel.testing import load_tiny

    policy, _ = lora_head_policy(load_tiny(tiny_model_dirs[family])[0], kind)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(6, policy.config.vocab_size, (3, 8), generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.3
    mask[0, 0] = True
    targets = torch.where(mask, ids[:, 1:], -100)
    old = -3 + 0.5 * torch.randn(3, 7, generator=g, dtype=torch.float64)
    ref = old + 0.2 * torch.randn(3, 7, generator=g, dtype=torch.float64)
    adv = torch.randn(3, generator=g, dtype=torch.float64)
    named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opts = dict(loss_type="dapo", ref_logprobs=ref, beta=0.1, temperature=0.8)
    hidden = backbone_of(unwrap_causal_lm(policy))(input_ids=ids)[0][:, :-1]
    fused = fused_policy_loss(hidden, LMHead.from_model(policy), targets, old, adv, mask, **opts)
    logits = policy(input_ids=ids).logits[:, :-1].double() / 0.8
    logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    naive = policy_loss(logps, old, adv, mask, loss_type="dapo", ref_logprobs=ref, beta=0.1)
    torch.testing.assert_close(fused.loss, naive.loss, rtol=1e-10, atol=1e-12)
    got, want = torch.autograd.grad(fused.loss, params), torch.autograd.grad(naive.loss, params)
    for (name, _), a, b in zip(named, got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    head_grads = [a for (name, _), a in zip(named, got, strict=True) if "lm_head" in name]
    assert head_grads and all(a.abs().sum() > 0 for a in head_grads), "the head's adapter must train"


def test_an_lmhead_brings_its_own_bias_and_transform():
    h, w, b, y, mask, old, ref, _, adv = _setup()
    head = LMHead(w, b, 1.3, 4.0)
    fused = fused_policy_loss(h, head, y, old, adv, mask, ref_logprobs=ref, beta=0.1)
    plain = fused_policy_loss(h, w, y, old, adv, mask, head_bias=b, logit_scale=1.3, softcap=4.0, ref_logprobs=ref,
                              beta=0.1)
    torch.testing.assert_close(fused.loss, plain.loss, **F64)
    with pytest.raises(InvalidInput, match="brings its own bias"):
        fused_policy_loss(h, head, y, old, adv, mask, head_bias=b)
    with pytest.raises(InvalidInput, match="hidden must be"):
        fused_policy_loss(h[..., :3], head, y, old, adv, mask)


def test_bad_input():
    h, w, b, y, mask, old, ref, _, adv = _setup()
    with pytest.raises(InvalidInput, match="unknown option"):
        fused_policy_loss(h, w, y, old, adv, mask, loss_typ="grpo")
    with pytest.raises(InvalidInput, match="targets"):
        fused_policy_loss(h, w, y[:, :3], old, adv, mask)
    with pytest.raises(InvalidInput, match="hidden"):
        fused_policy_loss(h[0], w, y, old, adv, mask)
    bad = y.clone()
    bad[0, 0], mask2 = V + 3, mask.clone()
    mask2[0, 0] = True
    with pytest.raises(InvalidInput, match="outside the vocabulary"):
        fused_policy_loss(h, w, bad, old, adv, mask2)
    with pytest.raises(InvalidInput, match="ref_logprobs is None"):
        fused_policy_loss(h, w, y, old, adv, mask, beta=0.1)


def test_second_backward_through_the_same_graph_is_a_clear_error():
    h, w, b, y, mask, old, ref, _, adv = _setup(seed=7)
    out = fused_policy_loss(h, w, y, old, adv, mask, head_bias=b)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.loss.backward()


@pytest.mark.parametrize("trainable,fused_units,unfused_units", [(False, 2, 2), (True, 3, 4)])
def test_matmul_units_frozen_two_trainable_three(trainable, fused_units, unfused_units):
    """The cost claim, counted exactly: one unit = 2 N H V (the head matmul of the scored rows)."""
    h, w, b, y, mask, old, ref, _, adv = _setup(dtype=torch.float32, seed=9, trainable=trainable, bias=False)
    unit = 2 * int(mask.sum()) * H * V
    for fn, want in ((lambda: fused_policy_loss(h, w, y, old, adv, mask, ref_logprobs=ref, beta=0.1, chunk_size=4),
                      fused_units),
                     (lambda: policy_loss(token_logprobs(h, w, y), old, adv, mask, ref_logprobs=ref, beta=0.1),
                      unfused_units)):
        counter = MatmulFlops()
        with counter:
            fn().loss.backward()
        assert counter.flops == want * unit


def test_frozen_head_takes_the_unfused_path_a_trainable_one_the_fused():
    """``fused_pays``: 2 units either way for a frozen head, so the unfused kernel (tiles within the budget); 3 against
    4 for a trainable head (or bias)."""
    w = torch.zeros(5, 3)
    assert not fused_policy.fused_pays(w, None)
    assert fused_policy.fused_pays(w.requires_grad_(), None)
    assert fused_policy.fused_pays(torch.zeros(5, 3), torch.zeros(5, requires_grad=True))
    with torch.no_grad():
        assert not fused_policy.fused_pays(w, None)


@pytest.mark.parametrize("dtype,tol,grad_tol", [(torch.float64, F64, F64),
                                                (torch.float32, dict(rtol=1e-5, atol=1e-6), dict(rtol=1e-4, atol=1e-6))])
def test_fused_kernel_with_a_frozen_head_equals_the_path_it_delegates_to(monkeypatch, dtype, tol, grad_tol):
    """The fused kernel still runs a frozen head when asked (as it would wherever it paid): same loss and dh as the
    unfused path that ``fused_policy_loss`` takes for a frozen head."""
    h, w, b, y, mask, old, ref, _, adv = _setup(dtype=dtype, seed=11, trainable=False, bias=False)
    kw = dict(loss_type="dapo", ref_logprobs=ref, beta=0.04)
    taken = fused_policy_loss(h, w, y, old, adv, mask, **kw)
    assert taken.per_token_loss.requires_grad  # the unfused path (the fused one detaches it)
    monkeypatch.setattr(fused_policy, "fused_pays", lambda weight, bias: True)
    fused = fused_policy_loss(h, w, y, old, adv, mask, chunk_size=5, **kw)
    assert not fused.per_token_loss.requires_grad
    torch.testing.assert_close(fused.loss, taken.loss, **tol)
    (g_fused,), (g_taken,) = torch.autograd.grad(fused.loss, [h]), torch.autograd.grad(taken.loss, [h])
    torch.testing.assert_close(g_fused, g_taken, **grad_tol)


def test_trainable_head_matches_naive_where_upcast_tiles_do_not_divide_the_vocabulary():
    """fp32, V = 4099 (two 4096-column upcast tiles would leave 3), row blocks of 5 over 12 rows: the fused loss against
    ``policy_loss(naive_token_logprobs(...))``, values and gradients (1e-5 / 1e-4 relative, as float32 above)."""
    g = torch.Generator().manual_seed(12)
    vocab = 4099
    h = torch.randn(2, 9, 16, generator=g).requires_grad_()
    w = (0.5 * torch.randn(vocab, 16, generator=g)).requires_grad_()
    y = torch.randint(0, vocab, (2, 9), generator=g)
    mask = torch.rand(2, 9, generator=g) > 0.3
    old = -8 + 0.3 * torch.randn(2, 9, generator=g)
    adv = torch.randn(2, generator=g)
    fused = fused_policy_loss(h, w, y, old, adv, mask, chunk_size=5, softcap=4.0, loss_type="grpo")
    naive = policy_loss(naive_token_logprobs(h, w, torch.where(mask, y, -100), softcap=4.0), old, adv, mask,
                        loss_type="grpo")
    torch.testing.assert_close(fused.loss, naive.loss, rtol=1e-5, atol=1e-6)
    for a, e in zip(torch.autograd.grad(fused.loss, [h, w]), torch.autograd.grad(naive.loss, [h, w]), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6 * float(e.abs().max()))


class _LargestUpcast(TorchDispatchMode):
    """The most elements of any float32 copy (``_to_copy``) an op made: an upcast weight would be ``V x H``."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ == "_to_copy" and out.dtype == torch.float32:
            self.largest = max(self.largest, out.numel())
        return out


def test_bf16_trainable_head_upcasts_one_tile_at_a_time_and_equals_the_whole_upcast():
    """bf16 hidden and a trainable bf16 head on CPU (fp32 accumulation), V = 9001: the weight is upcast in tiles of
    the rule's ``upcast_cols`` (4608 rows, then 4393), never whole, and the loss and gradients equal those of the
    same values upcast to float32 first (loss 1e-5 relative; gradients to one bf16 rounding)."""
    g = torch.Generator().manual_seed(13)
    vocab, hidden = 9001, 16
    cols = block_shape(18, vocab, hidden, whole_vocab=True, trainable=True).upcast_cols
    assert cols == 4608
    h32 = torch.randn(2, 9, hidden, generator=g)
    w32 = 0.5 * torch.randn(vocab, hidden, generator=g)
    y = torch.randint(0, vocab, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.bool)
    old = -8 + 0.3 * torch.randn(2, 9, generator=g)
    adv = torch.randn(2, generator=g)
    out = {}
    for name, dt in (("tiles", torch.bfloat16), ("whole", torch.float32)):
        h = h32.bfloat16().to(dt).requires_grad_()
        w = w32.bfloat16().to(dt).requires_grad_()
        with _LargestUpcast() as probe:
            loss = fused_policy_loss(h, w, y, old, adv, mask, loss_type="grpo").loss
            loss.backward()
        out[name] = (loss, h.grad, w.grad, probe.largest)
    loss, dh, dw, largest = out["tiles"]
    assert largest == cols * hidden < vocab * hidden
    torch.testing.assert_close(loss, out["whole"][0], rtol=1e-5, atol=1e-6)
    assert dh.dtype == dw.dtype == torch.bfloat16
    torch.testing.assert_close(dh, out["whole"][1].bfloat16(), rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(dw, out["whole"][2].bfloat16(), rtol=1e-2, atol=1e-4)
