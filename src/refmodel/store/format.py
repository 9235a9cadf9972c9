"""On-disk format of one store shard: a plain safetensors file, written and memory-mapped by hand.

A shard holds ``N`` entries sorted by key and these tensors (readable with ``safetensors.torch.load_file``
or any safetensors reader, no refmodel needed):

    keys    U8  [N, 16]  blake2b-128 of the exact token ids (int64 little-endian), see :func:`key_of`
    meta    U32 [N, 5]   (offset into values, count, start, seq_len, crc32) per entry (I64 in version 1)
    sums    F32 [N]      per-sequence sum of the scored log-probs, taken before the storage cast
    values  F32|BF16|F16 [M]  token log-probs of each entry's scored span, positions start..start+count-1

``__metadata__`` names the format, version, fingerprint, storage dtype and ``data_blake2b``, the
checksum of every byte after the header. Each entry's ``crc32`` covers its key, count, start,
seq_len, value bytes and (since version 3) its float32 sum, so a single read checks exactly the bytes
it returns. Versions 1 and 2 (whose crc leaves the sum out) are still read with their own crc rule.
What a checksum cannot vouch for (spans, lengths, key order, finite log-probs, each sum equal to its
values' sum) is checked by :mod:`refmodel.store.integrity` on open and on every read.

We write the file ourselves rather than with ``safetensors.torch.save`` so that the layout (and hence
the bytes) is fixed by this module and the data checksum can go into the header in one pass.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import mmap
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..errors import InvalidInput, StorageError, StoreCorrupt
from ..models.dtypes import DTYPE_NAMES, SAFETENSORS_CODES, dtype_name, parse_dtype
from .integrity import MAX_SEQ_LEN, check_entries, check_values, logprob_problem, open_regular

FORMAT = "refmodel-logprob-store"
VERSION = 3
# Version 1 differs from 2 only in an I64 meta tensor; version 3 adds the sum to each entry's crc.
READABLE_VERSIONS = (1, 2, 3)
SUM_IN_CRC = 3  # first version whose entry crc covers the per-sequence sum
KEY_BYTES = 16
DTYPES = {name: SAFETENSORS_CODES[name] for name in DTYPE_NAMES}  # storage dtype -> safetensors code
_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8, "U32": 4, "U8": 1}
_NP = {"F32": np.float32, "BF16": np.uint16, "F16": np.float16, "I64": np.int64, "U32": np.uint32, "U8": np.uint8}


def normalize_dtype(dtype) -> str:
    """``"float32" | "bfloat16" | "float16"`` from a name, alias or torch dtype (one parser: ``models.dtypes``)."""
    parsed = parse_dtype(dtype, allowed=tuple(DTYPES), what="storage dtype")
    if parsed is None:
        raise InvalidInput(f"a storage dtype is required; expected one of {sorted(DTYPES)}")
    return dtype_name(parsed)


def ids_array(input_ids) -> np.ndarray:
    """Token ids (list, numpy or torch, 1-D) as a contiguous int64 numpy array."""
    if isinstance(input_ids, torch.Tensor):
        arr = input_ids.detach().to("cpu", torch.int64).numpy()
    else:
        arr = np.asarray(input_ids)
        if arr.dtype.kind not in "iu" and arr.size:
            raise InvalidInput(f"input_ids must be integer token ids, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
    if arr.ndim != 1:
        raise InvalidInput(f"input_ids must be one sequence [T], got shape {tuple(arr.shape)}")
    return np.ascontiguousarray(arr)


def key_bytes(ids: np.ndarray) -> bytes:
    """16-byte key of an int64 id array (see :func:`key_of`)."""
    return hashlib.blake2b(ids.astype("<i8", copy=False).tobytes(), digest_size=KEY_BYTES).digest()


def key_of(input_ids) -> str:
    """Hex key of one sequence: blake2b-128 over its token ids as int64 little-endian bytes.

    The key depends on the exact ids only (not on dataset row, padding or order), so shuffled,
    filtered or merged datasets find their entries.
    """
    return key_bytes(ids_array(input_ids)).hex()


def entry_crc(key: bytes, count: int, start: int, seq_len: int, value_bytes, total=None) -> int:
    """crc32 of one entry: key, count, start, seq_len, stored value bytes and, when given, the sum.

    ``total`` is the stored float32 sum (its 4 little-endian bytes enter the crc); version 1/2 shards
    pass None (their crc leaves the sum out).
    """
    crc = zlib.crc32(value_bytes, zlib.crc32(key + struct.pack("<qqq", count, start, seq_len)))
    return crc if total is None else zlib.crc32(struct.pack("<f", total), crc)  # exact for a float32 value


def repair_hint(root) -> str:
    """How to repair the store at ``root`` (the advice every corruption error ends with)."""
    return (f"`refmodel store repair {root} --model MODEL --data DATA` rescores the damaged shards (a store "
            f"made by `refmodel precompute`: give the model and data it was made from), "
            f"`refmodel store repair {root} --drop` removes them (a hand-filled store)")


def storage_error(path, exc: OSError, doing: str = "write") -> StorageError:
    """A one-line :class:`StorageError` for an ``OSError`` on ``path``: what failed, why, what to do."""
    name = errno.errorcode.get(exc.errno or 0, "")
    cause = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        advice = "free some space (or choose a folder on a larger disk) and run the same command again"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        advice = "check the permissions of the folder (or choose another one)"
    elif exc.errno == errno.EROFS:
        advice = "the filesystem is read-only; choose a writable folder"
    else:
        advice = "fix the cause and run the same command again"
    return StorageError(f"cannot {doing} {path}: {cause}{f' ({name})' if name else ''}; {advice} "
                        "(nothing half-written is left behind)")


def encode_values(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> the storage array (bfloat16 as uint16 bit patterns, round to nearest even)."""
    if dtype == "float32":
        return values.astype(np.float32)
    if dtype == "float16":
        with np.errstate(over="ignore"):  # an overflow to -inf is refused by write_shard, with its reason
            return values.astype(np.float16)
    return torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def decode_values(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Storage array -> float32 (a fresh array)."""
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)


@dataclass
class Entry:
    """One sequence to write: its key, length, scored span and float32 values of that span."""

    key: bytes
    seq_len: int
    start: int
    values: np.ndarray  # float32 [count]
    total: float  # sum of the scored log-probs (float32 input, summed in float64)


def make_entry(ids: np.ndarray, logps: np.ndarray, mask: np.ndarray) -> Entry:
    """Entry of one sequence: int64 ids [T], float32 log-probs [T], bool score mask [T].

    Keeps the span from the first to the last scored position (unscored positions inside it as 0).
    """
    scored = np.flatnonzero(mask)
    start = int(scored[0]) if scored.size else 0
    stop = int(scored[-1]) + 1 if scored.size else 0
    values = np.where(mask[start:stop], logps[start:stop], 0.0).astype(np.float32)
    return Entry(key_bytes(ids), int(ids.shape[0]), start, values, float(values.astype(np.float64).sum()))


def write_shard(path: Path, entries: list[Entry], *, fingerprint: str, dtype: str) -> tuple[int, str]:
    """Write ``entries`` (sorted by key here) atomically to ``path``; returns (bytes, file blake2b hex).

    Writes ``path.tmp-PID``, fsyncs it, ``os.replace``s it into place and fsyncs the folder, so a crash
    leaves either no shard or a complete one.
    """
    entries = sorted(entries, key=lambda e: e.key)
    n = len(entries)
    keys = np.frombuffer(b"".join(e.key for e in entries), dtype=np.uint8).reshape(n, KEY_BYTES)
    stored = [encode_values(e.values, dtype) for e in entries]
    meta = np.zeros((n, 5), dtype=np.uint32)
    sums = np.array([e.total for e in entries], dtype=np.float32)
    offset = 0
    for i, (e, s) in enumerate(zip(entries, stored, strict=True)):
        if offset + s.size >= 2**32 or e.seq_len > MAX_SEQ_LEN or not 0 <= e.start <= e.seq_len - s.size:
            raise InvalidInput(f"a shard holds at most 2**32 values and sequences of <= {MAX_SEQ_LEN} tokens, "
                               f"each scored span inside its sequence; got {offset + s.size} values / seq_len "
                               f"{e.seq_len} / span {e.start}+{s.size}: use smaller shards or shorter sequences")
        # The reader refuses what is not a log-prob (a float16 cast can overflow to -inf): refuse it here first.
        problem = logprob_problem(decode_values(s, dtype))
        if problem is not None:
            raise InvalidInput(f"entry with key {e.key.hex()} holds no valid log-probs in {dtype}: {problem}; "
                               "store log-probs (finite, <= 0), in float32 if float16 overflows")
        meta[i] = (offset, s.size, e.start, e.seq_len,
                   entry_crc(e.key, s.size, e.start, e.seq_len, s.tobytes(), sums[i]))
        offset += s.size
    values = np.concatenate(stored) if stored else np.zeros(0, dtype=_NP[DTYPES[dtype]])
    # 4-byte items first: safetensors allows no gaps, and this order keeps every tensor naturally aligned.
    tensors: list[tuple[str, str, np.ndarray]] = [("meta", "U32", meta), ("sums", "F32", sums), ("keys", "U8", keys),
                                                  ("values", DTYPES[dtype], values)]
    header: dict[str, dict] = {}
    blobs, pos = [], 0
    for name, code, arr in tensors:
        data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [pos, pos + len(data)]}
        blobs.append(data)
        pos += len(data)
    body = b"".join(blobs)
    header["__metadata__"] = {"format": FORMAT, "version": str(VERSION), "fingerprint": fingerprint,
                              "dtype": dtype, "entries": str(n),
                              "data_blake2b": hashlib.blake2b(body, digest_size=16).hexdigest()}
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * ((-len(head)) % 8)
    blob = struct.pack("<Q", len(head)) + head + body
    atomic_write(path, blob)
    return len(blob), hashlib.blake2b(blob, digest_size=16).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file, fsync and ``os.replace`` (then fsync the folder).

    An ``OSError`` (disk full, no permission) removes the temp file and raises :class:`StorageError`
    naming ``path`` and the cause; ``path`` itself is then untouched.
    """
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # e.g. the folder itself is not writable: then no temp file was made either
            pass
        raise storage_error(path, exc) from exc
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise storage_error(path.parent, exc, "sync the folder") from exc


class EntryView(NamedTuple):
    """One entry as read back: its sequence length, scored-span start, float32 values and sum."""

    seq_len: int
    start: int
    values: np.ndarray  # float32 [count], a fresh array
    total: float  # per-sequence sum (float32 as stored)


# (dtype, shape) each tensor must have in a shard of n entries; "values" follows the storage dtype.
def _expected_tensors(n: int, version: int, dtype: str) -> dict[str, tuple[set[str], tuple[int, ...] | None]]:
    meta = {"I64"} if version == 1 else {"U32"}
    return {"keys": ({"U8"}, (n, KEY_BYTES)), "meta": (meta, (n, 5)), "sums": ({"F32"}, (n,)),
            "values": ({DTYPES[dtype]}, None)}


class Shard:
    """A memory-mapped, read-only shard; arrays are zero-copy views into the mapping."""

    def __init__(self, path: Path):
        self.path = path
        self._mm = None
        try:
            with os.fdopen(open_regular(path, hint=f"; {repair_hint(path.parent)}"), "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except FileNotFoundError as exc:
            raise StoreCorrupt(f"store shard {path} is listed in the manifest but missing; "
                               f"{repair_hint(path.parent)}") from exc
        except OSError as exc:
            raise storage_error(path, exc, "read") from exc
        try:
            if self._mm is None:
                raise ValueError("the file is empty")
            (hlen,) = struct.unpack_from("<Q", self._mm, 0)
            if hlen > size - 8:
                raise ValueError(f"header length {hlen} runs past the end of the file ({size} bytes)")
            header = json.loads(bytes(self._mm[8:8 + hlen]))
            if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
                raise ValueError("the header has no __metadata__ object")
            self.meta_info = header.pop("__metadata__")
            if self.meta_info.get("format") != FORMAT:
                raise ValueError(f"format {self.meta_info.get('format')!r} is not {FORMAT!r}")
            version = self.meta_info.get("version")
            if version not in [str(v) for v in READABLE_VERSIONS]:
                raise ValueError(f"format version {version!r} is not one this refmodel reads "
                                 f"({', '.join(map(str, READABLE_VERSIONS))}); a newer refmodel wrote it?")
            self.version = int(version)
            self.dtype = self.meta_info.get("dtype")
            if self.dtype not in DTYPES:
                raise ValueError(f"storage dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
            self.body_start = 8 + hlen
            n = header.get("keys", {}).get("shape", [None])[0] if isinstance(header.get("keys"), dict) else None
            if not isinstance(n, int) or n < 0:
                raise ValueError("tensor keys has no valid shape")
            arrays: dict[str, np.ndarray] = {}
            for name, (codes, shape) in _expected_tensors(n, self.version, self.dtype).items():
                spec = header[name]
                code, got_shape, (begin, end) = spec["dtype"], spec["shape"], spec["data_offsets"]
                if code not in codes or not isinstance(got_shape, list) or \
                        not all(isinstance(d, int) and d >= 0 for d in got_shape) or \
                        (shape is not None and tuple(got_shape) != shape) or (shape is None and len(got_shape) != 1):
                    raise ValueError(f"tensor {name} is {code} {got_shape}, expected {sorted(codes)} "
                                     f"{list(shape) if shape else '[M]'}")
                count = math.prod(got_shape)  # Python ints: a forged shape cannot wrap around
                if not (isinstance(begin, int) and isinstance(end, int)) or begin < 0 or \
                        end - begin != count * _ITEMSIZE[code] or self.body_start + end > size:
                    raise ValueError(f"tensor {name} has data_offsets {[begin, end]} that do not fit its shape "
                                     f"or run past the end of the file")
                arrays[name] = np.frombuffer(self._mm, dtype=np.dtype(_NP[code]).newbyteorder("<"),
                                             count=count, offset=self.body_start + begin).reshape(got_shape)
            # Spans, lengths and key order, before any entry is sliced or allocated from.
            check_entries(str(path), arrays["keys"], arrays["meta"], arrays["values"].shape[0],
                          f"; {repair_hint(path.parent)}")
        except StoreCorrupt:
            self.close()
            raise
        except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError,
                RecursionError) as exc:  # RecursionError: a deeply nested JSON header
            self.close()
            raise StoreCorrupt(f"store shard {path} is not a valid {FORMAT} file ({exc}); "
                               f"{repair_hint(path.parent)}") from exc
        self.keys: np.ndarray = arrays["keys"]  # U8 [N, 16]
        self.meta: np.ndarray = arrays["meta"]  # U32 (I64 in v1) [N, 5]
        self.sums: np.ndarray = arrays["sums"]  # F32 [N]
        self.values: np.ndarray = arrays["values"]  # storage dtype [M]
        self._hi: np.ndarray | None = None

    def __len__(self) -> int:
        return self.keys.shape[0]

    @property
    def key_hi(self) -> np.ndarray:
        """First 8 key bytes as big-endian integers (sorted like the keys); built on first lookup."""
        if self._hi is None:
            self._hi = np.ascontiguousarray(self.keys[:, :8]).view(">u8")[:, 0].astype(np.uint64)
        return self._hi

    def find(self, keys: list[bytes]) -> np.ndarray:
        """Row of each key in this shard, or -1."""
        rows = np.full(len(keys), -1, dtype=np.int64)
        if not len(self) or not keys:
            return rows
        hi = np.frombuffer(b"".join(k[:8] for k in keys), dtype=">u8").astype(np.uint64)
        key_hi = self.key_hi
        pos = np.searchsorted(key_hi, hi)
        for i, (p, k) in enumerate(zip(pos.tolist(), keys, strict=True)):
            while p < len(self) and key_hi[p] == hi[i]:
                if self.keys[p].tobytes() == k:
                    rows[i] = p
                    break
                p += 1
        return rows

    def read(self, row: int, check: bool = True) -> EntryView:
        """Entry ``row``; checks its crc32 (which covers the sum from version 3 on) unless ``check=False``."""
        offset, count, start, seq_len, crc = (int(x) for x in self.meta[row])  # in bounds: check_entries
        stored = self.values[offset:offset + count]
        total = self.sums[row]
        if check and entry_crc(self.keys[row].tobytes(), count, start, seq_len, stored.tobytes(),
                               total if self.version >= SUM_IN_CRC else None) != crc:
            raise StoreCorrupt(f"entry {row} (key {self.keys[row].tobytes().hex()}) of store shard {self.path} "
                               f"failed its crc32 check: the file is corrupt; {repair_hint(self.path.parent)}")
        values = decode_values(stored, self.dtype)
        if check:
            check_values(str(self.path), row, self.keys[row].tobytes(), values, float(total), self.dtype,
                         f"; {repair_hint(self.path.parent)}")
        return EntryView(seq_len, start, values, float(total))

    def verify(self, expected_file_hash: str | None = None) -> None:
        """Full check: file hash (from the manifest), data checksum and every entry's crc, values and sum.

        Spans, lengths and key order were checked on open (:func:`~refmodel.store.integrity.check_entries`).
        """
        mm = self._mm
        assert mm is not None, "verify() on a closed shard"  # internal: a shard is only closed by its store
        if expected_file_hash is not None:
            got = hashlib.blake2b(mm, digest_size=16).hexdigest()
            if got != expected_file_hash:
                raise StoreCorrupt(f"store shard {self.path} has blake2b {got}, the manifest says "
                                   f"{expected_file_hash}: the file is corrupt or was replaced")
        got = hashlib.blake2b(mm[self.body_start:], digest_size=16).hexdigest()
        if got != self.meta_info.get("data_blake2b"):
            raise StoreCorrupt(f"store shard {self.path}: data checksum {got} != header "
                               f"{self.meta_info.get('data_blake2b')}; the file is corrupt")
        for row in range(len(self)):
            self.read(row)

    def close(self) -> None:
        # Drop our views first: an mmap with live exports cannot be closed.
        self.keys = self.meta = self.sums = self.values = self._hi = None  # type: ignore[assignment]
        mm, self._mm = getattr(self, "_mm", None), None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a caller still holds a view; the mapping goes with it
                pass
