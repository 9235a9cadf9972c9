"""The processes of a run: this process's rank under a launcher, what only the main process says, metrics
reduced over the ranks, and joining or starting a Ray cluster (``refmodel precompute --ray``, ``serve --ray``).

Ranks (one rule, :func:`launch_ranks`): torch.distributed's default group when it is initialized, else
the launcher's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (``torchrun`` and ``accelerate launch`` set all
three), else a single process. Under a launcher refmodel's progress bars, monitors and warnings come from
the main process (rank 0) only: :func:`is_main_process` for bars, :func:`get_logger` for log records (a
record that differs per rank, such as a rank's own store misses, is kept on every rank and tagged with
its rank: ``extra=PER_RANK``). Metrics go through :func:`reduce_over_ranks` before they are logged.

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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ._optional import require
from .errors import ConfigError

log = logging.getLogger(__name__)

PER_RANK = {"per_rank": True}  # ``log.warning(..., extra=PER_RANK)``: kept on every rank, tagged with it


def launch_ranks() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` of this process by the module docstring's rule; ``(0, 1, 0)`` alone.

    ConfigError when a launcher variable is not an integer.
    """
    dist = _dist()
    if dist is not None and dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return rank, dist.get_world_size(), _env_int("LOCAL_RANK", rank)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK", 0)
    return 0, 1, 0


def _dist():
    """``torch.distributed`` if torch is imported (it always is once a group can exist), else None."""
    import sys

    return sys.modules.get("torch.distributed")


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; it is set by the launcher "
                          "(torchrun, accelerate launch): launch through one, or unset RANK / WORLD_SIZE") from None


def is_main_process() -> bool:
    """True in a single process and on rank 0 of a launch: where bars, monitors and shared warnings show."""
    try:
        return launch_ranks()[0] == 0
    except ConfigError:  # a bad RANK is reported where the ranks are used, not by a progress bar
        return True


class MainProcessFilter(logging.Filter):
    """Passes every record of the main process; on the other ranks only errors and ``extra=PER_RANK`` records,
    with ``[rank R of W]`` put before the message (the rank is read when the record is made)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            rank, world, _ = launch_ranks()
        except ConfigError:
            return True
        if world == 1:
            return True
        per_rank = getattr(record, "per_rank", False) or record.levelno >= logging.ERROR
        if per_rank and not getattr(record, "rank_tagged", False):
            record.msg = f"[rank {rank} of {world}] {record.msg}"
            record.rank_tagged = True
        return rank == 0 or per_rank


def get_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` with :class:`MainProcessFilter`: refmodel's loggers whose records every rank
    would repeat (shared warnings, monitors) say them once, on the main process."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, MainProcessFilter) for f in logger.filters):
        logger.addFilter(MainProcessFilter())
    return logger


REDUCTIONS = ("sum", "max", "mean")


def reduce_over_ranks(values: Mapping[str, float], how: str | Mapping[str, str] = "sum") -> dict[str, float]:
    """``values`` reduced over the ranks of torch.distributed's default group; as given without one.

    A collective: every rank calls it, with the same keys, at the same point. ``how``: one of
    :data:`REDUCTIONS` for all keys, or per key (counts: ``sum``; wall times: ``max``, the slowest rank,
    since the ranks wait for each other every step; per-rank means over equal batches: ``mean``).
    Float64 on the wire (counts stay exact); one all_reduce per kind used.
    """
    out = {key: float(value) for key, value in values.items()}
    ops = {key: how if isinstance(how, str) else how.get(key, "sum") for key in out}
    bad = sorted(({how} if isinstance(how, str) else set(how.values())) - set(REDUCTIONS))
    if bad:
        raise ConfigError(f"reduce_over_ranks: unknown reduction(s) {bad}; expected one of {list(REDUCTIONS)}")
    dist = _dist()
    if dist is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return out
    import torch

    device = _collective_device(dist)
    world = dist.get_world_size()
    for kind in REDUCTIONS:
        keys = sorted(k for k, op in ops.items() if op == kind)
        if not keys:
            continue
        box = torch.tensor([out[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(box, op=dist.ReduceOp.MAX if kind == "max" else dist.ReduceOp.SUM)
        if kind == "mean":
            box /= world
        out.update(zip(keys, box.tolist(), strict=True))
    return out


def _collective_device(dist):
    """Where the default group's collectives take tensors: the CPU for gloo, else the current accelerator (NCCL)."""
    import torch

    if "gloo" in str(dist.get_backend()):
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


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


__all__ = ["PER_RANK", "REDUCTIONS", "MainProcessFilter", "RayConnection", "check_reachable", "connect_ray", "get_logger",
           "is_main_process", "launch_ranks", "ray_address", "reduce_over_ranks"]
