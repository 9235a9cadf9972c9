"""Start-up of ``refmodel serve``: resolve settings, load the allow-listed models, run uvicorn.

SIGTERM / SIGINT: uvicorn stops accepting connections, lets in-flight requests finish (up to
``shutdown_timeout_s``), then the app stops its batchers; no admitted request is dropped.
"""

from __future__ import annotations

import logging

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


def run_server(settings: ServeSettings) -> None:
    """Load the models, then serve until SIGTERM/SIGINT (blocking)."""
    uvicorn = require("uvicorn", "serve")
    require("fastapi", "serve")
    from ..errors import ConfigError
    from .app import create_app

    if not settings.models and not settings.reward_models:
        raise ConfigError("nothing to serve: give at least one --model NAME=PATH or --reward-model NAME=PATH")
    if settings.torch_threads is not None:
        import torch

        torch.set_num_threads(settings.torch_threads)
    cache, served = load_all(settings)
    app = create_app(settings, served)
    app.state.refmodel.cache = cache  # keeps the cache (and its pins) alive while serving
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                            timeout_graceful_shutdown=settings.shutdown_timeout_s, access_log=False,
                            lifespan="on", proxy_headers=False)  # client addresses are not used
    log.info("refmodel serve on http://%s:%d (auth %s)", settings.host, settings.port,
             "on" if settings.bearer_token() else "off")
    uvicorn.Server(config).run()


__all__ = ["load_all", "run_server"]


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
