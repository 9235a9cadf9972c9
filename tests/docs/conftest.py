"""The session's warm ``python`` (:mod:`refmodel.testing.warm`): one parent that has imported torch, transformers and TRL,
forking a child per docs block, shell command and example (each still its own process)."""

from __future__ import annotations

import pytest
from doc_blocks import child_env

from refmodel.testing.warm import WarmPython, start


@pytest.fixture(scope="session")
def python(tmp_path_factory) -> list[str]:
    """The argv that stands for ``python`` in the docs tests (``REFMODEL_COLD_PYTHON=1``: a fresh interpreter)."""
    folder = tmp_path_factory.mktemp("warm-python")
    warm: WarmPython = start(folder, child_env(folder))
    yield warm.command
    warm.stop()
