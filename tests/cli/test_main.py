"""The command line's habits: no optional-extra noise, warnings-only logging by default, a Ctrl-C that says
how to resume. Real subprocesses, no terminal."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest

from refmodel.testing import preference_pairs, subprocess_env, write_jsonl

# What the optional extras print when imported eagerly on a CPU-only machine (torchao's missing CUDA
# kernels and Triton, torch's pytree deprecations for torchao's enums, bitsandbytes' CPU kernels),
# and any line naming Ray or FastAPI.
NOISE = re.compile(r"torchao|bitsandbytes|triton|_C_mxfp8|_pytree|gemm_4bit|\bray\b|fastapi|uvicorn", re.I)
INFO_LINE = re.compile(r"^\S+ \S+ INFO ", re.M)


def _run(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=300, env=subprocess_env(), **kwargs)


def test_import_and_help_print_nothing_on_stderr():
    for args in (("-c", "import refmodel"), ("-m", "refmodel", "--help"), ("-m", "refmodel", "precompute", "--help")):
        proc = _run(*args)
        assert proc.returncode == 0 and proc.stderr == "", (args, proc.stderr)
    assert "warnings only" in _run("-m", "refmodel", "--help").stdout


def test_loading_a_model_and_peft_prints_no_extra_noise(tiny_model_dirs):
    # transformers imports torchao (installed here) with its modeling code, and peft imports
    # bitsandbytes: through refmodel's loader and `require`, their import-time notices stay quiet.
    code = ("import sys; from refmodel.models.loading import load_model, load_tokenizer; "
            "from refmodel._optional import require; "
            "load_model(sys.argv[1]); load_tokenizer(sys.argv[1]); require('peft', 'peft')")
    proc = _run("-c", code, tiny_model_dirs["llama"])
    assert proc.returncode == 0, proc.stderr
    assert NOISE.search(proc.stderr) is None, proc.stderr


def test_the_checker_sees_the_noise():
    proc = _run("-c", "import transformers.modeling_utils")  # torchao's notices, unfiltered
    if "torchao" not in proc.stderr:
        pytest.skip("torchao is not installed (or prints nothing here): nothing to filter")
    assert NOISE.search(proc.stderr)


@pytest.mark.slow
@pytest.mark.integration
def test_precompute_logs_warnings_only_and_ctrl_c_says_resume(tiny_model_dirs, tmp_path):
    data = write_jsonl(preference_pairs(300), tmp_path / "pairs.jsonl")  # ~6k tokens: a few seconds of scoring
    out = tmp_path / "store"
    args = ["-m", "refmodel", "precompute", "--model", tiny_model_dirs["llama"], "--data", data, "--out", out,
            "--shard-examples", 2, "--max-tokens-per-batch", 256, "--dtype", "float32"]
    # SIGINT as a terminal gives it: a run started in the background by a non-interactive shell (nohup, `&`)
    # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler; the job ran to the end
    proc = subprocess.Popen([sys.executable, *map(str, args)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list(out.glob("shard-*.safetensors")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "precompute finished before it could be interrupted: give it more work"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Interrupted. Every finished shard is saved in" in stderr and "--resume" in stderr, stderr
    assert "Aborted!" not in stderr and "Traceback" not in stderr, stderr
    assert INFO_LINE.search(stderr) is None, stderr  # default: warnings only
    assert NOISE.search(stderr) is None, stderr
    # The advice works; with -v the INFO lines appear.
    resumed = _run("-m", "refmodel", "-v", *args[2:], "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert INFO_LINE.search(resumed.stderr) and "INFO refmodel.precompute" in resumed.stderr
    info = json.loads(resumed.stdout)
    assert info["pending"] == 0 and info["entries"] == info["job"]["sequences"] > 0, info


def test_make_tiny_model_prints_only_the_path(tmp_path):
    # transformers imports DeepSpeed (when installed) with its modeling code, and DeepSpeed prints
    # "Setting accelerator to CPU" to stdout, resetting its logger's level on import: it used to be the
    # first line of `refmodel demo` and of this command, whose stdout scripts read.
    proc = _run("-m", "refmodel", "make-tiny-model", tmp_path / "tiny")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{tmp_path / 'tiny'}\n"
    assert NOISE.search(proc.stderr) is None and "accelerator" not in proc.stderr, proc.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_serve_says_its_url_once_listening_and_takes_its_own_v(tiny_model_dirs, tmp_path):
    from refmodel.testing import ServeProcess

    log = tmp_path / "server.log"
    with ServeProcess(["--model", f"tiny={tiny_model_dirs['llama']}"], log) as server:
        text = log.read_text()
    # at INFO without any -v: a service's address is what its operator needs first
    lines = [line for line in text.splitlines() if "listening on" in line]
    assert len(lines) == 1 and " INFO " in lines[0] and f"listening on {server.url} (auth off" in lines[0], text
    proc = _run("-m", "refmodel", "serve", "-v")  # `serve -v` used to be "No such option: -v"
    assert proc.returncode == 1 and "nothing to serve" in proc.stderr and "No such option" not in proc.stderr


def test_every_option_of_every_command_says_what_it_does():
    import click

    from refmodel.cli.main import main

    def commands(cmd, path):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from commands(sub, [*path, name])

    bare = [f"refmodel {' '.join(path)} {param.opts[0]}".replace("  ", " ") for path, cmd in commands(main, [])
            for param in cmd.params if isinstance(param, click.Option) and not (param.help or "").strip()]
    assert len(list(commands(main, []))) >= 12
    assert bare == []  # quantize-report's --batch-size and --device had none
