"""The package layout's one rule: data flows one way, so a lower room never imports a higher one.

Rooms are ranked along the data flow (data -> planner -> model/head -> store/reference -> losses ->
recipes, DESIGN.md); a module may import its own room and any room of a lower or equal rank. The
test parses every module's imports (also those inside functions: a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import refmodel

PACKAGE = Path(refmodel.__file__).parent

# Rank of each top-level room (a subpackage or a root module). Equal ranks may import each other only
# within the same room.
RANKS = {
    "_version": 0,
    "errors": 0,
    "_optional": 1,
    "_deprecation": 1,
    "validation": 1,
    "data": 2,
    "cluster": 1.5,  # ranks, main-process logging, metric reduction, Ray start-up; under data (2), which logs through it
    "logprobs": 3,
    "models": 4,
    "store": 5,
    "remote": 5,
    "reference": 6,
    "losses": 6,
    "precompute": 7,
    "serve": 7,
    "rl": 7,
    "integrations": 8,
    "recipes": 9,
    "tools": 9,
    "cli": 10,
    "testing": 10,  # re-exports the tiny models and built-in data for tests; the product never imports it
    "kl": 11,  # refmodel.kl: the public namespace of losses.kl (a re-export, like __init__)
    "__init__": 11,
    "__main__": 11,
}


def _room(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == "refmodel", module
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> tuple[str, bool]:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    return ".".join(parts), is_pkg


def _imported_names(source: str, name: str, is_pkg: bool) -> list[tuple[int, str]]:
    """``(line, dotted path)`` of everything a module imports from refmodel: ``import refmodel.a.b`` gives
    ``refmodel.a.b``, ``from ..a import x`` gives ``refmodel.a.x`` (relative imports resolved)."""
    package = name if is_pkg else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return [(line, path) for line, path in found if path.split(".")[0] == "refmodel"]


def _imports(source: str, name: str, is_pkg: bool) -> list[tuple[int, str]]:
    """``(line, module)`` of each refmodel module imported (``from refmodel import x``: the room ``x``)."""
    found = []
    for line, path in _imported_names(source, name, is_pkg):
        target = path if path.count(".") == 1 else path.rsplit(".", 1)[0]
        if (line, target) not in found:
            found.append((line, target))
    return found


def _violations(modules: list[tuple[str, str, bool]]) -> list[str]:
    """``modules``: (source, dotted name, is a package) of each module; returns one line per bad import."""
    bad = []
    for source, name, is_pkg in modules:
        here = _room(name)
        for line, target in _imports(source, name, is_pkg):
            there = _room(target)
            if there == here:
                continue
            if there not in RANKS or here not in RANKS:
                bad.append(f"{name}:{line}: room {there if there not in RANKS else here!r} "
                           "has no rank; add it to RANKS")
            elif RANKS[there] >= RANKS[here] and RANKS[here] < RANKS["__init__"]:
                bad.append(f"{name}:{line}: {here} (rank {RANKS[here]}) imports "
                           f"{target} ({there}, rank {RANKS[there]})")
    return bad


def _package_modules() -> list[tuple[str, str, bool]]:
    return [(path.read_text(), *_module_name(path)) for path in sorted(PACKAGE.rglob("*.py"))]


def test_every_room_is_ranked():
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    rooms |= {p.stem for p in PACKAGE.glob("*.py")}
    assert rooms <= set(RANKS), f"unranked rooms: {sorted(rooms - set(RANKS))}"


def test_no_room_imports_a_higher_one():
    assert _violations(_package_modules()) == []


def test_the_checker_sees_upward_imports():
    # The rule must be able to fail: relative, absolute and function-local upward imports are reported.
    probe = [
        ("from ..recipes import train\n", "refmodel.store.probe", False),
        ("def f():\n    from refmodel.serve import app\n", "refmodel.logprobs.probe", False),
        ("from .. import testing\n", "refmodel.precompute", True),
        ("from ..errors import StoreMiss\nfrom .format import key_of\n", "refmodel.store.ok", False),
    ]
    assert _violations(probe) == [
        "refmodel.store.probe:1: store (rank 5) imports refmodel.recipes (recipes, rank 9)",
        "refmodel.logprobs.probe:2: logprobs (rank 3) imports refmodel.serve (serve, rank 7)",
        "refmodel.precompute:1: precompute (rank 7) imports refmodel.testing (testing, rank 10)",
    ]


def _imports_of_testing(modules: list[tuple[str, str, bool]]) -> list[str]:
    """One line per import of ``refmodel.testing`` by a module outside it (tests' helpers are not product)."""
    return [f"{name}:{line}: imports {target}; the product must not depend on test helpers: import the owner "
            "that refmodel.testing re-exports instead" for source, name, is_pkg in modules
            if _room(name) != "testing" for line, target in _imports(source, name, is_pkg)
            if _room(target) == "testing"]


def test_the_product_never_imports_testing():
    assert _imports_of_testing(_package_modules()) == []


def test_the_checker_sees_imports_of_testing():
    # The rule must be able to fail, also where the rank rule is silent (cli and the root rank above testing).
    probe = [
        ("def f():\n    from ..testing import write_jsonl\n", "refmodel.cli.store", False),
        ("from refmodel.testing import make_tiny_model\n", "refmodel.recipes.demo", False),
        ("from .testing import load_tiny\n", "refmodel", True),
        ("from .processes import run_cli\n", "refmodel.testing", True),
        ("from ..data.records import write_jsonl\n", "refmodel.cli.store", False),
    ]
    assert [line.split(": ")[0] for line in _imports_of_testing(probe)] == [
        "refmodel.cli.store:2", "refmodel.recipes.demo:1", "refmodel:1"]


def _private_imports(modules: list[tuple[str, str, bool]]) -> list[str]:
    """One line per import of another room's private name: a ``_module`` on the path below the room, or
    an imported ``_name``. (A room may be private itself, e.g. ``_optional``: its public names are for all.)"""
    bad = []
    for source, name, is_pkg in modules:
        for line, full in _imported_names(source, name, is_pkg):
            parts = full.split(".")
            if len(parts) < 2 or parts[1] == _room(name):
                continue
            if any(p.startswith("_") and not p.startswith("__") for p in parts[2:]):
                bad.append(f"{name}:{line}: imports {full} (private to {parts[1]})")
    return bad


def test_no_room_imports_another_rooms_private_name():
    assert _private_imports(_package_modules()) == []


def test_the_checker_sees_private_names_across_rooms():
    probe = [
        ("from ..logprobs.kernel import _tile_logits\n", "refmodel.losses.probe", False),
        ("from ..reference import _peft\n", "refmodel.rl.probe", False),
        ("def f():\n    import refmodel.reference._peft\n", "refmodel.integrations.probe", False),
        ("from ._peft import x\nfrom .._optional import require\n", "refmodel.reference.ok", False),
    ]
    assert _private_imports(probe) == [
        "refmodel.losses.probe:1: imports refmodel.logprobs.kernel._tile_logits (private to logprobs)",
        "refmodel.rl.probe:1: imports refmodel.reference._peft (private to reference)",
        "refmodel.integrations.probe:2: imports refmodel.reference._peft (private to reference)",
    ]
