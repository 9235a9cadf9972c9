"""``ReferenceClient``: sync and async access to a ``refmodel serve`` reference service.

The sync methods use urllib3's connection pool (keep-alive, safe to share across threads), the async
methods httpx; one step, :meth:`ReferenceClient._settle`, decides after every attempt of either
whether to return, retry or raise, so retries and error mapping exist once. Log-probs travel in the
binary form (``refmodel.remote.wire``: int32 ids in, float32 out); rewards as JSON. Every call has an
explicit timeout; 429 and 503 answers (and connection failures) are retried with exponential
backoff and jitter, honouring ``Retry-After``. Errors map to refmodel exceptions by the table the
server answers with (:mod:`refmodel.remote.errors`): 401 :class:`Unauthorized`, 404
:class:`ModelNotAllowed`, 413 :class:`RequestTooLarge`, 422 :class:`InvalidBatch`, 429/503 after the
retries :class:`ServiceOverloaded`, anything else :class:`ServiceError`.

Why urllib3 for the sync side: on loopback a sync httpx request cost ~0.5 ms more than urllib3's
(measured on ``GET /healthz``: 1.17 vs 0.62 ms at the minimum; the hand-written HTTP/1.1 transport this
replaces took 0.34 ms but needed two security fixes and a second copy of the retry logic). urllib3
sends a bytes body in the same write as the head (no Nagle/delayed-ACK stall) and sets TCP_NODELAY.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
import urllib.parse
from typing import Any

import numpy as np
import torch

from .._optional import require
from ..data.collate import pad as _pad_rows
from ..errors import ConfigError, InvalidBatch, ModelNotAllowed, ServiceError
from ..models.fingerprint import fingerprint_settings
from .errors import RETRY_STATUSES, error_for

log = logging.getLogger(__name__)
_MAX_SLEEP_S = 30.0
# uvicorn closes an idle keep-alive connection after 5 s (refmodel serve --keep-alive-timeout-s):
# httpx drops ours earlier so as not to send on a connection the server is closing (urllib3 checks a
# pooled connection for a close by the server before reusing it).
_KEEPALIVE_EXPIRY_S = 2.0
_POOL_SIZE = 16  # idle connections kept for reuse; more concurrent callers open (and drop) extra ones
# The bearer token when the caller passes none: like HF_TOKEN, it lets a URL alone
# (`reference="http://..."`, `refmodel precompute --fallback-url`) reach a service started with --token-file.
TOKEN_ENV = "REFMODEL_TOKEN"


class _Reply:
    """A fully read urllib3 answer with the part of ``httpx.Response``'s interface the client uses."""

    __slots__ = ("status_code", "headers", "content")

    def __init__(self, response):
        self.status_code, self.headers, self.content = response.status, response.headers, response.data

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.content)


def _batch_arrays(input_ids, attention_mask=None, score_mask=None):
    """``[B, T]`` int32 ids, uint8 masks (or None) and each row's length to cut the answer back to.

    ``input_ids`` is a ``[B, T]`` tensor/array (rows keep length T) or a list of int lists (rows keep
    their own length; the client pads with attention 0).
    """
    if isinstance(input_ids, (torch.Tensor, np.ndarray)):
        ids = np.asarray(input_ids.detach().cpu() if isinstance(input_ids, torch.Tensor) else input_ids)
        if ids.ndim != 2:
            raise InvalidBatch(f"input_ids must be [B, T], got shape {ids.shape}")
        if ids.size and (ids.min() < np.iinfo(np.int32).min or ids.max() > np.iinfo(np.int32).max):
            raise InvalidBatch("input_ids holds values outside int32; token ids must fit in 32 bits")
        masks = [None if m is None else np.asarray(m.detach().cpu() if isinstance(m, torch.Tensor) else m)
                 for m in (attention_mask, score_mask)]
        return ids.astype(np.int32), masks[0], masks[1], [ids.shape[1]] * ids.shape[0]
    rows = [list(r) for r in input_ids]
    lengths = [len(r) for r in rows]
    width = max(lengths, default=0)
    ids = _pad_rows(rows, 0, dtype=torch.int64).numpy()
    pad = _pad_rows([[1] * n for n in lengths], 0, dtype=torch.uint8).numpy()
    if ids.size and (ids.min() < np.iinfo(np.int32).min or ids.max() > np.iinfo(np.int32).max):
        raise InvalidBatch("input_ids holds values outside int32; token ids must fit in 32 bits")

    def widen(name, mask):
        if mask is None:
            return None
        mask_rows = [list(m) for m in mask]
        if len(mask_rows) != len(rows) or any(len(m) != n for m, n in zip(mask_rows, lengths, strict=False)):
            raise InvalidBatch(f"{name} must have one row per sequence, each as long as its sequence")
        return _pad_rows(mask_rows, 0, dtype=torch.uint8, width=width).numpy()

    attn = widen("attention_mask", attention_mask)
    ragged = any(n != width for n in lengths)
    attn = attn if attn is not None else (pad if ragged else None)
    return ids.astype(np.int32), attn, widen("score_mask", score_mask), lengths


def _check_url(url: str) -> str:
    """``url`` without a trailing slash, or a ConfigError when it is not ``http(s)://host[:port][/path]``."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
        raise ConfigError(f"the reference service URL must be http(s)://host[:port], got {url!r}")
    return url.rstrip("/")


def _fp_key(model: str, temperature: float):
    # The plain name at default settings (as GET /v1/models lists it), by the fingerprint's identity rule.
    settings = fingerprint_settings(temperature=temperature)
    return (model, *sorted(settings.items())) if settings else model


def _raise_for(response, sent_token: bool = True) -> None:
    """Raise the table's exception (:func:`refmodel.remote.errors.error_for`) for an error answer."""
    status = response.status_code
    if status < 400:
        return
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text[:500]
    if status == 401 and not sent_token:
        detail = (f"{detail}; this client sent no token: pass token=... (Remote(url, token=...), "
                  f"ReferenceClient(url, token=...)) or set the {TOKEN_ENV} environment variable")
    raise error_for(status, detail)


class ReferenceClient:
    """Client of a reference service at ``url`` (e.g. ``http://127.0.0.1:8000``).

    Args:
        token: bearer token, if the server was started with one; ``None`` reads the ``REFMODEL_TOKEN``
            environment variable (unset: no token), ``""`` sends none.
        timeout_s: limit for each HTTP attempt (connect, write, read), in seconds.
        max_retries: extra attempts after a 429/503 answer or a connection failure.
        backoff_s: first backoff; doubles per attempt, with jitter, capped at 30 s (``Retry-After`` wins
            when larger).
    """

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 30.0, max_retries: int = 3,
                 backoff_s: float = 0.1):
        urllib3 = require("urllib3", "serve")
        self.url = _check_url(url)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        if token is None:
            token = os.environ.get(TOKEN_ENV) or None
        if token is not None and any(c in token for c in "\r\n\0"):
            raise ConfigError("the bearer token holds a line break or NUL (read from a file with a newline?)")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        # retries=False: the retries are ours (_settle), with backoff and Retry-After
        self._pool = urllib3.connection_from_url(
            self.url, maxsize=_POOL_SIZE, block=False, retries=False, headers=self.headers,
            timeout=urllib3.Timeout(connect=min(timeout_s, 10.0), read=timeout_s))
        self._prefix = urllib.parse.urlsplit(self.url).path
        # A read that times out means the service is busy with us: retrying would only queue the same
        # work again. A refused/reset/dropped connection (or a connect timeout) is retried.
        self._sync_errors = (urllib3.exceptions.HTTPError,)
        self._answer_timeouts: tuple[type[Exception], ...] = (urllib3.exceptions.ReadTimeoutError,)
        self._aclient: Any = None  # an httpx.AsyncClient, made on the first async call
        self._fingerprints: dict[str, str] = {}

    # ------------------------------------------------------------------ transport with retries
    def _sleep_for(self, attempt: int, response) -> float:
        wait = self.backoff_s * (2 ** attempt) * (0.5 + random.random())
        if response is not None:
            retry_after = response.headers.get("retry-after", "")
            if retry_after.replace(".", "", 1).isdigit():
                wait = max(wait, float(retry_after))
        return min(wait, _MAX_SLEEP_S)

    def _settle(self, attempt: int, path: str, response=None, exc: Exception | None = None) -> float | None:
        """After one attempt: ``None`` when ``response`` is final (error statuses raised), else the
        seconds to wait before the next attempt. The one retry/error step of the sync and async calls."""
        if exc is not None:
            if isinstance(exc, self._answer_timeouts):
                raise ServiceError(f"the reference service at {self.url} did not answer {path} within "
                                   f"{self.timeout_s} s") from exc
            if attempt == self.max_retries:
                raise ServiceError(f"cannot reach the reference service at {self.url}: "
                                   f"{type(exc).__name__}: {exc}") from exc
        elif response.status_code not in RETRY_STATUSES or attempt == self.max_retries:
            _raise_for(response, sent_token=bool(self.headers))
            return None
        wait = self._sleep_for(attempt, response)
        log.info("reference service busy (%s); retry %d/%d in %.2f s",
                 response.status_code if response is not None else "unreachable", attempt + 1,
                 self.max_retries, wait)
        return wait

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None):
        headers = {**self.headers, "Content-Type": content_type} if content_type else None
        for attempt in range(self.max_retries + 1):
            try:
                response = _Reply(self._pool.urlopen(method, self._prefix + path, body=body, headers=headers,
                                                     redirect=False))
            except self._sync_errors as exc:
                wait = self._settle(attempt, path, exc=exc)
            else:
                wait = self._settle(attempt, path, response)
                if wait is None:
                    return response
            time.sleep(wait or 0.0)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _arequest(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None):
        if self._aclient is None:  # httpx is imported only by the async methods
            httpx = require("httpx", "serve")
            self._aclient = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0)), headers=self.headers,
                limits=httpx.Limits(keepalive_expiry=_KEEPALIVE_EXPIRY_S))
            self._async_errors = (httpx.TransportError,)
            self._answer_timeouts += (httpx.ReadTimeout, httpx.WriteTimeout)
        aclient = self._aclient
        headers = {"Content-Type": content_type} if content_type else None
        for attempt in range(self.max_retries + 1):
            try:
                response = await aclient.request(method, self.url + path, content=body, headers=headers)
            except self._async_errors as exc:
                wait = self._settle(attempt, path, exc=exc)
            else:
                wait = self._settle(attempt, path, response)
                if wait is None:
                    return response
            await asyncio.sleep(wait or 0.0)
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ requests, built in one place
    @staticmethod
    def _logprobs_request(model, input_ids, attention_mask, score_mask, temperature=1.0):
        """``((path, body, content type), lengths)`` of a log-prob request (binary form)."""
        from . import wire

        ids, attn, score, lengths = _batch_arrays(input_ids, attention_mask, score_mask)
        return (("/v1/logprobs:binary", wire.encode_request(model, ids, attn, score, temperature), wire.CONTENT_TYPE),
                lengths)

    @staticmethod
    def _rewards_request(model, input_ids, attention_mask):
        """``(path, body, content type)`` of a reward request (JSON form)."""
        ids, attn, _, lengths = _batch_arrays(input_ids, attention_mask)
        body = {"model": model, "input_ids": [row[:n].tolist() for row, n in zip(ids, lengths, strict=True)]}
        if attn is not None:
            body["attention_mask"] = [row[:n].tolist() for row, n in zip(attn, lengths, strict=True)]
        return "/v1/rewards", json.dumps(body).encode(), "application/json"

    def _logprobs_result(self, model, response, lengths, temperature=1.0) -> tuple[str, list[torch.Tensor]]:
        from . import wire

        fp, out = wire.decode_response(response.content)
        self._fingerprints[_fp_key(model, temperature)] = fp
        return fp, [torch.from_numpy(out[i, :n].copy()) for i, n in enumerate(lengths)]

    # ------------------------------------------------------------------------------ the API
    def logprobs_with_fingerprint(self, model: str, input_ids, attention_mask=None, score_mask=None,
                                  temperature: float = 1.0):
        """``(fingerprint, [float32 [L_b] tensor per sequence])`` (see :meth:`compute_log_probs`)."""
        request, lengths = self._logprobs_request(model, input_ids, attention_mask, score_mask, temperature)
        return self._logprobs_result(model, self._request("POST", *request), lengths, temperature)

    def compute_log_probs(self, model: str, input_ids, attention_mask=None, score_mask=None,
                          temperature: float = 1.0) -> list[torch.Tensor]:
        """One float32 tensor per sequence: ``out[t] = log p(ids[t] | ids[:t])``, 0 at t=0 and where unscored.

        ``input_ids``: ``[B, T]`` tensor (each result has length T) or a list of int lists (each result
        has its row's length). Masks: same shape, 0/1. ``temperature``: log-probs of
        ``softmax(logits / temperature)``, the sampler's distribution (RL references).
        """
        return self.logprobs_with_fingerprint(model, input_ids, attention_mask, score_mask, temperature)[1]

    async def acompute_log_probs(self, model: str, input_ids, attention_mask=None,
                                 score_mask=None, temperature: float = 1.0) -> list[torch.Tensor]:
        """Async :meth:`compute_log_probs`."""
        request, lengths = self._logprobs_request(model, input_ids, attention_mask, score_mask, temperature)
        return self._logprobs_result(model, await self._arequest("POST", *request), lengths, temperature)[1]

    def compute_rewards(self, model: str, input_ids, attention_mask=None) -> torch.Tensor:
        """``[B]`` float32 scores of a reward model, read at each sequence's last real token."""
        response = self._request("POST", *self._rewards_request(model, input_ids, attention_mask))
        return torch.tensor(response.json()["scores"], dtype=torch.float32)

    async def acompute_rewards(self, model: str, input_ids, attention_mask=None) -> torch.Tensor:
        """Async :meth:`compute_rewards`."""
        response = await self._arequest("POST", *self._rewards_request(model, input_ids, attention_mask))
        return torch.tensor(response.json()["scores"], dtype=torch.float32)

    def models(self) -> list[dict]:
        """``GET /v1/models``: name, kind, fingerprint, vocab_size, dtype, parameters, max_seq_len of each."""
        return self._request("GET", "/v1/models").json()["models"]

    def fingerprint(self, model: str, temperature: float = 1.0) -> str:
        """The served model's fingerprint at ``temperature`` (asked once, then remembered).

        The temperature is part of the identity; the service names it in every answer, so a
        temperature other than 1.0 is asked with one two-token request.
        """
        if model not in self._fingerprints:
            for info in self.models():
                self._fingerprints[info["name"]] = info["fingerprint"]
        if model not in self._fingerprints:
            raise ModelNotAllowed(f"the reference service at {self.url} does not serve {model!r}")
        key = _fp_key(model, temperature)
        if key not in self._fingerprints:
            self.logprobs_with_fingerprint(model, [[0, 0]], temperature=temperature)
        return self._fingerprints[key]

    def health(self) -> dict:
        return self._request("GET", "/healthz").json()

    def close(self) -> None:
        self._pool.close()

    async def aclose(self) -> None:
        if self._aclient is not None:
            await self._aclient.aclose()
            self._aclient = None

    def __enter__(self) -> ReferenceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> ReferenceClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


__all__ = ["ReferenceClient"]
