"""Every fenced code block of README.md and docs/**/*.md, classified and run (CONTRIBUTING, "Docs").

The convention, in one place:

- ```` ```python ```` blocks run, each in its own process (a child of the session's warm parent,
  ``refmodel.testing.warm``; ``python`` and ``refmodel`` in shell blocks too); a block preceded by
  ``<!-- docs-test: continue -->`` runs together with the previous python block of its page (its code is
  appended to that block's, in one process).
- ```` ```bash ```` / ```` ```console ```` blocks run in ``bash -e`` when every command in them starts with
  one of :data:`COMMANDS` (``refmodel ...``, ``python -m refmodel ...``, ...); ``console`` lines without
  ``$ `` are output and ignored. ``refmodel serve ...`` is started in the background as a
  :class:`refmodel.testing.ServeProcess` that lives until the end of its page.
- A block preceded by ``<!-- docs-test: skip REASON -->`` is not run (the reason is required).
- ```` ```text ````, ``json``, ``jsonl``, ``yaml``, ``toml``, ``ini``, ``dockerfile`` blocks are data.
- Any other block (or a shell block with another command and no skip) cannot be classified: an error.

A page's blocks run in order in one temp folder (a block may use the files an earlier one wrote), which
starts with ``sft-model/`` (a tiny Llama standing for your SFT model), ``pairs.jsonl`` (64 built-in
preference pairs) and ``prompts.jsonl`` (64 prompts). The one substitution: :func:`substitutions` maps the
Hub model and dataset names the docs use to tiny local stand-ins, and the service's port 8000 to a free one.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The Hub names used in the docs, each standing for a tiny local model or a built-in data folder.
MODEL_IDS = ("Qwen/Qwen2.5-0.5B-Instruct",)
DATASETS = {"trl-lib/ultrafeedback_binarized": "pairs", "trl-lib/tldr": "prompts"}
PORT = "8000"

DATA_LANGS = {"text", "json", "jsonl", "yaml", "toml", "ini", "dockerfile"}
SHELL_LANGS = {"bash", "console", "shell", "sh"}
# Shell commands a docs block may run (anything else needs a skip directive with its reason).
COMMANDS = ("refmodel ", "python -m refmodel ", "python examples/", "python -c ", "echo ", "mkdir ", "cat ",
            "export ", "torchrun ")
DIRECTIVE = re.compile(r"<!--\s*docs-test:\s*(\w+)\s*(.*?)\s*-->")
FENCE = re.compile(r"^(\s*)```(\S*)")


@dataclasses.dataclass
class Block:
    page: str           # relative to the repository root
    line: int           # 1-based line of the opening fence
    lang: str
    code: str
    directive: str | None = None  # "skip", "continue" or an unknown word
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    def kind(self) -> str:
        """``python``, ``shell``, ``skip``, ``data`` or ``unclassified: WHY``."""
        if self.directive == "skip":
            return "skip" if self.reason else "unclassified: a skip directive needs a reason"
        if self.directive not in (None, "continue"):
            return f"unclassified: unknown directive {self.directive!r} (skip REASON or continue)"
        if self.lang in DATA_LANGS:
            return "data" if self.directive is None else "unclassified: a data block cannot continue"
        if self.lang == "python":
            return "python"
        if self.lang in SHELL_LANGS:
            if self.directive == "continue":
                return "unclassified: continue applies to python blocks only"
            bad = [c for c in shell_commands(self) if not c.startswith(COMMANDS)]
            if bad:
                return (f"unclassified: the command {bad[0]!r} is not one the docs tests run (they run "
                        f"{', '.join(c.strip() for c in COMMANDS)}); add <!-- docs-test: skip REASON -->")
            return "shell"
        return (f"unclassified: fence language {self.lang!r} (use python, bash, console, or a data "
                f"language: {', '.join(sorted(DATA_LANGS))})")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def parse(path: Path) -> list[Block]:
    """The fenced blocks of one Markdown page, with the directive on the nearest line before each."""
    lines = path.read_text().splitlines()
    blocks, i, last_text = [], 0, ""
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            if lines[i].strip():
                last_text = lines[i].strip()
            i += 1
            continue
        indent, lang = len(m.group(1)), m.group(2).lower()
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        d = DIRECTIVE.fullmatch(last_text)
        blocks.append(Block(str(path.relative_to(ROOT)), start + 1, lang, "\n".join(body) + "\n",
                            d.group(1) if d else None, d.group(2) if d else ""))
        last_text = "```"
        i += 1
    return blocks


def shell_commands(block: Block) -> list[str]:
    """The commands of a shell block: continuations joined, comments and (console) output dropped."""
    out, pending = [], ""
    for raw in block.code.splitlines():
        line = raw.strip()
        if block.lang == "console":
            if not (line.startswith("$ ") or pending):
                continue
            line = line[2:] if line.startswith("$ ") else line
        if not pending and (not line or line.startswith("#")):
            continue
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        out.append(pending)
        pending = ""
    if pending:
        out.append(pending)
    return out


def substitutions(fixtures: dict[str, Path], port: int) -> dict[str, str]:
    """The one placeholder rule: Hub names -> tiny stand-ins, port 8000 -> the page's free port."""
    subs = {model_id: str(fixtures["model"]) for model_id in MODEL_IDS}
    subs.update({name: str(fixtures[key]) for name, key in DATASETS.items()})
    subs.update({f"127.0.0.1:{PORT}": f"127.0.0.1:{port}", f"localhost:{PORT}": f"localhost:{port}",
                 f"--port {PORT}": f"--port {port}"})
    return subs


def substitute(text: str, subs: dict[str, str]) -> str:
    for old, new in subs.items():
        text = text.replace(old, new)
    return text


def make_fixtures(root: Path) -> dict[str, Path]:
    """The tiny model and data folders the Hub names stand for (built once per session)."""
    from refmodel.testing import make_tiny_model, preference_pairs, write_jsonl

    model = make_tiny_model("llama", root / "tiny-model", tokenizer="bos_eos")
    pairs = preference_pairs(64, seed=0)
    (root / "pairs").mkdir()
    write_jsonl(pairs, root / "pairs" / "train.jsonl")
    (root / "prompts").mkdir()
    write_jsonl([{"prompt": p["prompt"]} for p in pairs], root / "prompts" / "train.jsonl")
    return {"model": model, "pairs": root / "pairs", "prompts": root / "prompts"}


def prepare_workdir(workdir: Path, fixtures: dict[str, Path]) -> None:
    """A page's folder: ``sft-model/``, ``pairs.jsonl`` and ``prompts.jsonl``, as the docs say."""
    shutil.copytree(fixtures["model"], workdir / "sft-model")
    shutil.copy(fixtures["pairs"] / "train.jsonl", workdir / "pairs.jsonl")
    shutil.copy(fixtures["prompts"] / "train.jsonl", workdir / "prompts.jsonl")


def child_env(workdir: Path) -> dict:
    """Offline, one thread, this source tree and this venv's ``refmodel`` first."""
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        "HF_HOME": str(workdir / ".hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true",
    })
    return env


def run_python(code: str, workdir: Path, timeout: float, python: list[str] | None = None
               ) -> subprocess.CompletedProcess:
    """``python _block.py`` in ``workdir``; ``python`` is the interpreter's argv (default: this one, cold;
    the tests pass :class:`refmodel.testing.warm.WarmPython`'s ``command``)."""
    script = workdir / "_block.py"
    script.write_text(code)
    return subprocess.run([*(python or [sys.executable]), str(script)], cwd=workdir, env=child_env(workdir),
                          capture_output=True, text=True, timeout=timeout)


# The `refmodel` console script (pyproject [project.scripts]), run by whatever `python` is.
CONSOLE_SCRIPT = "import sys; from refmodel.cli import main; sys.argv[0] = 'refmodel'; sys.exit(main())"


def run_shell(commands: list[str], workdir: Path, timeout: float, python: list[str] | None = None
              ) -> subprocess.CompletedProcess:
    """``bash -e`` over ``commands`` in ``workdir``; ``python`` and ``refmodel`` in them are this interpreter
    (the venv's, whatever PATH says), through ``python`` as in :func:`run_python`."""
    prefix = " ".join(shlex.quote(w) for w in (python or [sys.executable]))
    script = (f"set -euo pipefail\npython() {{ {prefix} \"$@\"; }}\n"
              f"refmodel() {{ {prefix} -c {shlex.quote(CONSOLE_SCRIPT)} \"$@\"; }}\n" + "\n".join(commands) + "\n")
    return subprocess.run(["bash", "-c", script], cwd=workdir, env=child_env(workdir), capture_output=True,
                          text=True, timeout=timeout)


def serve_args(command: str) -> list[str]:
    """``refmodel serve ARGS [&]`` -> ARGS without ``--port`` (ServeProcess picks the port)."""
    words = shlex.split(command.rstrip("& "))
    words = words[words.index("serve") + 1:]
    out, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif w == "--port":
            skip = True
        elif not w.startswith("--port="):
            out.append(w)
    return out
