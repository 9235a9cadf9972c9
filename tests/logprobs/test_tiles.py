"""The one block-size rule (``logprobs.tiles.block_shape``) and the tile-at-a-time upcast of a low-precision weight.

Tolerances: float32 against the naive full softmax 2e-5 absolute on log-probs and 1e-5 relative (to the scale) on
gradients, as ``test_head.py``; a bf16 weight upcast one tile at a time against the same weight upcast whole: the
same float32 products in the same order, so equal to 1e-6 (the gradients of bf16 leaves to one bf16 rounding).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from refmodel import token_logprobs
from refmodel.logprobs import naive_token_logprobs
from refmodel.logprobs.tiles import (
    MAX_TILE_ELEMENTS,
    MIN_TILE_COLS,
    TILE_ALIGN,
    WHOLE_VOCAB_ROWS,
    BlockShape,
    block_shape,
    liger_chunk_elements,
)

# (n, H, V) -> CPU tiles, CUDA tiles, whole-vocabulary trainable block (the same on both)
TABLE = [
    ((1024, 2048, 32000), (1024, 4096), (1024, 4096), 512),
    ((1024, 2048, 128256), (1024, 4096), (1024, 4096), 512),
    ((1024, 2048, 151936), (1024, 4096), (1024, 4096), 512),
    ((1024, 2048, 262144), (1024, 4096), (1024, 4096), 512),
    ((4096, 4096, 128256), (4096, 3968), (4096, 3968), 512),
    ((16384, 4096, 128256), (8192, 2048), (4096, 4096), 512),
    ((21, 16, 101), (21, 101), (21, 101), 21),
    ((300, 8, 5003), (300, 4096), (300, 4096), 245),
]


def test_liger_chunk_elements_is_liger_rule():
    # Liger's own example (ops/fused_linear_cross_entropy.py): BT = 16384, V = 32000, H = 4096 -> 2048-row chunks
    assert liger_chunk_elements(16384, 4096, 32000) == 2048 * 32000
    # at N = 1024, H = 2048 the fused cross-entropy chunk is ~N x H; the selective log-prob tile (1024 x 4096) is larger
    assert liger_chunk_elements(1024, 2048, 262144) == max(8 * 262144, 1024 * 4096)
    assert liger_chunk_elements(1, 64, 10) == 10  # at least one row of the vocabulary


@pytest.mark.parametrize("shape,cpu,cuda,whole_rows", TABLE)
def test_block_shapes_for_shapes_and_devices(shape, cpu, cuda, whole_rows):
    n, hidden, vocab = shape
    assert block_shape(n, vocab, hidden)[:2] == cpu
    assert block_shape(n, vocab, hidden, cuda=True)[:2] == cuda
    for dev in (False, True):
        whole = block_shape(n, vocab, hidden, cuda=dev, whole_vocab=True, trainable=True)
        assert (whole.rows, whole.cols) == (whole_rows, vocab)


@pytest.mark.parametrize("n", [1, 7, 300, 1024, 5000, 65536])
@pytest.mark.parametrize("hidden", [8, 896, 2048, 8192])
@pytest.mark.parametrize("vocab", [11, 5003, 32000, 151936, 262144])
@pytest.mark.parametrize("cuda", [False, True])
def test_block_shape_invariants(n, hidden, vocab, cuda):
    budget = min(MAX_TILE_ELEMENTS, liger_chunk_elements(n, hidden, vocab))
    s = block_shape(n, vocab, hidden, cuda=cuda)
    assert isinstance(s, BlockShape) and 1 <= s.rows <= n and 1 <= s.cols <= vocab
    assert s.rows * s.cols <= max(budget, s.rows * TILE_ALIGN)  # never above Liger's chunk (one aligned column block)
    assert s.cols == vocab or s.cols % TILE_ALIGN == 0
    if not cuda and n * min(vocab, MIN_TILE_COLS) <= budget:
        assert s.rows == n  # CPU: one row block packs each weight tile once
    whole = block_shape(n, vocab, hidden, cuda=cuda, whole_vocab=True, trainable=True)
    assert whole.cols == vocab and whole.rows <= n
    assert whole.rows >= min(n, WHOLE_VOCAB_ROWS, hidden)  # rows that amortize the weight's packing / reads
    assert whole.rows * vocab <= max(budget, min(WHOLE_VOCAB_ROWS, hidden) * vocab, 16 * vocab)
    assert whole.upcast_cols == vocab or whole.upcast_cols % TILE_ALIGN == 0
    frozen = block_shape(n, vocab, hidden, cuda=cuda, whole_vocab=True)
    assert frozen.rows == min(n, max(16, budget // vocab))


def test_overrides_win():
    assert block_shape(1000, 5000, 64, chunk=7, vocab_chunk=333)[:2] == (7, 333)
    assert block_shape(5, 5000, 64, chunk=7, vocab_chunk=9999)[:2] == (5, 5000)
    assert block_shape(1000, 5000, 64, whole_vocab=True, trainable=True, chunk=3)[:2] == (3, 5000)


def _inputs(n, h, v, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype)
    weight = torch.randn(v, h, generator=g, dtype=dtype) / h**0.25
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.2] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("v", [5003, 8191])
def test_default_tiles_that_do_not_divide_the_vocabulary_match_naive(v):
    """V = 5003 and 8191 with the rule's 4096-column tiles: a short last tile; values and gradients (fp32)."""
    hidden, weight, targets = _inputs(300, 8, v, seed=v)
    assert block_shape(300, v, 8).cols == 4096 and v % 4096
    upstream = torch.rand(300)
    got, want = [], []
    for fn, out in ((token_logprobs, got), (naive_token_logprobs, want)):
        hh, ww = (x.clone().requires_grad_() for x in (hidden, weight))
        r = fn(hh, ww, targets, return_entropy=True, softcap=4.0)
        ((r.logprobs * upstream).sum() + r.entropy.sum()).backward()
        out += [r.logprobs.detach(), r.entropy.detach(), hh.grad, ww.grad]
    for a, e in zip(got[:2], want[:2], strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=2e-5)
    for a, e in zip(got[2:], want[2:], strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))


@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weight_upcast_per_tile_equals_whole_upcast(trainable, dtype):
    """CPU, fp32 accumulation: the tile-by-tile upcast gives what upcasting the whole weight first gives."""
    hidden, weight, targets = _inputs(53, 24, 1001, dtype=dtype, seed=3)
    upstream = torch.rand(53)
    results = []
    for h, w in ((hidden, weight), (hidden.float(), weight.float())):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_(trainable)
        r = token_logprobs(hh, ww, targets, chunk_size=16, vocab_chunk_size=384, return_entropy=True)
        ((r.logprobs * upstream).sum() + r.entropy.sum()).backward()
        results.append([r.logprobs, r.entropy, hh.grad] + ([ww.grad] if trainable else []))
    tiled, whole = results
    for a, e in zip(tiled[:2], whole[:2], strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.detach(), e.detach(), rtol=1e-6, atol=1e-6)
    for a, e in zip(tiled[2:], whole[2:], strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a, e.to(dtype), rtol=1e-2, atol=1e-3)


class LargestFloat32(TorchDispatchMode):
    """The most elements of any float32 tensor an op produced (the upcast of a weight would be one)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def test_bf16_weight_extra_memory_does_not_grow_with_the_vocabulary():
    """The largest float32 buffer (forward and frozen-head backward) is one ``[rows, 2048]`` tile at V = 9000 and
    V = 36000 alike, far below one upcast weight ``V x H``: the weight is upcast one vocabulary tile at a time."""
    for v in (9000, 36000):
        hidden, weight, targets = _inputs(64, 32, v, dtype=torch.bfloat16, seed=1)
        hidden.requires_grad_()
        with LargestFloat32() as probe:
            token_logprobs(hidden, weight, targets, vocab_chunk_size=2048).sum().backward()
        assert probe.largest == int((targets != -100).sum()) * 2048 < v * 32
