"""The ``Remote`` reference strategy (log-probs from a ``refmodel serve`` service) and hybrid placement.

``Remote(url, model)`` implements the ``Reference`` protocol through :class:`refmodel.ReferenceClient`:
it holds no weights (``memory_bytes == 0``), its fingerprint is the served model's, and every answer
is checked against that fingerprint, so a server restarted with other weights cannot slip in silently.

:func:`choose_placement` is the rule ``auto`` applies with ``ReferenceConfig(remote_url=...,
max_local_bytes=...)``: keep the reference in-process (through the model cache) when its weights fit
the local budget, route it to the service when they do not; the decision is logged with the sizes.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

from .. import validation
from ..errors import ConfigError, FingerprintMismatch

log = logging.getLogger(__name__)

Placement = Literal["local", "remote"]


def placement_rule(model_bytes: int, max_local_bytes: int | None) -> tuple[Placement, str]:
    """The hybrid rule without side effects: ``(placement, reason)``; ``"local"`` when the weights fit."""
    if model_bytes < 0:
        raise ConfigError(f"model_bytes must be >= 0, got {model_bytes}")
    size = f"{model_bytes / 2**20:.1f} MiB"
    if max_local_bytes is None:
        return "local", f"{size} and no local budget (max_local_bytes unset)"
    budget = f"{max_local_bytes / 2**20:.1f} MiB"
    if model_bytes <= max_local_bytes:
        return "local", f"{size} fits the local budget of {budget} ({model_bytes} <= {max_local_bytes} bytes)"
    return "remote", f"{size} exceeds the local budget of {budget} ({model_bytes} > {max_local_bytes} bytes)"


def choose_placement(model_bytes: int, max_local_bytes: int | None, *, name: str = "reference",
                     remote_url: str | None = None) -> Placement:
    """``"local"`` when ``model_bytes <= max_local_bytes`` (or no budget), else ``"remote"``; logged."""
    placement, reason = placement_rule(model_bytes, max_local_bytes)
    where = "in-process" if placement == "local" else f"on the reference service {remote_url or ''}".rstrip()
    log.info("placing %s %s: %s", name, where, reason)
    return placement


class Remote:
    """Reference log-probs from a reference service.

    Args:
        url: the service, e.g. ``http://127.0.0.1:8000``; model: a name on its allow-list, or ``None``
            for the one log-prob model the service serves (refused when it serves several).
        token: bearer token (``refmodel serve --token-file``); timeout_s: per-attempt HTTP timeout in seconds.
        temperature: the sampling temperature the log-probs must match (the service divides the
            logits by it); part of the fingerprint, like ``Frozen(..., temperature=)``.
    """

    memory_bytes = 0

    def __init__(self, url: str, model: str | None = None, *, token: str | None = None, timeout_s: float = 30.0,
                 max_retries: int = 3, temperature: float = 1.0):
        from ..remote.client import ReferenceClient

        temperature = validation.temperature(temperature, error=ConfigError)
        self.url = url
        self.temperature = float(temperature)
        self.client = ReferenceClient(url, token=token, timeout_s=timeout_s, max_retries=max_retries)
        self.model: str = model if model is not None else self._only_model()
        self.fingerprint: str = self.client.fingerprint(self.model, self.temperature)

    def _only_model(self) -> str:
        """The name of the service's one log-prob model (a bare URL names no model)."""
        names = [m["name"] for m in self.client.models() if m.get("kind", "logprobs") == "logprobs"]
        if len(names) != 1:
            raise ConfigError(f"the service at {self.url} serves {len(names)} log-prob models {names}; a bare URL "
                              "names one only when the service has exactly one. Name it: "
                              f"Remote({self.url!r}, model=NAME) or ReferenceConfig(remote_url=..., remote_model=NAME)")
        return names[0]

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 score_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T]`` float32 log-probs, aligned as ``model_logprobs``, on ``input_ids.device``."""
        fp, rows = self.client.logprobs_with_fingerprint(self.model, input_ids, attention_mask, score_mask,
                                                         temperature=self.temperature)
        if fp != self.fingerprint:
            raise FingerprintMismatch(f"the service at {self.url} now serves {self.model!r} with fingerprint "
                                      f"{fp}, but this Remote was bound to {self.fingerprint}; the server's "
                                      "weights changed — restart the run or rebind the reference")
        out = torch.stack(rows) if rows else torch.zeros(input_ids.shape, dtype=torch.float32)
        return out.to(input_ids.device)

    def on_step(self, step: int, policy=None) -> None:
        """A served reference is frozen: nothing to do."""

    def close(self) -> None:
        self.client.close()

    def __repr__(self) -> str:
        return (f"Remote(url={self.url!r}, model={self.model!r}, temperature={self.temperature}, "
                f"fingerprint={self.fingerprint!r})")


__all__ = ["Placement", "Remote", "choose_placement", "placement_rule"]
