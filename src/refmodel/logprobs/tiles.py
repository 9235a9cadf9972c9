"""Tile helpers shared by the vocabulary-tiled kernels: the log-prob kernel (:mod:`refmodel.logprobs.kernel`),
the exact KL (:mod:`refmodel.losses.kl_exact`) and the fused policy loss (:mod:`refmodel.losses.fused_policy`).

Each kernel walks rows in blocks and the vocabulary in tiles; these helpers are the parts they share: the block
sizes (:func:`block_shape`, the one rule, from the shape and the device), the logits of one tile (in float32
whatever the operands, transformed in place), the reusable CPU buffer, the ``coef @ W`` accumulation, and the
precision rules (accumulation dtype, when to upcast a low-precision weight and then one vocabulary tile at a
time, computing in the wider of two operand dtypes). Shapes: ``h [M, H]`` a row block, ``W [V, H]`` the head,
``b [V]`` its bias.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .transform import LogitTransform

HALF_DTYPES = (torch.bfloat16, torch.float16)

# The block-size rule (:func:`block_shape`), one for the three kernels. Its constants:
# - Liger's selective log-prob tile (``liger_kernel.chunked_loss.fused_linear_ppo``, 0.8.5): 2048 rows x 4096
#   vocabulary columns, what its chunked policy losses hold per tile whatever the shape.
LIGER_SELECTIVE_TILE = (2048, 4096)
# - The cap on one tile whatever the problem: 64 MiB of fp32 logits. Wider tiles gain nothing measurable.
MAX_TILE_ELEMENTS = 1 << 24
# - Rows per whole-vocabulary block of a trainable head: on CPU every GEMM against ``W`` (MKL/oneDNN) re-packs the
#   part of ``W`` it reads, ~1/rows of the math (benchmarks/bench_policy_loss.py --block-rows: the logits GEMM
#   1.46 units at 131 rows, 0.88-1.04 at 512-1024); on a GPU each block reads all of ``W`` from memory, and a
#   block of fewer than a few hundred rows is bound by that read rather than by the math.
WHOLE_VOCAB_ROWS = 512
# - Columns per vocabulary tile at least: each tile costs a handful of parallel regions (GEMM, max, exp, sum);
#   with a busy neighbour on the same cores every region waits for a descheduled thread, so fewer, wider tiles
#   cost less under load; 2048 columns also re-pack the row block only every 2048 columns.
MIN_TILE_COLS = 2048
# - Column multiple: GPU GEMM tiles (128) and CPU vector widths divide it.
TILE_ALIGN = 128


class BlockShape(NamedTuple):
    """Rows per block and vocabulary columns per tile (``cols == V`` for a whole-vocabulary block), and the
    vocabulary rows of a low-precision weight upcast at a time on CPU (``upcast_cols``)."""

    rows: int
    cols: int
    upcast_cols: int


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def liger_chunk_elements(n: int, hidden: int, vocab: int) -> int:
    """Logits Liger holds per chunk for ``n`` rows, hidden size ``hidden`` and ``vocab`` columns: the larger of its
    fused linear cross-entropy chunk (``ops/fused_linear_cross_entropy.py``: ``inc = ceil(V / H)``, ``rows =
    next_pow2(ceil(n / inc))``, i.e. about the size of the hidden states ``n x H``) and its selective log-prob tile
    (``min(n, 2048) x min(V, 4096)``, the chunked policy losses)."""
    inc = -(-vocab // max(hidden, 1))
    flce = min(n, _next_pow2(-(-n // inc))) * vocab
    selective = min(n, LIGER_SELECTIVE_TILE[0]) * min(vocab, LIGER_SELECTIVE_TILE[1])
    return max(flce, selective, 1)


def _align(cols: int, vocab: int) -> int:
    """``cols`` rounded down to a multiple of ``TILE_ALIGN`` (at least one multiple), at most ``vocab``."""
    if cols >= vocab:
        return vocab
    return min(vocab, max(TILE_ALIGN, cols - cols % TILE_ALIGN))


def block_shape(n: int, vocab: int, hidden: int, *, cuda: bool = False, whole_vocab: bool = False,
                trainable: bool = False, chunk: int | None = None, vocab_chunk: int | None = None) -> BlockShape:
    """The block sizes of the tiled kernels for ``n`` scored rows, ``vocab`` columns and hidden size ``hidden``:
    the one rule behind :func:`refmodel.token_logprobs`, :func:`refmodel.kl.exact` and
    :func:`refmodel.losses.fused_policy_loss` (``chunk`` / ``vocab_chunk``, the user's ``chunk_size`` /
    ``vocab_chunk_size``, override rows / columns).

    Budget: one ``[rows, cols]`` logits tile holds at most ``min(MAX_TILE_ELEMENTS, liger_chunk_elements(n, H, V))``
    elements (:func:`liger_chunk_elements`: about the hidden states' size, so it scales with the problem and never
    exceeds what Liger's chunk takes for the same shape).

    Vocabulary tiles (``whole_vocab=False``): as many rows as the budget allows with tiles of at least
    ``MIN_TILE_COLS`` columns (every row of a block re-reads each weight tile, every tile re-reads the row block:
    traffic ``~N V H (1/rows + 1/cols)``; on CPU the weight's packing is the ``1/rows`` part, so rows come first);
    on CUDA the rows are a power of two near the square root of the budget (GEMM tiles of both sides alike).

    Whole-vocabulary blocks (``whole_vocab=True``, the fused policy loss, whose per-token gradient needs the
    finished log-prob before the vocabulary's gradient): ``rows = budget // V``, at least 16, and for a trainable
    head at least ``min(WHOLE_VOCAB_ROWS, H)`` (each block's three GEMMs re-pack, on CPU, or re-read, on a GPU, the
    whole weight), which stays below Liger's trainable chunk (it holds a second ``[V, H]`` float32 weight
    gradient per chunk) since ``rows <= H``.

    ``upcast_cols``: the vocabulary rows of a bf16/fp16 weight upcast to float32 at a time on CPU (no
    ``mm(out_dtype=)`` there): the tile's columns, or for a whole-vocabulary block the budget's width at its
    rows, so the upcast copy is bounded by the tile budget, never ``V x H``.
    """
    n, vocab, hidden = max(n, 1), max(vocab, 1), max(hidden, 1)
    budget = min(MAX_TILE_ELEMENTS, liger_chunk_elements(n, hidden, vocab))
    if whole_vocab:
        rows = max(16, budget // vocab)
        if trainable:
            rows = max(rows, min(WHOLE_VOCAB_ROWS, hidden))
        rows = min(chunk or rows, n)
        return BlockShape(rows, vocab, _align(max(MIN_TILE_COLS, budget // rows), vocab))
    if chunk:
        rows = min(chunk, n)
    elif cuda:
        rows = min(n, _next_pow2(int(budget ** 0.5)))
    else:
        rows = min(n, max(1, budget // min(vocab, MIN_TILE_COLS)))
    cols = _align(vocab_chunk or max(1, budget // rows), vocab) if not vocab_chunk else min(vocab_chunk, vocab)
    return BlockShape(rows, cols, cols)


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The accumulation dtype for operands like ``t``: float32, or float64 for float64 inputs (so a float64
    gradcheck is meaningful)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def cpu_upcast(weight: torch.Tensor, hidden: torch.Tensor, fp32: bool = True) -> bool:
    """Whether a bf16/fp16 ``weight`` (and each row block) is upcast to float32 for the GEMMs: on CPU, which has no
    ``mm(out_dtype=float32)``, when float32 accumulation is asked (``fp32``). The weight is then upcast one
    vocabulary tile at a time (:func:`weight_tile`), never whole."""
    return fp32 and not hidden.is_cuda and weight.dtype in HALF_DTYPES


def weight_tile(weight: torch.Tensor, v0: int, v1: int, upcast: bool) -> torch.Tensor:
    """Rows ``[v0, v1)`` of ``weight [V, H]``: a view, or a float32 copy of just those rows when ``upcast``
    (:func:`cpu_upcast`), so the extra memory is one tile's, independent of ``V``."""
    tile = weight[v0:v1]
    return tile.float() if upcast else tile


def promote_operands(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(h, w, b)`` in the wider of ``h``'s and ``w``'s dtypes (e.g. bf16 hidden states with an fp32 head),
    unchanged when they agree."""
    if h.dtype == w.dtype:
        return h, w, b
    wide = torch.promote_types(h.dtype, w.dtype)
    return h.to(wide), w.to(wide), (b.to(wide) if b is not None else None)


def workspace(rows: int, cols: int, w: torch.Tensor, acc: torch.dtype, upcast: bool = False) -> torch.Tensor | None:
    """A reusable ``[rows, cols]`` logits buffer for :func:`tile_logits` on CPU (fresh pages per tile cost more
    than the math); None on CUDA, whose caching allocator already reuses blocks, or when the tiles are not computed
    in ``acc`` (``w`` in another dtype and not ``upcast``)."""
    if rows == 0 or w.is_cuda or (w.dtype != acc and not upcast):
        return None
    return torch.empty(rows, cols, dtype=acc, device=w.device)


def logits_fp32(h: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, fp32: bool,
                out: torch.Tensor | None) -> torch.Tensor:
    """``h [M, H] @ weight_t [H, V] (+ bias [V])`` as float32 (float64 for float64 inputs) ``[M, V]``, written
    into ``out`` when given (float32/float64 operands only). Without ``fp32`` a low-precision product is rounded
    to the operand dtype first, as the model's own head would."""
    if h.dtype in (torch.float32, torch.float64):
        z = torch.mm(h, weight_t, out=out) if out is not None else h @ weight_t
    elif fp32 and h.is_cuda:
        z = torch.mm(h, weight_t, out_dtype=torch.float32)
    else:
        z = (h @ weight_t).float()
    if bias is not None:
        z += bias.to(z.dtype)
    return z


def tile_logits(hb: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, v0: int, v1: int,
                tf: LogitTransform, fp32: bool, buf: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The transformed logits of vocabulary columns ``[v0, v1)`` for row block ``hb [M, H]``, with ``wt [v1 - v0, H]``
    those rows of the weight (:func:`weight_tile`): ``(z [M, v1 - v0], dz/da)`` with ``dz/da`` None when constant
    (``tf.const_deriv``). ``z`` lives in ``buf`` (from :func:`workspace`) when given, so it is only valid until the
    next call with the same buffer."""
    out = buf[: hb.shape[0], : v1 - v0] if buf is not None else None
    z = logits_fp32(hb, wt.t(), bias[v0:v1] if bias is not None else None, fp32, out)
    return z, tf.apply_(z)


def coef_matmul(coef: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``coef [M, K] @ w [K, H]`` with float32 accumulation (``coef`` cast to ``w``'s dtype on CUDA)."""
    if w.dtype in (torch.float32, torch.float64):
        return coef.to(w.dtype) @ w
    if w.is_cuda:
        return torch.mm(coef.to(w.dtype), w, out_dtype=torch.float32)
    return coef @ w.float()


def coef_matmul_into(coef: torch.Tensor, w: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """``out (+)= coef [M, K] @ w [K, H]`` in ``out``'s float32/float64, without an ``[M, H]`` temporary where
    the operands allow it. The kernels' second matmul: expected embeddings ``sum_j c_ij W_j`` and ``dW``."""
    if w.dtype == out.dtype:
        if accumulate:
            out.addmm_(coef.to(w.dtype), w)
        else:
            torch.mm(coef.to(w.dtype), w, out=out)
    elif accumulate:
        out.add_(coef_matmul(coef, w))
    else:
        out.copy_(coef_matmul(coef, w))


__all__ = ["HALF_DTYPES", "MAX_TILE_ELEMENTS", "MIN_TILE_COLS", "BlockShape", "acc_dtype",
           "block_shape", "coef_matmul", "coef_matmul_into", "cpu_upcast", "liger_chunk_elements", "logits_fp32",
           "promote_operands", "tile_logits", "weight_tile", "workspace", "WHOLE_VOCAB_ROWS"]
