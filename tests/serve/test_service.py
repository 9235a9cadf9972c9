"""The reference service end to end: a real ``refmodel serve`` process on a loopback port.

The checks themselves live in ``service_checks.py`` (shared with the Ray Serve deployment's tests).
"""

from __future__ import annotations

import logging

import pytest
import torch
from serve_helpers import TOKEN, make_tiny_reward_model, start_main_server
from service_checks import ATOL, ServiceClientChecks, random_rows

from refmodel.logprobs.model import model_logprobs
from refmodel.reference import Frozen, ReferenceConfig, Remote, auto
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


def test_auto_places_a_reference_too_big_for_the_budget_on_the_service(server, llama, tiny_model_dirs, caplog):
    # Hybrid placement: the same config stays local when the weights fit and goes remote when they do not.
    path = str(tiny_model_dirs["llama"])
    common = dict(ref_model_path=path, remote_url=server.url, remote_model="tiny", remote_token=TOKEN)
    with caplog.at_level(logging.INFO, logger="refmodel.reference"):
        remote = auto(llama, ReferenceConfig(max_local_bytes=1024, **common))
    assert isinstance(remote, Remote) and "exceeds the local budget" in caplog.text
    assert isinstance(auto(llama, ReferenceConfig(max_local_bytes=2**40, **common)), Frozen)
    ids = torch.tensor(random_rows(2, seed=8, lo=7, hi=7))
    with torch.no_grad():
        torch.testing.assert_close(remote.logprobs(ids), model_logprobs(llama, ids), atol=ATOL, rtol=0)
    remote.close()
