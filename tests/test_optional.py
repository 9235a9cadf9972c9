"""refmodel._optional: the one door for optional imports, and the install command its errors name."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import refmodel
from refmodel._optional import install_command, require
from refmodel.errors import MissingDependency


def test_a_missing_module_names_its_extra_and_a_command_that_installs_it():
    with pytest.raises(MissingDependency) as info:
        require("refmodel_no_such_module", "plot")
    message = str(info.value)
    assert "'refmodel_no_such_module'" in message and "'plot' extra" in message
    assert message.endswith(install_command("plot"))
    # refmodel is not on a package index: the old advice `pip install 'refmodel[plot]'` could not work
    assert "pip install 'refmodel[" not in message


def test_the_command_points_at_this_source_folder_and_an_extra_it_declares():
    words = shlex.split(install_command("serve"))
    assert words[:3] == ["pip", "install", "-e"]
    folder, extra = re.fullmatch(r"(.+)\[(\w+)\]", words[3]).groups()
    assert Path(folder) == Path(refmodel.__file__).resolve().parents[2] and extra == "serve"
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((Path(folder) / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extra in extras
