"""pyproject.toml: the license in the form setuptools >= 77 takes without a deprecation warning on every
install, and every extra that an error message names exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_is_an_spdx_string_with_its_file(project):
    # `license = { text = ... }` printed SetuptoolsDeprecationWarning on every `pip install -e .`
    assert project["project"]["license"] == "Apache-2.0"
    assert all((ROOT / f).is_file() for f in project["project"]["license-files"])
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    setuptools = next(r for r in project["build-system"]["requires"] if r.startswith("setuptools"))
    assert tuple(map(int, re.search(r">=(\d+)", setuptools).group(1).split("."))) >= (77,)


def test_every_extra_a_message_names_exists(project):
    named = set()
    for path in (ROOT / "src" / "refmodel").rglob("*.py"):
        named |= set(re.findall(r"""require\(\s*["'][\w.]+["']\s*,\s*["'](\w+)["']\s*\)""", path.read_text()))
        named |= set(re.findall(r"""install_command\(\s*["'](\w+)["']\s*\)""", path.read_text()))
    assert {"plot", "serve", "peft", "trl", "ray", "quant"} <= named
    assert named <= set(project["project"]["optional-dependencies"])
