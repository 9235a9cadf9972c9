"""Tile helpers shared by the vocabulary-tiled kernels: the log-prob kernel (:mod:`refmodel.logprobs.kernel`),
the exact KL (:mod:`refmodel.losses.kl_exact`) and the fused policy loss (:mod:`refmodel.losses.fused_policy`).

Each kernel walks rows in blocks and the vocabulary in tiles; these helpers are the parts they share: the tile
shape, the logits of one tile (in float32 whatever the operands, transformed in place), the reusable CPU
buffer, the ``coef @ W`` accumulation, and the precision rules (accumulation dtype, when to upcast a
low-precision weight, computing in the wider of two operand dtypes). Shapes: ``h [M, H]`` a row block,
``W [V, H]`` the head, ``b [V]`` its bias.
"""

from __future__ import annotations

import torch

from .transform import LogitTransform

# Logits budget of one [rows, vocab-tile] tile (elements): 8 MiB in fp32. Temporaries are a small multiple
# of it, far below the full logits, while tiles stay large enough for an efficient GEMM.
DEFAULT_CHUNK_ELEMENTS = 1 << 21
HALF_DTYPES = (torch.bfloat16, torch.float16)


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The accumulation dtype for operands like ``t``: float32, or float64 for float64 inputs (so a float64
    gradcheck is meaningful)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def cpu_upcast(weight: torch.Tensor, hidden: torch.Tensor, fp32: bool = True) -> bool:
    """Whether to upcast a bf16/fp16 ``weight`` (and each row block) to float32 once per call: on CPU, which has
    no ``mm(out_dtype=float32)``, when float32 accumulation is asked (``fp32``)."""
    return fp32 and not hidden.is_cuda and weight.dtype in HALF_DTYPES


def promote_operands(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(h, w, b)`` in the wider of ``h``'s and ``w``'s dtypes (e.g. bf16 hidden states with an fp32 head),
    unchanged when they agree."""
    if h.dtype == w.dtype:
        return h, w, b
    wide = torch.promote_types(h.dtype, w.dtype)
    return h.to(wide), w.to(wide), (b.to(wide) if b is not None else None)


def tile_shape(n: int, vocab: int, chunk: int | None, vocab_chunk: int | None) -> tuple[int, int]:
    """``(rows per block, vocab columns per tile)`` for a logits tile of ~``DEFAULT_CHUNK_ELEMENTS``; ``chunk``
    and ``vocab_chunk`` override either (the user's ``chunk_size`` / ``vocab_chunk_size``).

    Every row block re-reads the whole weight and every vocab tile re-reads the row block, so the
    memory traffic is ~``N*V*H*(1/rows + 1/cols)``: square-ish tiles minimise it for a fixed budget.
    """
    rows = chunk or min(n, 1 << (DEFAULT_CHUNK_ELEMENTS.bit_length() // 2))
    cols = vocab_chunk or max(128, DEFAULT_CHUNK_ELEMENTS // max(rows, 1))
    return max(1, min(rows, n)), min(cols, vocab)


def workspace(rows: int, cols: int, w: torch.Tensor, acc: torch.dtype) -> torch.Tensor | None:
    """A reusable ``[rows, cols]`` logits buffer for :func:`tile_logits` on CPU (fresh pages per tile cost more
    than the math); None on CUDA, whose caching allocator already reuses blocks, or when ``w`` is not in ``acc``."""
    if rows == 0 or w.is_cuda or w.dtype != acc:
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


def tile_logits(hb: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, v0: int, v1: int,
                tf: LogitTransform, fp32: bool, buf: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The transformed logits of vocabulary columns ``[v0, v1)`` for row block ``hb [M, H]``: ``(z [M, v1 - v0],
    dz/da)`` with ``dz/da`` None when constant (``tf.const_deriv``). ``z`` lives in ``buf`` (from
    :func:`workspace`) when given, so it is only valid until the next call with the same buffer."""
    out = buf[: hb.shape[0], : v1 - v0] if buf is not None else None
    z = logits_fp32(hb, w[v0:v1].t(), bias[v0:v1] if bias is not None else None, fp32, out)
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


__all__ = ["DEFAULT_CHUNK_ELEMENTS", "HALF_DTYPES", "acc_dtype", "coef_matmul", "coef_matmul_into", "cpu_upcast",
           "logits_fp32", "promote_operands", "tile_logits", "tile_shape", "workspace"]
