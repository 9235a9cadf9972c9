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
