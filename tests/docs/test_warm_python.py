"""The warm ``python`` the docs tests run blocks with behaves like ``python`` for what a block can see:
argv, ``__main__``, ``__file__``, working folder, environment, stdin/stdout/stderr, exit status, a timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from refmodel.testing.warm import start


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("warm")
    python = start(folder, dict(os.environ), preload=("json",))
    if python.proc is None:
        pytest.skip("REFMODEL_COLD_PYTHON=1: no warm parent")
    yield python
    python.stop()


def run(warm, *args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*warm.command, *args], capture_output=True, text=True, timeout=60, **kw)


def test_a_script_runs_as_main_with_its_argv_folder_and_environment(warm, tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import os, sys\nprint(__name__, __file__, sys.argv[1:], os.getcwd(), os.environ['X'],\n"
                      "      sys.path[0], sys.stdin.read().strip())\nprint('err', file=sys.stderr)\nsys.exit(3)\n")
    done = run(warm, "s.py", "a", "b", cwd=tmp_path, env={**os.environ, "X": "y"}, input="in")
    assert done.returncode == 3
    assert done.stdout.split() == ["__main__", "s.py", "['a',", "'b']", str(tmp_path), "y", str(tmp_path), "in"]
    assert done.stderr == "err\n"


def test_c_m_a_traceback_and_the_real_interpreter_for_anything_else(warm, tmp_path):
    done = run(warm, "-c", "import sys; print(sys.argv); raise ValueError('boom')", "z", cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == "['-c', 'z']\n" and "ValueError: boom" in done.stderr
    done = run(warm, "-m", "json.tool", cwd=tmp_path, input='{"a": 1}')
    assert done.returncode == 0 and '"a": 1' in done.stdout
    done = run(warm, "-V")  # not -c/-m/a script: exec'd as the real interpreter
    assert done.returncode == 0 and done.stdout.strip() == f"Python {sys.version.split()[0]}"


def test_a_timed_out_command_is_killed_with_its_children(warm, tmp_path):
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            "open('pid', 'w').write(str(p.pid)); time.sleep(60)")
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([*warm.command, "-c", code], cwd=tmp_path, timeout=3, capture_output=True)
    grandchild = int((tmp_path / "pid").read_text())
    for _ in range(50):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the timed-out command's child is still running")
