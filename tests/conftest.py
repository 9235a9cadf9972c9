"""Shared fixtures: tiny models are built once per session and loaded through from_pretrained."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from refmodel.testing import FAMILIES, load_tiny, make_tiny_model


def pytest_collection_modifyitems(config, items):
    """The ``gpu`` marker (CONTRIBUTING): such a test needs CUDA and is skipped, with a reason, without it.
    The ``lowest`` job runs last, so that its venv's background build (below) has the whole suite to finish."""
    items.sort(key=lambda item: item.get_closest_marker("lowest") is not None)  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def pytest_collection_finish(session):
    """With ``REFMODEL_TEST_LOWEST=1`` and the lowest-versions job among many selected tests (``make test``),
    build its venv in the background from now on (``config.lowest_build``; the job waits for it): the
    download and install take minutes of network and disk, and little CPU, which the suite can overlap."""
    if os.environ.get("REFMODEL_TEST_LOWEST") != "1" or len(session.items) < 2:
        return
    if not any(item.get_closest_marker("lowest") for item in session.items):
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from test_lowest_versions import start_background_build

    session.config.lowest_build = start_background_build(Path(__file__).parents[1] / ".venv-lowest.log")


def pytest_sessionfinish(session):
    build = getattr(session.config, "lowest_build", None)
    if build is not None and build.poll() is None:  # the run stopped before the job (-x, Ctrl-C)
        build.terminate()
        build.wait()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict:
    """``{family: path}`` of saved tiny models (llama, gpt2, gemma2)."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: make_tiny_model(family, root / family) for family in FAMILIES}


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny(tiny_model_dirs, family):
    """``(model, tokenizer)`` of one family, freshly loaded in eval mode."""
    return load_tiny(tiny_model_dirs[family])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)



@pytest.fixture(scope="module")
def one_rank_group():
    """A 1-rank gloo process group for a module's tests (FSDP2 and DDP in one process), destroyed after them."""
    import torch.distributed as dist

    from refmodel.testing import free_port

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def cli_python(tmp_path_factory) -> list[str]:
    """``python`` for ``run_cli(..., python=cli_python)``: each CLI run forked from one parent that has imported
    torch and transformers (:mod:`refmodel.testing.warm`), for tests of what a command does and writes, not of
    what it prints while importing (those keep a fresh interpreter: the default)."""
    from refmodel.testing.processes import subprocess_env
    from refmodel.testing.warm import start

    warm = start(tmp_path_factory.mktemp("cli-python"), subprocess_env(),
                 preload=("torch", "transformers", "refmodel.cli.main", "refmodel.precompute", "refmodel.store"))
    yield warm.command
    warm.stop()
