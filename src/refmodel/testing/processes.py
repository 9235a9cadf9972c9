"""Child processes for tests, benchmarks and users' own integration tests: the CLI, and a live service.

:class:`ServeProcess` is a real ``refmodel serve`` on a free loopback port, started in a child process
that imports *this* source tree, and ready (``/healthz`` answers 200) when the constructor returns.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .._optional import require


def subprocess_env(**extra) -> dict:
    """Environment for child processes that import *this* ``refmodel`` (its source tree first on PYTHONPATH)."""
    src = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(*args, check: bool = True, timeout: float = 600, python: list[str] | None = None, **env):
    """Run ``python -m refmodel ARGS`` in a child process; returns the ``CompletedProcess`` (text).

    ``python``: the interpreter's argv (default: this one, a fresh process); a
    :class:`refmodel.testing.warm.WarmPython`'s ``command`` forks it from a parent that has imported torch
    (not for a test of what the CLI prints at import time). ``env``: extra environment variables.
    """
    return subprocess.run([*(python or [sys.executable]), "-m", "refmodel", *map(str, args)], capture_output=True,
                          text=True, check=check, timeout=timeout, env=subprocess_env(**env))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS's choice)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeProcess:
    """``python -m refmodel serve ARGS --port PORT`` on 127.0.0.1, ready when constructed; a context manager.

    Args:
        args: the ``refmodel serve`` flags (``["--model", "tiny=PATH", ...]``; numbers are converted).
        log_path: where the server's stdout and stderr go (None: discarded).
        token: the bearer token the server was given (``--token-file``), for :attr:`headers`.
        startup_s: how long to wait for ``/healthz``; the server's log is in the error if it does not come up.
    """

    def __init__(self, args: list, log_path: Path | None = None, token: str | None = None, startup_s: float = 120.0):
        httpx = require("httpx", "serve")

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        self.log_path = log_path
        self._log = open(log_path, "w") if log_path is not None else None
        out = self._log if self._log is not None else subprocess.DEVNULL
        cmd = [sys.executable, "-m", "refmodel", "serve", "--port", str(self.port), *map(str, args)]
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env())
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"refmodel serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"refmodel serve did not answer /healthz within {startup_s} s:\n{self.log()}")

    @property
    def headers(self) -> dict:
        """The ``Authorization`` header for :attr:`token` (empty without one)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def log(self) -> str:
        """What the server has written so far ("" when its output is discarded)."""
        if self._log is None or self.log_path is None:
            return ""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def terminate(self) -> None:
        """SIGTERM: the server drains admitted requests, then exits."""
        self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM and wait (SIGKILL after ``timeout_s``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["ServeProcess", "free_port", "run_cli", "subprocess_env"]
