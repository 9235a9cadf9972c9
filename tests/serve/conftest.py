"""The hardened test server, shared by the hardening and the fuzz tests (started once per session)."""

from __future__ import annotations

import pytest
from serve_helpers import POSITIONS, make_tiny_reward_model, start_hardened_server

from refmodel.testing import make_tiny_model


@pytest.fixture(scope="session")
def hardened_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardened")
    return {"gpt2": make_tiny_model("gpt2", root / "gpt2", n_positions=POSITIONS),
            "rm": make_tiny_reward_model(root / "rm", max_position_embeddings=POSITIONS), "root": root}


@pytest.fixture(scope="session")
def hardened_server(hardened_dirs):
    proc = start_hardened_server(hardened_dirs["gpt2"], hardened_dirs["rm"], hardened_dirs["root"])
    yield proc
    proc.stop()
