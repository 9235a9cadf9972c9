import subprocess
import sys

import refmodel
from refmodel import errors
from refmodel.testing import run_cli, subprocess_env


def test_cli_help_and_version():
    out = run_cli("--help")
    for command in ("demo", "bench", "make-tiny-model"):
        assert command in out.stdout
    assert refmodel.__version__ in run_cli("--version").stdout
    bad = run_cli("no-such-command", check=False)
    assert bad.returncode != 0 and "No such command" in bad.stderr


def test_error_hierarchy():
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.RefModelError)
    assert issubclass(errors.InvalidBatch, ValueError)
    assert issubclass(errors.StoreMiss, KeyError)
    assert str(errors.StoreMiss("no entry for key abc")) == "no entry for key abc"


def test_import_has_no_side_effects():
    code = "import os, refmodel, sys; env = dict(os.environ); assert 'ray' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=subprocess_env())
    assert out.stdout.strip() == "ok"


def test_testing_re_exports_the_product_owners():
    """``refmodel.testing`` is a front door for tests: each name is the owner's object, not a copy."""
    import refmodel.data.builtin
    import refmodel.data.records
    import refmodel.models.tiny
    import refmodel.recipes.builtin
    import refmodel.testing
    import refmodel.testing.processes

    owners = (refmodel.data.builtin, refmodel.data.records, refmodel.models.tiny, refmodel.recipes.builtin,
              refmodel.testing.processes)
    for name in refmodel.testing.__all__:
        value = getattr(refmodel.testing, name)
        assert any(getattr(m, name, None) is value for m in owners), name
