"""A core-only install (``pip install -e .``, no extras): every command starts, and a missing extra is a
one-line message naming it, never a traceback.

The environment is built without downloads: a venv (``--without-pip``) whose ``.pth`` names this
``src`` and a folder of links to the installed distributions in the closure of the core
``dependencies`` of ``pyproject.toml`` (read from their metadata), so matplotlib, FastAPI, PEFT, TRL,
Ray, ... are not importable there even though this machine has them.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import refmodel

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SRC = Path(refmodel.__file__).resolve().parents[1]
OPTIONAL = ("matplotlib", "fastapi", "uvicorn", "pydantic_settings", "peft", "trl", "datasets", "ray", "torchao",
            "bitsandbytes", "httpx", "prometheus_client")


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def core_distributions(requirements: list[str]) -> dict[str, md.Distribution]:
    """The installed distributions in the closure of ``requirements`` (markers evaluated, no extras)."""
    from packaging.requirements import Requirement

    found: dict[str, md.Distribution] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if (req.marker is not None and not req.marker.evaluate({"extra": ""})) or _key(req.name) in found:
            continue
        dist = md.distribution(req.name)
        found[_key(req.name)] = dist
        todo += [Requirement(r) for r in dist.requires or []]
    return found


def _link(src: Path, dst: Path) -> None:
    """Link ``src`` at ``dst``; a folder two distributions share (a namespace package) is merged."""
    if not dst.exists() and not dst.is_symlink():
        dst.symlink_to(src)
    elif dst.resolve() != src.resolve() and src.is_dir() and dst.is_dir():
        if dst.is_symlink():
            old = dst.resolve()
            dst.unlink()
            dst.mkdir()
            for child in old.iterdir():
                _link(child, dst / child.name)
        for child in src.iterdir():
            _link(child, dst / child.name)


def _core_dependencies() -> list[str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((SRC.parent / "pyproject.toml").read_text())["project"]["dependencies"]


@pytest.fixture(scope="module")
def core_python(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("core_only")
    site = root / "site"
    site.mkdir()
    for dist in core_distributions(_core_dependencies()).values():
        for top in sorted({Path(str(f)).parts[0] for f in dist.files or []}):
            if top not in ("..", "__pycache__") and not top.endswith(".pth"):
                _link(Path(str(dist.locate_file(top))), site / top)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (next(venv.glob("lib/python*/site-packages")) / "core.pth").write_text(f"{SRC}\n{site}\n")
    return venv / "bin" / "python"


def _run(python: Path, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(python.parents[2])}
    return subprocess.run([str(python), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


# One process: no optional package is importable, every module imports or raises MissingDependency,
# and every command's --help works.
PROBE = r"""
import importlib, json, pkgutil
import click
from click.testing import CliRunner
import refmodel
from refmodel.cli.main import main
from refmodel.errors import MissingDependency
out = {"importable": [], "modules": {}, "help": {}}
for name in json.loads(__import__("sys").argv[1]):
    try:
        importlib.import_module(name)
        out["importable"].append(name)
    except ImportError:
        pass
for info in pkgutil.walk_packages(refmodel.__path__, "refmodel."):
    if info.name.endswith("__main__"):
        continue
    try:
        importlib.import_module(info.name)
        out["modules"][info.name] = "ok"
    except MissingDependency as exc:
        out["modules"][info.name] = "missing: " + str(exc)
    except BaseException as exc:
        out["modules"][info.name] = "BROKEN: %s: %s" % (type(exc).__name__, exc)
def walk(group, path):
    for name, cmd in group.commands.items():
        yield path + [name]
        if isinstance(cmd, click.Group):
            yield from walk(cmd, path + [name])
for path in [[]] + list(walk(main, [])):
    res = CliRunner().invoke(main, path + ["--help"])
    out["help"][" ".join(path)] = [res.exit_code, repr(res.exception) if res.exception else None]
print(json.dumps(out))
"""


def test_modules_and_help_need_no_extra(core_python):
    proc = _run(core_python, "-c", PROBE, json.dumps(OPTIONAL))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["importable"] == []  # the environment really is core-only
    broken = {name: what for name, what in out["modules"].items() if what.startswith("BROKEN")}
    assert broken == {}
    missing = {name: what for name, what in out["modules"].items() if what.startswith("missing")}
    assert set(missing) >= {"refmodel.serve", "refmodel.integrations.trl"}
    for what in missing.values():
        assert re.search(r"'\w+' extra: pip install -e .+\[\w+\]", what), what
    assert len(out["help"]) >= 12 and all(v == [0, None] for v in out["help"].values()), out["help"]


def test_serve_says_which_extra(core_python, tmp_path):
    proc = _run(core_python, "-m", "refmodel", "serve", "--model", f"tiny={tmp_path}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "'serve' extra: pip install -e" in proc.stderr and "[serve]" in proc.stderr


def test_grpo_demo_says_which_extra_before_training(core_python, tmp_path):
    proc = _run(core_python, "-m", "refmodel", "demo", "--algo", "grpo", "--out", tmp_path / "demo")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "'peft' extra: pip install -e" in proc.stderr and "trained" not in proc.stdout


def test_demo_trains_and_skips_the_plot_with_one_line(core_python, tmp_path):
    out = tmp_path / "demo"
    proc = _run(core_python, "-m", "refmodel", "demo", "--out", out)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "trained DPO for 300 steps" in proc.stdout and "curves: not drawn" in proc.stdout
    assert "adapter disabled (LoRA): not compared, PEFT is missing" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "curves.png not drawn" in warnings[0] and "[plot]" in warnings[0], proc.stderr
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["plot"] is None and Path(summary["metrics"]) == out / "metrics.jsonl"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == summary["steps"]
