"""The scripts in examples/ run end to end on tiny stand-ins (``--model`` / ``--dataset`` point at them)."""

from __future__ import annotations

import subprocess

import pytest
from doc_blocks import ROOT, child_env, make_fixtures

from refmodel.testing import free_port


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return make_fixtures(tmp_path_factory.mktemp("example-fixtures"))


def run_example(python: list[str], name: str, args: list, cwd, timeout: float = 600) -> str:
    done = subprocess.run([*python, str(ROOT / "examples" / name), *map(str, args)], cwd=cwd,
                          env=child_env(cwd), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done.stdout


@pytest.mark.slow
@pytest.mark.integration
def test_dpo_precomputed_store(fixtures, python, tmp_path):
    out = run_example(python, "dpo_precomputed_store.py", ["--model", fixtures["model"], "--dataset", fixtures["pairs"],
                                                   "--num-examples", 16, "--max-steps", 2], tmp_path)
    assert (tmp_path / "runs" / "ref-store" / "manifest.json").is_file()
    assert "'refmodel/store_misses': 0" in out or "refmodel/store_misses': 0.0" in out, out[-2000:]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("reference", ["adapter", "frozen"])
def test_grpo_with_reference(fixtures, python, tmp_path, reference):
    out = run_example(python, "grpo_with_reference.py", ["--model", fixtures["model"], "--dataset", fixtures["prompts"],
                                                 "--num-examples", 8, "--max-steps", 1, "--reference", reference],
                      tmp_path)
    assert "refmodel/ref_rows" in out, out[-2000:]


@pytest.mark.slow
@pytest.mark.integration
def test_shared_reference_service(fixtures, python, tmp_path):
    out = run_example(python, "shared_reference_service.py", [
        "--model", fixtures["model"], "--dataset", fixtures["pairs"], "--prompts", fixtures["prompts"],
        "--num-examples", 8, "--max-steps", 1, "--port", free_port()], tmp_path)
    assert "dpo done" in out and "grpo done" in out and "both jobs trained" in out, out[-2000:]
