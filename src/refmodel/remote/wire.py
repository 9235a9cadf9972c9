"""The binary form of ``POST /v1/logprobs:binary`` (numpy only; the client imports it too).

Request body, all little-endian::

    offset 0   4 bytes  magic  b"RMB1"
           4   u8       flags  bit 0: an attention mask follows, bit 1: a score mask follows,
                            bit 2: a temperature follows the model name
           5   u8       reserved (0)
           6   u16      N      length of the model name in bytes
           8   u32      B      sequences
          12   u32      T      tokens per sequence (rows are padded to T; say so in the attention mask)
          16   N bytes  model name, UTF-8
               8 bytes  float64 temperature (> 0), if flag bit 2 (absent: 1.0)
               B*T int32  token ids, row-major
               B*T uint8  attention mask (0/1), if flag bit 0
               B*T uint8  score mask (0/1), if flag bit 1

Response body (``Content-Type: application/octet-stream``)::

    offset 0   4 bytes  magic  b"RMR1"
           4   u16      F      length of the fingerprint in bytes
           6   u16      reserved (0)
           8   u32      B
          12   u32      T
          16   F bytes  fingerprint, ASCII
               B*T float32  log-probs, row-major, aligned as model_logprobs

Errors come back as JSON (``{"detail": ..., "field": ...}``) with the same status codes as the
JSON form. No pickle, no torch serialisation: a reader needs only ``struct`` and a float32 array.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import partial

import numpy as np

from .. import validation
from ..errors import InvalidBatch

REQUEST_MAGIC = b"RMB1"
RESPONSE_MAGIC = b"RMR1"
_REQ = struct.Struct("<4sBBHII")
_RESP = struct.Struct("<4sHHII")
FLAG_ATTENTION = 1
FLAG_SCORE = 2
FLAG_TEMPERATURE = 4  # absent at 1.0, so a request at the default is byte-identical to the older format
_TEMP = struct.Struct("<d")  # float64: the exact value that is fingerprinted
CONTENT_TYPE = "application/octet-stream"


def _invalid(field: str, message: str) -> InvalidBatch:
    exc = InvalidBatch(f"{field}: {message}" if field == "body" else message)
    exc.field = field  # the app reports it beside the message
    return exc


@dataclass
class BinaryRequest:
    """A decoded request: ``input_ids`` int32 ``[B, T]``; masks uint8 ``[B, T]`` or None."""

    model: str
    input_ids: np.ndarray
    attention_mask: np.ndarray | None
    score_mask: np.ndarray | None
    temperature: float = 1.0


def encode_request(model: str, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                   score_mask: np.ndarray | None = None, temperature: float = 1.0) -> bytes:
    """Pack a ``[B, T]`` batch (ids must fit int32) into the request format (``temperature`` > 0)."""
    ids = np.ascontiguousarray(input_ids, dtype="<i4")
    if ids.ndim != 2:
        raise InvalidBatch(f"input_ids must be [B, T], got shape {ids.shape}")
    name = model.encode("utf-8")
    flags = (FLAG_ATTENTION if attention_mask is not None else 0) | (FLAG_SCORE if score_mask is not None else 0)
    temperature = validation.temperature(temperature, error=InvalidBatch)
    flags |= FLAG_TEMPERATURE if temperature != 1.0 else 0
    parts = [_REQ.pack(REQUEST_MAGIC, flags, 0, len(name), ids.shape[0], ids.shape[1]), name]
    if temperature != 1.0:
        parts.append(_TEMP.pack(temperature))
    parts.append(ids.tobytes())
    for mask_name, mask in (("attention_mask", attention_mask), ("score_mask", score_mask)):
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != ids.shape:
                raise InvalidBatch(f"{mask_name} must have the shape of input_ids {ids.shape}, got {mask.shape}")
            parts.append(np.ascontiguousarray(mask != 0, dtype=np.uint8).tobytes())
    return b"".join(parts)


def decode_request(body: bytes | bytearray) -> BinaryRequest:
    """Unpack a request; a malformed body raises InvalidBatch naming the part that is wrong."""
    if len(body) < _REQ.size:
        raise _invalid("body", f"a binary request needs a {_REQ.size}-byte header, got {len(body)} bytes")
    magic, flags, _, name_len, batch, length = _REQ.unpack_from(body)
    if magic != REQUEST_MAGIC:
        raise _invalid("body", f"bad magic {magic!r}, expected {REQUEST_MAGIC!r}")
    if flags & ~(FLAG_ATTENTION | FLAG_SCORE | FLAG_TEMPERATURE):
        raise _invalid("body", f"unknown flags {flags:#x}; only bits 0, 1 and 2 are defined")
    n = batch * length
    masks = bin(flags & (FLAG_ATTENTION | FLAG_SCORE)).count("1")
    extra = _TEMP.size if flags & FLAG_TEMPERATURE else 0
    expected = _REQ.size + name_len + extra + 4 * n + masks * n
    if len(body) != expected:
        raise _invalid("body", f"header says B={batch}, T={length}, {masks} mask(s), a {name_len}-byte "
                           f"name{' and a temperature' if extra else ''}, i.e. {expected} bytes, but the body "
                           f"has {len(body)}")
    offset = _REQ.size
    try:
        model = body[offset:offset + name_len].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid("model", "the model name is not valid UTF-8") from exc
    offset += name_len
    temperature = 1.0
    if extra:
        (temperature,) = _TEMP.unpack_from(body, offset)
        offset += extra
        validation.temperature(temperature, error=partial(_invalid, "temperature"))
    ids = np.frombuffer(body, dtype="<i4", count=n, offset=offset).reshape(batch, length)
    offset += 4 * n
    out: list[np.ndarray | None] = []
    for bit in (FLAG_ATTENTION, FLAG_SCORE):
        if flags & bit:
            out.append(np.frombuffer(body, dtype=np.uint8, count=n, offset=offset).reshape(batch, length))
            offset += n
        else:
            out.append(None)
    return BinaryRequest(model, ids, out[0], out[1], float(temperature))


def encode_response(fingerprint: str, logprobs: np.ndarray) -> bytes:
    """Pack ``[B, T]`` float32 log-probs and the model fingerprint."""
    arr = np.ascontiguousarray(logprobs, dtype="<f4")
    fp = fingerprint.encode("ascii")
    return _RESP.pack(RESPONSE_MAGIC, len(fp), 0, arr.shape[0], arr.shape[1]) + fp + arr.tobytes()


def decode_response(body: bytes) -> tuple[str, np.ndarray]:
    """``(fingerprint, [B, T] float32)`` from a response body."""
    if len(body) < _RESP.size:
        raise ValueError(f"binary response too short ({len(body)} bytes)")
    magic, fp_len, _, batch, length = _RESP.unpack_from(body)
    if magic != RESPONSE_MAGIC or len(body) != _RESP.size + fp_len + 4 * batch * length:
        raise ValueError("malformed binary response (bad magic or length)")
    fp = body[_RESP.size:_RESP.size + fp_len].decode("ascii")
    arr = np.frombuffer(body, dtype="<f4", offset=_RESP.size + fp_len).reshape(batch, length)
    return fp, arr.astype(np.float32)


__all__ = ["BinaryRequest", "CONTENT_TYPE", "decode_request", "decode_response", "encode_request",
           "encode_response"]
