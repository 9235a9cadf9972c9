"""Joining or starting a Ray cluster: written once for ``refmodel precompute --ray`` and ``refmodel serve --ray``.

Why a root module of its own (rank 2, just above :mod:`refmodel._optional`): the precompute job and the
service are both rank 7 and may not import each other, and connecting to Ray is neither's concept; it
needs nothing but the errors and the optional import of ``ray``, so it sits below every room that uses it.

The rule, the same for both commands: a Ray connection already open in this process is used as is (and
left open); else the ``address`` given, else ``RAY_ADDRESS``, else a new local cluster on this machine's
cores. A ``host:port`` address is first checked with a TCP connect, because ``ray.init`` retries an
unreachable head for minutes. The refmodel package of this process is shipped to the workers
(``runtime_env={"py_modules": [refmodel]}``), so that actors and replicas run the driver's very code
(byte-identical precompute results need it) whether or not refmodel is installed on the cluster.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ._optional import require
from .errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class RayConnection:
    """The outcome of :func:`connect_ray`: the ``ray`` module, whether this call ``started`` the connection
    (then :meth:`close` shuts it down; otherwise it belongs to someone else and stays open) and whether it
    is a new ``local`` cluster on this machine (one that cannot grow: size requests by its resources)."""

    ray: ModuleType
    started: bool
    local: bool

    def close(self) -> None:
        """Shut Ray down if :func:`connect_ray` started it; a connection found open is left alone."""
        if self.started:
            self.ray.shutdown()
            self.started = False

    def __enter__(self) -> RayConnection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """ConfigError now when nothing listens at a ``host:port`` / ``ray://host:port`` address.

    Other forms (``auto``, ``local``, other URL schemes, no port) are left to ``ray.init`` to judge.
    """
    if address in ("auto", "local") or ("://" in address and not address.startswith("ray://")):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {address}: {exc}; is the head node up (ray start "
                          "--head) and is --ray-address / RAY_ADDRESS its GCS 'host:port' or 'ray://host:10001'?"
                          ) from exc


def ray_address(address: str | None = None) -> str | None:
    """The cluster :func:`connect_ray` joins: ``address``, else ``RAY_ADDRESS``, else None (a new local one)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def connect_ray(address: str | None = None) -> RayConnection:
    """Connect this process to Ray by the module docstring's rule; ConfigError naming the address on failure.

    Args:
        address: ``ray://host:10001``, ``host:6379``, ``auto`` or None (``RAY_ADDRESS``, else a new local
            cluster with as many CPUs as this machine has).
    """
    ray = require("ray", "ray")
    if ray.is_initialized():
        log.info("using the Ray connection already open in this process")
        return RayConnection(ray, started=False, local=False)
    address = ray_address(address)
    runtime_env = {"py_modules": [str(Path(__file__).resolve().parent)]}  # this refmodel package folder
    if address:
        check_reachable(address)  # outside the try: its ConfigError says it all
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING, runtime_env=runtime_env)
        else:
            ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                     logging_level=logging.WARNING, runtime_env=runtime_env)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"cannot connect to the Ray cluster at {address or 'a new local cluster'}: {exc}; "
                          "check --ray-address / RAY_ADDRESS (e.g. 'ray://head:10001' or 'head:6379')") from exc
    return RayConnection(ray, started=True, local=address is None)


__all__ = ["RayConnection", "check_reachable", "connect_ray", "ray_address"]
