"""Server settings: flags override the environment (``REFMODEL_*``), which overrides the defaults.

``REFMODEL_MODELS='{"tiny": "/models/tiny"}'`` (JSON) is the allow-list of causal LMs,
``REFMODEL_REWARD_MODELS`` the one of sequence-classification reward models, ``REFMODEL_TOKEN`` or
``REFMODEL_TOKEN_FILE`` the bearer token. Clients can only name models from these allow-lists.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..errors import ConfigError
from ..models.loading import parse_named_paths  # the one NAME=PATH parser; re-exported here

log = logging.getLogger(__name__)


class ServeSettings(BaseSettings):
    """Every knob of ``refmodel serve`` (see ``refmodel serve --help``)."""

    model_config = SettingsConfigDict(env_prefix="REFMODEL_", frozen=True, extra="forbid")

    models: dict[str, str] = Field(default_factory=dict, description="causal LM allow-list: name -> local path")
    reward_models: dict[str, str] = Field(default_factory=dict, description="reward model allow-list")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    token: SecretStr | None = None
    token_file: Path | None = None
    device: str = "cpu"
    max_batch_tokens: int = Field(8192, ge=1, description="padded tokens (rows x longest row) per model call")
    max_wait_ms: float = Field(2.0, ge=0, description="how long a batch waits for more requests")
    max_seq_len: int = Field(2048, ge=2, description="tokens per sequence")
    max_sequences: int = Field(1024, ge=1, description="sequences per request")
    max_queue: int = Field(1024, ge=1, description="sequences admitted (waiting or running) per model")
    max_body_bytes: int = Field(16 * 2**20, ge=64, description="request body limit (413 above it)")
    batching: bool = Field(True, description="False: every request runs as its own batch (baseline)")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: torch's default)")
    shutdown_timeout_s: float = Field(30.0, ge=0, description="graceful-shutdown drain limit")
    # Connection hygiene (issue 19 item 4): what an unauthenticated or slow client can hold.
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="request headers limit, bytes (431 above)")
    max_headers: int = Field(100, ge=8, description="header fields per request (431 above)")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection must send a complete request head "
                                                            "within this many seconds of its first byte")
    body_timeout_s: float = Field(30.0, gt=0, description="the whole request body must arrive within this (408)")
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="idle keep-alive connections close after this")
    allow_no_auth: bool = Field(False, description="allow a non-loopback --host without a bearer token")

    def __init__(self, **values):
        try:
            super().__init__(**values)
        except ValidationError as exc:  # one refmodel error type, naming each bad setting
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"invalid serve settings: {problems}") from None

    @model_validator(mode="after")
    def _check(self) -> ServeSettings:
        if self.max_batch_tokens < self.max_seq_len:
            raise ConfigError(f"max_batch_tokens ({self.max_batch_tokens}) must be >= max_seq_len "
                              f"({self.max_seq_len}) so that every accepted sequence fits in a batch")
        if self.token is not None and self.token_file is not None:
            raise ConfigError("give either a token or a token file, not both")
        clash = set(self.models) & set(self.reward_models)
        if clash:
            raise ConfigError(f"model names must be unique across --model and --reward-model: {sorted(clash)}")
        return self

    def check_exposure(self) -> None:
        """Refuse to listen beyond loopback without a token unless ``allow_no_auth`` says so (then WARN).

        Anyone who reaches an open port can make the server compute; on loopback that is only this
        machine's users, on ``0.0.0.0`` it is the network.
        """
        if _is_loopback(self.host) or self.token is not None or self.token_file is not None:
            return
        if not self.allow_no_auth:
            raise ConfigError(f"--host {self.host} listens beyond this machine but no bearer token is set; give "
                              "--token-file (or REFMODEL_TOKEN), or pass --allow-no-auth to serve it open")
        log.warning("serving on %s WITHOUT authentication (--allow-no-auth): anyone who can reach port %d can "
                    "use this server", self.host, self.port)

    def bearer_token(self) -> str | None:
        """The configured token (stripped file contents or the value), or None when auth is off."""
        if self.token_file is not None:
            try:
                value = self.token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"cannot read the token file {self.token_file}: {exc}") from exc
            if not value:
                raise ConfigError(f"the token file {self.token_file} is empty")
            return value
        return self.token.get_secret_value() if self.token is not None else None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


__all__ = ["ServeSettings", "parse_named_paths"]
