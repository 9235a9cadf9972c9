"""The lowest versions ``pyproject.toml`` declares, tested: ``make test-lowest``.

A venv (``.venv-lowest`` at the repository root, kept between runs) gets every core dependency pinned at
its floor (``>=X`` becomes ``==X`` in a constraints file written from pyproject, so no resolver option is
needed), the test tools at their current versions, and refmodel itself without dependencies; then the
fast tests of the core rooms run there. Extras are left out: their tests skip (``importorskip``). It
downloads, so it runs only with ``REFMODEL_TEST_LOWEST=1`` (what ``make test-lowest`` sets).

torch comes from PyTorch's CPU index (``REFMODEL_TORCH_INDEX``): the floor's default wheel on PyPI is the CUDA
one (GBs). ``REFMODEL_TORCH_INDEX=installed`` keeps the running interpreter's torch instead (a machine
that cannot reach that index), testing every other floor.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-lowest"
TORCH_INDEX = os.environ.get("REFMODEL_TORCH_INDEX", "https://download.pytorch.org/whl/cpu")
CORE_ROOMS = ["tests/data", "tests/logprobs", "tests/losses", "tests/store", "tests/models", "tests/test_layout.py",
              "tests/test_validation.py", "tests/test_optional.py"]



def floor_pins(dependencies: list[str]) -> list[str]:
    """``name==X`` for every ``name>=X`` (markers kept); a dependency without a floor is an error."""
    pins = []
    for dep in dependencies:
        spec, _, marker = dep.partition(";")
        found = re.fullmatch(r"\s*([A-Za-z0-9_.\-\[\]]+)\s*>=\s*([\w.]+)\s*(?:,.*)?", spec)
        if found is None:
            raise AssertionError(f"{dep!r} declares no lower bound (`>=`): every dependency needs one to be tested")
        pins.append(f"{found[1]}=={found[2]}" + (f"; {marker.strip()}" if marker else ""))
    return pins


def test_floor_pins_are_read_from_the_declared_bounds():
    assert floor_pins(["torch>=2.6", "uvloop>=0.19; sys_platform != 'win32'"]) == [
        "torch==2.6", "uvloop==0.19; sys_platform != 'win32'"]
    with pytest.raises(AssertionError, match="no lower bound"):
        floor_pins(["numpy"])


def _pip(*args: str) -> None:
    subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", *args], check=True, cwd=ROOT)


@pytest.mark.lowest
@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(os.environ.get("REFMODEL_TEST_LOWEST") != "1",
                    reason="downloads the lowest versions: run `make test-lowest`")
def test_fast_tests_pass_at_the_lowest_versions(tmp_path):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = floor_pins(deps)
    constraints = tmp_path / "lowest.txt"
    constraints.write_text("\n".join(pins) + "\n")
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    torch_pin = next(p for p in pins if p.startswith("torch=="))
    if TORCH_INDEX == "installed":  # no CPU index reachable: keep this interpreter's torch (its own wheel)
        import torch

        torch_pin = f"torch=={torch.__version__}"
        pins = [torch_pin if p.startswith("torch==") else p for p in pins]
        constraints.write_text("\n".join(pins) + "\n")
        _pip(torch_pin)
    else:
        _pip("--index-url", TORCH_INDEX, torch_pin)
    _pip("-c", str(constraints), *(p.split(";")[0] for p in pins), "pytest>=8", "pytest-timeout>=2.3")
    _pip("--no-deps", "-e", str(ROOT))
    versions = subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "freeze"], capture_output=True,
                              text=True, check=True).stdout
    for pin in pins:
        name, version = pin.split(";")[0].split("==")
        assert re.search(rf"^{re.escape(name)}=={re.escape(version)}(\.0)*(\+\w+)?$", versions, re.M | re.I), (
            pin, versions)
    # A core room's test file that imports an extra (e.g. serve) is a collection error: reported, not fatal.
    done = subprocess.run([str(VENV / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--continue-on-collection-errors",
                           "-m", "not slow and not ray and not gpu and not lowest", *CORE_ROOMS],
                          cwd=ROOT, capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
