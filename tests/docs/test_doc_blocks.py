"""Every code block of README.md and docs/ is classified, and the runnable ones run (see ``doc_blocks``)."""

from __future__ import annotations

import re

import pytest
from doc_blocks import (
    Block,
    pages,
    parse,
    prepare_workdir,
    run_python,
    run_shell,
    serve_args,
    shell_commands,
    substitute,
    substitutions,
)

from refmodel.testing import ServeProcess

BLOCK_TIMEOUT_S = 300
ALL = [b for p in pages() for b in parse(p)]
RUNNABLE_PAGES = sorted({b.page for b in ALL if b.kind() in ("python", "shell")})


def test_every_block_is_classified():
    """The inventory (printed: ``pytest -s``); a block the convention does not cover fails, with its place."""
    for b in ALL:
        print(f"{b.where:40s} {b.lang:8s} {b.kind()}{' (' + b.reason + ')' if b.kind() == 'skip' else ''}")
    bad = [f"{b.where}: {b.kind()}" for b in ALL if b.kind().startswith("unclassified")]
    assert not bad, "code blocks the docs tests cannot classify (CONTRIBUTING, Docs):\n" + "\n".join(bad)
    first_python = {}
    for b in ALL:
        if b.lang == "python" and b.directive == "continue":
            assert b.page in first_python, f"{b.where}: 'continue' with no python block before it on the page"
        if b.lang == "python":
            first_python.setdefault(b.page, b)


def test_the_classifier_refuses_what_it_cannot_run():
    """The classifier can fail: unknown fences, unknown commands, skips without a reason."""
    assert Block("x.md", 1, "rust", "fn main() {}\n").kind().startswith("unclassified")
    assert Block("x.md", 1, "bash", "pip install refmodel\n").kind().startswith("unclassified")
    assert Block("x.md", 1, "bash", "pip install refmodel\n", "skip", "installs packages").kind() == "skip"
    assert Block("x.md", 1, "python", "1\n", "skip", "").kind().startswith("unclassified")
    assert Block("x.md", 1, "bash", "refmodel store info s \\\n  # c\n").kind() == "shell"
    assert shell_commands(Block("x.md", 1, "console", "$ refmodel --help\nUsage: refmodel\n")) == ["refmodel --help"]


@pytest.fixture(scope="session")
def doc_fixtures(tmp_path_factory):
    from doc_blocks import make_fixtures

    return make_fixtures(tmp_path_factory.mktemp("doc-fixtures"))


def _units(blocks: list[Block]) -> list[tuple[list[Block], str]]:
    """Runnable units in page order: a python block with its ``continue`` followers, or one shell block."""
    units: list[tuple[list[Block], str]] = []
    for b in blocks:
        kind = b.kind()
        if kind == "python" and b.directive == "continue":
            last = next(u for u in reversed(units) if u[1] == "python")
            last[0].append(b)
        elif kind in ("python", "shell"):
            units.append(([b], kind))
    return units


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_page_blocks_run(page, doc_fixtures, python, tmp_path, monkeypatch):
    """A page's runnable blocks, in order, in one folder; ``refmodel serve`` runs until the page ends."""
    blocks = [b for b in ALL if b.page == page]
    prepare_workdir(tmp_path, doc_fixtures)
    monkeypatch.chdir(tmp_path)  # ServeProcess resolves --model and --token-file paths from here
    servers: list[ServeProcess] = []
    port = None
    try:
        for unit, kind in _units(blocks):
            where = ", ".join(b.where for b in unit)
            if kind == "python":
                subs = substitutions(doc_fixtures, port or 8000)
                done = run_python(substitute("".join(b.code for b in unit), subs), tmp_path, BLOCK_TIMEOUT_S, python)
            else:
                done, batch = None, []
                for command in [*shell_commands(unit[0]), None]:
                    is_serve = command is not None and re.match(r"(python -m )?refmodel serve\b", command)
                    if (command is None or is_serve) and batch:  # run what comes before, in order
                        subs = substitutions(doc_fixtures, port or 8000)
                        done = run_shell([substitute(c, subs) for c in batch], tmp_path, BLOCK_TIMEOUT_S, python)
                        batch = []
                        if done.returncode != 0:
                            break
                    if is_serve:
                        args = serve_args(substitute(command, substitutions(doc_fixtures, 8000)))
                        servers.append(ServeProcess(args, log_path=tmp_path / f"serve-{len(servers)}.log"))
                        port = int(servers[-1].url.rsplit(":", 1)[1])
                    elif command is not None:
                        batch.append(command)
            print(f"ran {where} ({kind})")
            if done is not None and done.returncode != 0:
                pytest.fail(f"{where} failed ({kind}, exit {done.returncode}):\n--- stdout\n{done.stdout[-4000:]}"
                            f"\n--- stderr\n{done.stderr[-6000:]}")
    finally:
        for server in servers:
            server.stop()
