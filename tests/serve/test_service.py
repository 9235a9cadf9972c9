"""The reference service end to end: a real ``refmodel serve`` process on a loopback port.

The checks themselves live in ``service_checks.py`` (shared with the Ray Serve deployment's tests).
"""

from __future__ import annotations

import pytest
from serve_helpers import make_tiny_reward_model, start_main_server
from service_checks import ServiceClientChecks

from refmodel.testing import load_tiny

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_reward_dir(tmp_path_factory):
    return make_tiny_reward_model(tmp_path_factory.mktemp("tiny_reward"))


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tiny_reward_dir, tmp_path_factory):
    proc = start_main_server(tiny_model_dirs["llama"], tiny_reward_dir, tmp_path_factory.mktemp("server"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    model, _ = load_tiny(tiny_model_dirs["llama"])
    return model


class TestServeProcess(ServiceClientChecks):
    """Every client-level check against ``refmodel serve`` (uvicorn, one process)."""
