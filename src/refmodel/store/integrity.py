"""What a shard's checksums cannot vouch for: file kinds, spans, lengths, values, sums and key order.

A checksum only says the bytes are the ones the writer wrote; a crafted or buggy shard can carry a valid
checksum over entries that lie. These rules are checked before anything is allocated or sliced from an
entry, and every failure is a :class:`~refmodel.errors.StoreCorrupt` naming the shard (and the entry),
so it stays confined to that shard:

- only regular files are opened (no FIFO, which would block the reader, no directory, no symlink);
- per shard, on open: every entry's span ``offset..offset+count`` lies inside the values tensor, its
  scored span ``start..start+count`` inside ``seq_len``, ``seq_len <= MAX_SEQ_LEN``; keys strictly
  increasing (sorted, which lookups rely on, and unique);
- per entry, on read: values finite and ``<= LOGPROB_SLACK`` (log-probs), and the stored sum equal to
  the values' sum within :func:`sum_tolerance`.

Messages end with ``hint`` (the caller's repair advice), so this module needs nothing from its callers.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

import numpy as np

from ..errors import StoreCorrupt

# Longest sequence a shard may describe, in tokens: bounds what ``entries()`` allocates per entry
# (64 MiB of float32) whatever a shard says. 2**24 is above every released context length.
MAX_SEQ_LEN = 2**24
# Largest log-prob accepted, in nats. A log-prob is <= 0; the slack admits the rounding of a near-certain
# token (a target logit computed by another matmul than the log-sum-exp), never a probability above ~1.01.
LOGPROB_SLACK = 1e-2
# Unit roundoff of each storage dtype, and half its smallest subnormal (the absolute error of a value
# that underflows): the sum is taken in float64 over the float32 values *before* the storage cast.
_ROUNDOFF = {"float32": (2.0**-24, 2.0**-150), "bfloat16": (2.0**-9, 2.0**-134), "float16": (2.0**-11, 2.0**-25)}


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device or special file"


def open_regular(path: Path, flags: int = os.O_RDONLY, hint: str = "") -> int:
    """File descriptor of ``path`` opened with ``flags``, if it is a regular file; else StoreCorrupt.

    ``O_NOFOLLOW`` refuses a symlink (a lock or shard must not lead outside the store) and ``O_NONBLOCK``
    keeps a FIFO from blocking the open; the kind is then checked on the open descriptor (no race).
    Other ``OSError`` s (missing, no permission) propagate for the caller to word.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreCorrupt(f"{path} is a symbolic link, expected a regular file inside the store "
                               f"(remove the link){hint}") from None
        if exc.errno == errno.EISDIR:
            raise StoreCorrupt(f"{path} is a directory, expected a regular file{hint}") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise StoreCorrupt(f"{path} is {_kind(mode)}, expected a regular file{hint}")
    os.set_blocking(fd, True)
    return fd


def read_regular(path: Path, limit: int, hint: str = "") -> bytes:
    """The bytes of regular file ``path``, refused (StoreCorrupt) beyond ``limit`` bytes before reading."""
    fd = open_regular(path, hint=hint)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fd).st_size
        if size > limit:
            raise StoreCorrupt(f"{path} has {size} bytes, more than the {limit} a store file of this kind may "
                               f"have{hint}")
        return fh.read(limit + 1)


def remove_path(path: Path) -> None:
    """Remove whatever sits at ``path`` in the store: a link (not its target), a file, a FIFO or a directory."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def check_entries(where: str, keys: np.ndarray, meta: np.ndarray, n_values: int, hint: str = "") -> None:
    """Spans, lengths and key order of a shard's ``N`` entries, vectorized; StoreCorrupt naming the first bad one.

    ``keys`` U8 [N, 16]; ``meta`` [N, 5] (offset, count, start, seq_len, crc), U32 or I64 (version 1);
    ``n_values`` the length of the shard's values tensor.
    """
    m = meta.astype(np.int64)[:, :4]  # U32 fits; I64 (version 1) may be negative or huge
    offset, count, start, seq_len = m.T
    rules = (((m < 0).any(axis=1), "has a negative offset, count, start or length"),
             (seq_len > MAX_SEQ_LEN, f"claims a sequence longer than {MAX_SEQ_LEN} tokens"),
             (count > n_values - np.minimum(offset, n_values), f"points outside the shard's {n_values} values"),
             (start > seq_len - np.minimum(count, seq_len), "has a scored span past the end of its sequence"))
    for bad, what in rules:
        rows = np.flatnonzero(bad)
        if rows.size:
            row = int(rows[0])
            o, c, s, t = (int(x) for x in m[row])
            raise StoreCorrupt(f"entry {row} (key {keys[row].tobytes().hex()}) of store shard {where} {what} "
                               f"(offset {o}, count {c}, start {s}, seq_len {t}){hint}")
    if len(keys) > 1:
        be = np.ascontiguousarray(keys).view(">u8").astype(np.uint64)  # [N, 2]: the key as two big-endian halves
        hi, lo = be[:, 0], be[:, 1]
        rising = (hi[1:] > hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo[1:] > lo[:-1]))
        rows = np.flatnonzero(~rising)
        if rows.size:
            row = int(rows[0]) + 1
            same = keys[row].tobytes() == keys[row - 1].tobytes()
            raise StoreCorrupt(f"entry {row} (key {keys[row].tobytes().hex()}) of store shard {where} "
                               f"{'repeats the key of entry ' if same else 'is out of key order after entry '}"
                               f"{row - 1}; keys must be sorted and unique{hint}")


def sum_tolerance(values: np.ndarray, dtype: str) -> float:
    """Largest |stored sum - sum(values)| that rounding explains, for float32 ``values`` read back from ``dtype``.

    The sum was taken in float64 over the float32 values before the storage cast, then stored as float32:
    each stored value is off by at most ``u |v| + tiny`` (``u`` the storage dtype's unit roundoff, ``tiny``
    half its smallest subnormal), and the float32 sum by ``2**-24 |sum|``. Twice that bound is allowed.
    """
    u, tiny = _ROUNDOFF[dtype]
    mass = float(np.abs(values.astype(np.float64)).sum())
    return 2.0 * ((u + 2.0**-24) * mass + tiny * values.shape[0]) + 2.0**-149


def logprob_problem(values: np.ndarray) -> str | None:
    """Why float32 ``values`` are not log-probs (NaN, inf, or above ``LOGPROB_SLACK``), or None."""
    finite = np.isfinite(values)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        return f"value {i} is {float(values[i])} (log-probs are finite)"
    if values.size and float(values.max()) > LOGPROB_SLACK:
        i = int(np.argmax(values))
        return f"value {i} is {float(values[i])} > 0 (log-probs are <= 0, up to {LOGPROB_SLACK} of rounding)"
    return None


def check_values(where: str, row: int, key: bytes, values: np.ndarray, total: float, dtype: str,
                 hint: str = "") -> None:
    """One entry's float32 ``values`` and stored ``total``: log-probs, and the sum of the values; else StoreCorrupt."""
    problem = logprob_problem(values)
    if problem is None and not np.isfinite(total):
        problem = f"its stored sum is {total}"
    if problem is None:
        got = float(values.astype(np.float64).sum())
        tol = sum_tolerance(values, dtype)
        if abs(float(total) - got) > tol:
            problem = f"its stored sum {total} is not the sum {got} of its {values.shape[0]} values (tolerance {tol:.3g})"
    if problem is not None:
        raise StoreCorrupt(f"entry {row} (key {key.hex()}) of store shard {where} holds no valid log-probs: "
                           f"{problem}{hint}")
