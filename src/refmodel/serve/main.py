"""Start-up of ``refmodel serve``: resolve settings, bind the port, load the allow-listed models, run uvicorn.

The port is bound before any model loads, so a taken port is a one-line error in a second rather
than after minutes of loading; the bound socket is the one uvicorn serves on (no race in between).
A non-loopback ``--host`` without a token is refused unless ``--allow-no-auth`` (then a WARNING).

SIGTERM / SIGINT: uvicorn stops accepting connections, lets in-flight requests finish (up to
``shutdown_timeout_s``), then the app stops its batchers; no admitted request is dropped.
"""

from __future__ import annotations

import gc
import logging
import socket

from .._optional import require
from .settings import ServeSettings

log = logging.getLogger(__name__)


def load_all(settings: ServeSettings) -> tuple[object, dict]:
    """Load and warm up every allow-listed model; returns ``(cache, {name: ServedModel})``."""
    from .runners import load_logprob_models, load_reward_model, warm_up

    cache, served = load_logprob_models(settings.models, settings.device)
    for name, path in settings.reward_models.items():
        served[name] = load_reward_model(name, path, settings.device)
    for model in served.values():
        warm_up(model)
    return cache, served


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not yet listening), or a ConfigError saying why not."""
    from ..errors import ConfigError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve --host {host!r}: {exc}") from exc
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT only; a listener still clashes
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; another server may be using "
                          "it: stop it or pick another --port") from exc
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app, settings: ServeSettings):
    """The uvicorn settings of the service: the httptools protocol with its head limits, graceful shutdown."""
    uvicorn = require("uvicorn", "serve")
    require("httptools", "serve")  # the parser the connection bounds are written for
    from .connection import guarded_protocol

    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                          timeout_graceful_shutdown=settings.shutdown_timeout_s, access_log=False,
                          lifespan="on", proxy_headers=False,  # client addresses are not used
                          # no Server (names the stack) or Date header: each costs every client a header parse
                          server_header=False, date_header=False,
                          http=guarded_protocol(settings.header_timeout_s, settings.max_header_bytes,
                                               send_timeout_s=settings.body_timeout_s,
                                               max_drain_bytes=settings.max_body_bytes),
                          timeout_keep_alive=settings.keep_alive_timeout_s)


def _announcing_server(uvicorn, config, announce: str):
    """A ``uvicorn.Server`` that logs ``announce`` (INFO) once it accepts connections: uvicorn itself logs
    no URL when it is handed a bound socket, and a line logged before start-up would come too early."""

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                log.info(announce)

    return Server(config)


def run_server(settings: ServeSettings) -> None:
    """Bind the port, load the models, then serve until SIGTERM/SIGINT (blocking)."""
    uvicorn = require("uvicorn", "serve")
    require("fastapi", "serve")
    from ..errors import ConfigError
    from .app import create_app

    if not settings.models and not settings.reward_models:
        raise ConfigError("nothing to serve: give at least one --model NAME=PATH or --reward-model NAME=PATH")
    settings.check_exposure()
    token = settings.bearer_token()  # a bad token file fails here, before the models load
    sock = bind(settings.host, settings.port)
    try:
        if settings.torch_threads is not None:
            import torch

            torch.set_num_threads(settings.torch_threads)
        cache, served = load_all(settings)
        app = create_app(settings, served)
        app.state.refmodel.cache = cache  # keeps the cache (and its pins) alive while serving
        # What is loaded now (torch, transformers, the models: ~400k objects) lives as long as the process:
        # out of the collector's view, a full collection takes < 1 ms instead of 150-350 ms, a pause that
        # every client waiting on the event loop would see (the loop runs the collections it triggers)
        gc.collect()
        gc.freeze()
        host, port = sock.getsockname()[:2]
        url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        announce = f"refmodel serve listening on {url} (auth {'on' if token else 'off'}; Ctrl-C to stop)"
        _announcing_server(uvicorn, uvicorn_config(app, settings), announce).run(sockets=[sock])
    finally:
        sock.close()


__all__ = ["bind", "load_all", "run_server", "uvicorn_config"]


def settings_from_flags(models: tuple[str, ...], reward_models: tuple[str, ...], **flags) -> ServeSettings:
    """Build :class:`ServeSettings` from CLI flags (``None`` = use the environment/default)."""
    from .settings import parse_named_paths

    overrides = {k: v for k, v in flags.items() if v is not None}
    if models:
        overrides["models"] = parse_named_paths(models, "--model")
    if reward_models:
        overrides["reward_models"] = parse_named_paths(reward_models, "--reward-model")
    return ServeSettings(**overrides)


def serve_from_flags(models: tuple[str, ...], reward_models: tuple[str, ...], **flags) -> None:
    """Build :class:`ServeSettings` from CLI flags and serve (blocking)."""
    run_server(settings_from_flags(models, reward_models, **flags))
