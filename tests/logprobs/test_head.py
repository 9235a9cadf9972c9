"""The fused head against the naive full-logits implementation.

Tolerances: float64 inputs are compared by gradcheck (finite differences, its default 1e-5/1e-3).
float32: 2e-5 absolute on log-probs of magnitude < ~15 (fp32 rounding of a different summation
order); gradients 1e-5 relative to their scale. bf16 operands: with fp32 accumulation the logits are
exact fp32 products of the bf16 values, so the same 1e-4; without it the logits are bf16-rounded
(relative 2^-8 ~ 0.4%), so up to ~0.05 nats for logits of magnitude ~8.
"""

import pytest
import torch

from refmodel import token_logprobs
from refmodel.errors import InvalidInput
from refmodel.logprobs import TokenLogprobs, naive_token_logprobs

TRANSFORMS = [
    dict(),
    dict(temperature=0.7),
    dict(logit_scale=1.7),
    dict(softcap=3.0),
    dict(softcap=2.5, temperature=1.3, logit_scale=0.8),
]


def _inputs(n, h, v, dtype=torch.float32, ignore_frac=0.25, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype)
    weight = torch.randn(v, h, generator=g, dtype=dtype) / h**0.25
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore_frac] = -100
    b = torch.randn(v, generator=g, dtype=dtype) if bias else None
    return hidden, weight, targets, b


@pytest.mark.parametrize("tf", TRANSFORMS)
def test_gradcheck_float64(tf):
    """Vocabulary tiles of 4 over V=11: exercises the online rescaling of every accumulator."""
    hidden, weight, targets, bias = _inputs(7, 5, 11, torch.float64, bias=True)
    args = tuple(x.requires_grad_() for x in (hidden, weight, bias))

    def fn(h, w, b):
        r = token_logprobs(h, w, targets, bias=b, chunk_size=3, vocab_chunk_size=4, return_entropy=True, **tf)
        return r.logprobs, r.entropy

    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("n,h,v,chunk,vchunk", [(1, 8, 31, None, None), (3, 16, 47, 2, 10), (47, 32, 123, 10, 50),
                                                (31, 24, 1000, 7, 333), (64, 16, 50, 64, 7), (5, 8, 9, 2, 1)])
@pytest.mark.parametrize("tf", TRANSFORMS)
def test_matches_naive_fp32_values_and_grads(n, h, v, chunk, vchunk, tf):
    hidden, weight, targets, bias = _inputs(n, h, v, bias=True, seed=n)
    upstream = torch.rand(n)  # non-uniform per-token gradients
    results = []
    for fn in (token_logprobs, naive_token_logprobs):
        hh, ww, bb = (x.clone().requires_grad_() for x in (hidden, weight, bias))
        kwargs = dict(chunk_size=chunk, vocab_chunk_size=vchunk) if fn is token_logprobs else {}
        out = fn(hh, ww, targets, bias=bb, return_entropy=True, **tf, **kwargs)
        ((out.logprobs * upstream).sum() + (out.entropy * upstream.flip(0)).sum()).backward()
        results.append((out.logprobs.detach(), out.entropy.detach(), hh.grad, ww.grad, bb.grad))
    fused, naive = results
    assert fused[0].dtype == torch.float32
    torch.testing.assert_close(fused[0], naive[0], atol=2e-5, rtol=0)
    torch.testing.assert_close(fused[1], naive[1], atol=2e-5, rtol=0)
    for a, b in zip(fused[2:], naive[2:], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=1e-4)
    assert (fused[0][targets == -100] == 0).all()


def test_three_dim_input_and_custom_ignore_index():
    hidden = torch.randn(2, 5, 8)
    weight = torch.randn(13, 8)
    targets = torch.randint(0, 13, (2, 5))
    targets[0, 0] = 7
    targets[1, 4] = 7
    out = token_logprobs(hidden, weight, targets, ignore_index=7)
    ref = naive_token_logprobs(hidden, weight, targets, ignore_index=7)
    assert out.shape == (2, 5)
    assert out[0, 0] == 0 and out[1, 4] == 0
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


def test_all_ignored_and_empty_keep_the_graph():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    out = token_logprobs(hidden, weight, torch.full((4,), -100))
    assert torch.equal(out, torch.zeros(4))
    out.sum().backward()  # must not raise: the output is still part of the graph
    assert hidden.grad is None or torch.equal(hidden.grad, torch.zeros_like(hidden))
    empty = token_logprobs(torch.randn(0, 8), weight, torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,)


def test_frozen_head_gets_no_weight_grad():
    hidden, weight, targets, _ = _inputs(20, 8, 30)
    hidden.requires_grad_()
    token_logprobs(hidden, weight, targets).sum().backward()
    assert weight.grad is None and hidden.grad is not None


@pytest.mark.parametrize("fp32,atol", [(True, 1e-4), (False, 0.05)])
def test_bf16_against_fp32_reference(fp32, atol):
    hidden, weight, targets, _ = _inputs(40, 32, 300, torch.bfloat16)
    out = token_logprobs(hidden, weight, targets, fp32_accumulation=fp32, softcap=4.0, chunk_size=16,
                         vocab_chunk_size=64)
    ref = naive_token_logprobs(hidden.float(), weight.float(), targets, softcap=4.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    h = hidden.clone().requires_grad_()
    token_logprobs(h, weight, targets, softcap=4.0).sum().backward()
    hr = hidden.float().requires_grad_()
    naive_token_logprobs(hr, weight.float(), targets, softcap=4.0).sum().backward()
    assert h.grad.dtype == torch.bfloat16
    # bf16 gradient output: relative rounding 2^-8 of the largest entry
    torch.testing.assert_close(h.grad.float(), hr.grad, atol=hr.grad.abs().max().item() * 2**-7, rtol=0)


def test_mixed_dtypes_bf16_hidden_fp32_head():
    hidden, weight, targets, _ = _inputs(12, 16, 40)
    out = token_logprobs(hidden.bfloat16(), weight, targets)
    ref = naive_token_logprobs(hidden.bfloat16().float(), weight, targets)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


def test_entropy_result_type():
    hidden, weight, targets, _ = _inputs(6, 8, 20, ignore_frac=0.0)
    res = token_logprobs(hidden, weight, targets, return_entropy=True)
    assert isinstance(res, TokenLogprobs)
    assert (res.entropy > 0).all() and (res.entropy <= torch.log(torch.tensor(20.0)) + 1e-5).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number > 0"),
    (dict(logit_scale=-1.0), "logit_scale must be a finite number > 0"),
    (dict(softcap=0.0), "softcap must be a finite number > 0, got 0.0; or None"),
    (dict(chunk_size=0), "chunk_size must be None or an int >= 1"),
    (dict(vocab_chunk_size=2.5), "vocab_chunk_size must be None or an int >= 1"),
])
def test_bad_settings(kwargs, match):
    hidden, weight, targets, _ = _inputs(4, 8, 10)
    with pytest.raises(InvalidInput, match=match):
        token_logprobs(hidden, weight, targets, **kwargs)


def test_bad_shapes_and_ids():
    hidden, weight, targets, _ = _inputs(4, 8, 10, ignore_frac=0.0)
    with pytest.raises(InvalidInput, match=r"hidden must be \[N, H\]"):
        token_logprobs(torch.randn(4, 9), weight, targets)
    with pytest.raises(InvalidInput, match="targets must have shape"):
        token_logprobs(hidden, weight, targets[:3])
    with pytest.raises(InvalidInput, match="integer tensor"):
        token_logprobs(hidden, weight, targets.float())
    with pytest.raises(InvalidInput, match=r"bias must be \[V\]"):
        token_logprobs(hidden, weight, targets, bias=torch.zeros(11))
    bad = targets.clone()
    bad[2] = 10
    with pytest.raises(InvalidInput, match=r"target id 10 is outside the vocabulary \[0, 10\)"):
        token_logprobs(hidden, weight, bad)
    bad[2] = -5
    with pytest.raises(InvalidInput, match="target id -5"):
        token_logprobs(hidden, weight, bad)


def test_all_rows_scored_and_partly_scored_agree_in_grads():
    """Both the no-gather path (every row scored) and the per-block gather path, with tiny blocks."""
    hidden, weight, targets, _ = _inputs(30, 8, 40, ignore_frac=0.0)
    for t in (targets, torch.where(torch.arange(30) % 3 == 0, -100, targets)):
        outs = []
        for fn in (token_logprobs, naive_token_logprobs):
            h = hidden.clone().requires_grad_()
            kwargs = dict(chunk_size=4, vocab_chunk_size=9) if fn is token_logprobs else {}
            (fn(h, weight, t, **kwargs) * torch.linspace(0.1, 1, 30)).sum().backward()
            outs.append(h.grad)
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("ignored", [False, True])
def test_backward_twice_with_retain_graph_gives_the_same_gradient(entropy, ignored):
    # The first backward consumes the expected embeddings (they become dh in place); the second must
    # recompute them and give the same gradient.
    hidden, weight, targets, _ = _inputs(6, 8, 20)
    if ignored:
        targets[::3] = -100
    h = hidden.clone().requires_grad_()
    res = token_logprobs(h, weight, targets, chunk_size=2, vocab_chunk_size=7, return_entropy=entropy)
    out = (res.logprobs.sum() + 0.5 * res.entropy.sum()) if entropy else res.sum()
    out.backward(retain_graph=True)
    first = h.grad.clone()
    out.backward()
    torch.testing.assert_close(h.grad, 2 * first)
    h64 = hidden.double().requires_grad_()
    ref = naive_token_logprobs(h64, weight.double(), targets, return_entropy=entropy)
    ((ref.logprobs.sum() + 0.5 * ref.entropy.sum()) if entropy else ref.sum()).backward()
    torch.testing.assert_close(first, h64.grad.float(), atol=1e-5, rtol=1e-4)
