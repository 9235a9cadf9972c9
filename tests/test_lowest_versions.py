"""The lowest versions ``pyproject.toml`` declares, tested: ``make test-lowest`` (and ``make test``, after the suite).

A venv (``.venv-lowest`` at the repository root) gets every core dependency and every dependency of the
extras in :data:`EXTRAS` pinned at its floor (``>=X`` becomes ``==X`` in a constraints file written from
pyproject, so no resolver option is needed), their own dependencies at whatever the resolver picks, the
test tools at their current versions, and refmodel itself without dependencies; then the tests in
:data:`SELECTED` run there. The venv is kept between runs and rebuilt from scratch when the pins change
(its ``.pins`` stamp holds them with the Python version).

Extras installed at their floors (:data:`EXTRAS`): ``peft``, ``serve`` and ``quant`` -- the rooms that use them
(log-probs of adapters, references, the service and its client, torchao and bitsandbytes references and the
model cache) are among the selected tests. Left out,
so their tests skip there (``importorskip``) or are not selected:

- ``trl``: TRL 1.16 (its floor, and its ceiling) needs numpy>=1.26, pyarrow>=21 and datasets>=4.7,
  above the core floors (numpy 1.24, pyarrow 14): it cannot be installed beside them.
- ``ray`` (a large install, and its tests are ``slow``), ``distributed`` (DeepSpeed), ``plot``, ``docs``,
  ``dev``: not what the fast tests exercise.

The selection (:data:`SELECTED`, fast tests only: ``not slow``, less :data:`DESELECTED`) is what exercises
the floors at a small cost: tiny transformers models loaded, run and fingerprinted (torch, transformers,
tokenizers, safetensors), the log-prob kernels and losses (torch), the store (numpy, pyarrow), PEFT adapters
on and off (peft), precompute's prompt-shared KV cache at the position limit (transformers' cache API), the
references built from all of these, the service's units, validation and client errors (FastAPI, pydantic,
pydantic-settings, httpx, uvicorn). The slow end-to-end jobs (precompute runs, many-process servers) test
refmodel, not the floors, and run in the main suite at the newest versions.

torch is installed at its floor from the configured index (PyPI: the CUDA build, which runs on the
CPU). ``REFMODEL_TORCH_INDEX=URL`` takes the floor from another index instead (e.g. PyTorch's CPU index,
``https://download.pytorch.org/whl/cpu``, a far smaller download where it is reachable);
``REFMODEL_TORCH_INDEX=installed`` keeps the running interpreter's torch version (a machine that can
reach no index with the floor), testing every other floor.

It downloads (about 3 GB, the torch floor and its CUDA libraries; minutes the first time), so it runs
only with ``REFMODEL_TEST_LOWEST=1`` (what ``make test-lowest`` sets). A failure lists the failed tests
and the installed versions of the pinned packages.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-lowest"
PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".pins"
TORCH_INDEX = os.environ.get("REFMODEL_TORCH_INDEX", "pypi")
EXTRAS = ("peft", "serve", "quant")
SELECTED = ["tests/data", "tests/logprobs", "tests/losses", "tests/store/test_store.py",
            "tests/store/test_versions.py", "tests/store/test_interop.py", "tests/store/test_halos.py",
            "tests/models/test_tiny.py", "tests/models/test_fingerprint.py", "tests/models/test_loading.py",
            "tests/models/test_quantize.py", "tests/models/test_cache.py",
            "tests/precompute/test_positions.py", "tests/reference", "tests/remote",
            "tests/serve/test_serve_units.py", "tests/serve/test_validate.py", "tests/test_layout.py",
            "tests/test_validation.py", "tests/test_optional.py"]
MARKERS = "not slow and not ray and not gpu and not lowest"
# Each starts refmodel commands in fresh interpreters (torch's CUDA build imports slowly): a third of the run's
# time for refmodel's own refusal rules, not the floors; click is still run by tests/remote's real service.
DESELECTED = ["tests/models/test_loading.py::test_cli_refuses_without_running_anything",
              "tests/models/test_loading.py::test_in_a_terminal_answering_yes_still_runs_no_code"]
ALSO_SHOWN = ("huggingface-hub", "accelerate", "starlette", "pydantic-core")  # not pinned, but they matter


def floor_pins(dependencies: list[str]) -> list[str]:
    """``name==X`` for every ``name>=X`` (markers kept, extras of a dependency dropped); a dependency
    without a floor is an error."""
    pins = []
    for dep in dependencies:
        spec, _, marker = dep.partition(";")
        found = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*>=\s*([\w.]+)\s*(?:,.*)?", spec)
        if found is None:
            raise AssertionError(f"{dep!r} declares no lower bound (`>=`): every dependency needs one to be tested")
        pins.append(f"{found[1]}=={found[2]}" + (f"; {marker.strip()}" if marker else ""))
    return pins


def lowest_pins(project: dict) -> list[str]:
    """The floors of the core dependencies and of :data:`EXTRAS`, in pyproject's order."""
    extras = project["optional-dependencies"]
    return floor_pins(project["dependencies"] + [d for extra in EXTRAS for d in extras[extra]])


def test_floor_pins_are_read_from_the_declared_bounds():
    assert floor_pins(["torch>=2.6", "uvloop>=0.19; sys_platform != 'win32'", "uvicorn>=0.55,<0.56",
                       "ray[data,serve]>=2.53"]) == [
        "torch==2.6", "uvloop==0.19; sys_platform != 'win32'", "uvicorn==0.55", "ray==2.53"]
    with pytest.raises(AssertionError, match="no lower bound"):
        floor_pins(["numpy"])


def test_every_extra_installed_at_its_floor_is_declared():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(EXTRAS) <= set(project["optional-dependencies"])
    assert any(p.startswith("torch==") for p in lowest_pins(project))


def _pip(*args: str) -> None:
    # --no-compile: byte-compiling ~3 GB of site-packages is most of the install's CPU time; Python compiles
    # what the tests import on first import
    subprocess.run([str(PYTHON), "-m", "pip", "install", "-q", "--no-compile", *args], check=True, cwd=ROOT)


def _build(pins: list[str]) -> None:
    """A fresh ``.venv-lowest`` with ``pins`` installed (the caller stamps it)."""
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    constraints = VENV / "constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")
    torch_pin = next(p for p in pins if p.startswith("torch=="))
    if TORCH_INDEX not in ("pypi", "installed"):
        _pip("--index-url", TORCH_INDEX, torch_pin)
    _pip("-c", str(constraints), *(p.split(";")[0] for p in pins), "pytest>=8", "pytest-timeout>=2.3")
    _pip("--no-deps", "-e", str(ROOT))


def _key(name: str) -> str:
    """A distribution name as pip compares them (``prometheus_client`` is ``prometheus-client``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _versions(pins: list[str]) -> str:
    """``pip freeze`` lines of the pinned packages and :data:`ALSO_SHOWN`."""
    names = {_key(p.split("==")[0]) for p in pins} | set(ALSO_SHOWN)
    frozen = subprocess.run([str(PYTHON), "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    return "\n".join(line for line in frozen.splitlines() if _key(re.split(r"[=@ ]", line)[0]) in names)


def wanted_pins() -> list[str]:
    """The pins ``.venv-lowest`` must hold: :func:`lowest_pins` of pyproject, torch's replaced by this
    interpreter's under ``REFMODEL_TORCH_INDEX=installed``."""
    import tomllib  # Python 3.11+: the job runs on 3.11 (the module skips without it)

    pins = lowest_pins(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"])
    if TORCH_INDEX == "installed":  # no index with the floor: keep this interpreter's torch (its own wheel)
        import torch

        pins = [f"torch=={torch.__version__}" if p.startswith("torch==") else p for p in pins]
    return pins


def ensure_venv(pins: list[str]) -> None:
    """``.venv-lowest`` holding ``pins``: kept when its stamp says so, else built afresh (stamp written last,
    so an interrupted build is redone)."""
    stamp = "\n".join([sys.version.split()[0], TORCH_INDEX, *pins]) + "\n"
    if STAMP.is_file() and STAMP.read_text() == stamp:
        return
    _build(pins)
    STAMP.write_text(stamp)


def start_background_build(log: Path) -> subprocess.Popen:
    """:func:`ensure_venv` in another process (``python tests/test_lowest_versions.py build``), output to ``log``:
    ``tests/conftest.py`` starts it when a run that includes the job begins (``config.lowest_build``), so that
    the download and install (bound by the network and the disk, ~3 GB) overlap the suite instead of adding to
    it; the test then waits for it."""
    return subprocess.Popen([sys.executable, __file__, "build"], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


@pytest.mark.lowest
@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(os.environ.get("REFMODEL_TEST_LOWEST") != "1",
                    reason="downloads the lowest versions: run `make test-lowest` (`make test` runs it too)")
def test_fast_tests_pass_at_the_lowest_versions(request):
    pytest.importorskip("tomllib")  # Python 3.11+
    pins = wanted_pins()
    background = getattr(request.config, "lowest_build", None)  # tests/conftest.py: started with the run
    if background is not None:
        background.wait()  # its failure, if any, is repeated (and shown) by the build below
    ensure_venv(pins)
    versions = _versions(pins)
    held = {_key(line.split("==")[0]): line.split("==")[-1] for line in versions.splitlines()}
    for pin in pins:
        name, version = pin.split(";")[0].split("==")
        assert re.fullmatch(rf"{re.escape(version)}(\.0)*(\+\w+)?", held.get(_key(name), "")), (
            f"{pin} is not what .venv-lowest holds (delete it to rebuild):\n{versions}")
    done = subprocess.run([str(PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--tb=short",
                           "-m", MARKERS, *(f"--deselect={d}" for d in DESELECTED), *SELECTED],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"),
                               "COLUMNS": "200"})
    failed = [line for line in done.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    assert done.returncode == 0, (
        f"{len(failed)} tests failed at the lowest versions ({PYTHON} -m pytest -m {MARKERS!r} ...):\n"
        + "\n".join(failed) + f"\n\nunder (Python {sys.version.split()[0]}):\n{versions}\n\n"
        + done.stdout[-6000:] + done.stderr[-2000:])


if __name__ == "__main__" and sys.argv[1:] == ["build"]:
    ensure_venv(wanted_pins())
