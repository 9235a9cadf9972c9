"""refmodel.cluster: the one Ray start-up of ``precompute --ray`` and ``serve --ray``.

Without Ray: the reachability check. With Ray (marked ``ray``): an open connection is reused and left
open, a new local cluster is started, shut down by ``close`` and ships this refmodel to its workers.
"""

from __future__ import annotations

import socket

import pytest

from refmodel.cluster import check_reachable, connect_ray
from refmodel.errors import ConfigError


def _closed_port() -> int:
    with socket.socket() as sock:  # bound, then released: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("form", ["127.0.0.1:{}", "ray://127.0.0.1:{}"])
def test_an_unreachable_address_is_refused_at_once(form):
    address = form.format(_closed_port())
    with pytest.raises(ConfigError, match=f"cannot reach the Ray cluster at {address}.*ray start --head"):
        check_reachable(address, timeout_s=2)


@pytest.mark.parametrize("address", ["auto", "local", "http://head:8265", "head"])
def test_other_forms_are_left_to_ray(address):
    check_reachable(address)  # no port to try, or not a GCS address: ray.init judges it


def test_connect_refuses_an_unreachable_address_before_ray_init(monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(ConfigError, match=f"cannot reach the Ray cluster at {address}"):
        connect_ray(address)
    import ray

    assert not ray.is_initialized()


@pytest.mark.ray
@pytest.mark.slow
def test_local_cluster_started_reused_and_closed(monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    with connect_ray() as conn:
        assert conn.started and conn.local and ray.is_initialized()
        modules = ray.get_runtime_context().runtime_env.get("py_modules", [])
        assert len(modules) == 1  # this refmodel package, shipped to every worker
        again = connect_ray("127.0.0.1:1")  # already connected: used as is, the address is not even tried
        assert not again.started and not again.local
        again.close()
        assert ray.is_initialized()  # a connection it did not start is left open
    assert not ray.is_initialized()


def test_launch_ranks_and_the_main_process(monkeypatch):
    from refmodel.cluster import is_main_process, launch_ranks

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert launch_ranks() == (0, 1, 0) and is_main_process()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launch_ranks() == (1, 2, 1) and not is_main_process()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ConfigError, match=r"RANK='one' is not an integer.*torchrun"):
        launch_ranks()
    assert is_main_process()  # a bad RANK is reported where ranks are used, not by a progress bar


def test_shared_records_on_the_main_process_only_per_rank_ones_tagged(monkeypatch, caplog):
    """get_logger's filter, on rank 1 of 2: a shared warning is dropped, a PER_RANK one and an error kept and
    tagged; on rank 0 everything passes, untagged."""
    import logging

    from refmodel.cluster import PER_RANK, get_logger

    log = get_logger("refmodel.test_cluster_filter")
    assert get_logger("refmodel.test_cluster_filter").filters == log.filters and len(log.filters) == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        with caplog.at_level(logging.INFO, logger="refmodel.test_cluster_filter"):
            log.warning("shared %d", 1)
            log.warning("mine %d", 2, extra=PER_RANK)
            log.error("broke")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["[rank 1 of 2] mine 2", "[rank 1 of 2] broke", "shared 1", "[rank 0 of 2] mine 2",
                        "[rank 0 of 2] broke"]


def test_reduce_over_ranks_alone_and_bad_reductions():
    from refmodel.cluster import reduce_over_ranks

    assert reduce_over_ranks({"a": 3, "b": 0.5}, {"b": "max"}) == {"a": 3.0, "b": 0.5}  # one process: as given
    with pytest.raises(ConfigError, match=r"unknown reduction\(s\) \['median'\]; expected one of \['sum', 'max'"):
        reduce_over_ranks({"a": 1.0}, {"a": "median"})
    with pytest.raises(ConfigError, match=r"\['avg'\]"):
        reduce_over_ranks({"a": 1.0}, "avg")
