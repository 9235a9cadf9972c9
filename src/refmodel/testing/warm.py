"""A warm ``python``: one parent that has imported torch, transformers, TRL, ... forks a child per command.

The docs blocks, the examples and the benchmark scripts each ran in a fresh interpreter, and each paid the
same 3-10 s of CPU to import torch, transformers and TRL before its first line (most of ``tests/docs``' and
the quick benchmarks' time on 2 cores).
Here one server process imports them once; every command is then a forked child of it that is given the
command's own argv, working folder, environment and stdin/stdout/stderr (the client's file descriptors,
passed over a Unix socket), runs as ``python ARGS`` would (``-c CODE``, ``-m MODULE`` or a script, as
``__main__``), and exits with the command's status. So each command still runs in its own process, with
its own memory, from the same state (the parent only imports: no model, no RNG draw, no thread pool).

What a child shares with the parent (and so with the other commands): the modules already imported and
what they read from the environment at import time (the Hugging Face cache folder and offline flags are
the session's, set by :func:`start`). Anything else a client asks for (``python -X ...``, ``-``, no
arguments) falls back to the real interpreter (``exec``). ``REFMODEL_COLD_PYTHON=1`` turns the warm path
off (every command in a fresh interpreter, as before) to tell the two apart when a command misbehaves.
Not for a test of what a command prints at import time (the parent has printed it already).

    python warm.py serve SOCKET MODULE...   # the parent (started by :func:`start`)
    python warm.py client SOCKET ARGS...     # what `python ARGS` becomes (only the standard library:
                                             # run as a file, not as refmodel.testing.warm, so as not to
                                             # import refmodel and torch)
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
# What the docs blocks, examples and benchmarks import (a module that fails to import is left to the child).
PRELOAD = ("torch", "numpy", "transformers", "transformers.models.llama.modeling_llama", "datasets", "peft", "trl",
           "refmodel", "refmodel.integrations.trl", "refmodel.cli.main", "refmodel.precompute", "refmodel.store",
           "refmodel.losses", "refmodel.data", "refmodel.testing", "refmodel.tools.bench", "httpx", "click")


def cold() -> bool:
    """Whether ``REFMODEL_COLD_PYTHON`` asks for a fresh interpreter per command."""
    return os.environ.get("REFMODEL_COLD_PYTHON", "") not in ("", "0")


class WarmPython:
    """The running parent: :attr:`command` is the argv prefix that stands for ``python``."""

    def __init__(self, socket_path: Path, proc: subprocess.Popen | None):
        self.socket_path = socket_path
        self.proc = proc

    @property
    def command(self) -> list[str]:
        if self.proc is None:
            return [sys.executable]
        return [sys.executable, str(HERE), "client", str(self.socket_path)]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(folder: Path, env: dict, preload: tuple[str, ...] = PRELOAD, timeout_s: float = 300) -> WarmPython:
    """Start the parent in ``folder`` (its socket, log and HF cache) with ``env``; ready when it returns.

    ``env`` is the children's usual environment (its ``PYTHONPATH`` decides the parent's ``sys.path``, so it
    must be the one the commands will have); ``stop()`` the result when done. Under ``REFMODEL_COLD_PYTHON=1``
    nothing starts and :attr:`WarmPython.command` is plain ``python``.
    """
    socket_path = folder / "warm.sock"
    if len(str(socket_path)) > 100:  # a Unix socket's path is limited to ~104-108 bytes
        import tempfile

        socket_path = Path(tempfile.mkdtemp(prefix="warm-")) / "warm.sock"
    if cold():
        return WarmPython(socket_path, None)
    log = folder / "warm.log"
    proc = subprocess.Popen([sys.executable, str(HERE), "serve", str(socket_path), *preload], cwd=folder,
                            env={**env, "HF_HOME": str(folder / ".hf")}, stdin=subprocess.DEVNULL,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while not socket_path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the warm python did not start (exit {proc.poll()}):\n{log.read_text()[-4000:]}")
        time.sleep(0.1)
    return WarmPython(socket_path, proc)


# --- the client: what `python ARGS` becomes ------------------------------------------------------------------

def client(socket_path: str, argv: list[str]) -> int:
    """Hand ``argv``, the working folder, the environment and fds 0-2 to the parent; its child's status."""
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(socket_path)
        socket.send_fds(conn, [struct.pack("!Q", len(request))], [0, 1, 2])
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(64):
            answer += chunk
    if not answer:  # the parent went away: never report success
        print("warm_python: the parent closed the connection without a status", file=sys.stderr)
        return 1
    return int(answer)


# --- the parent ------------------------------------------------------------------------------------------------

def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    head, fds, _, _ = socket.recv_fds(conn, 8, 3)
    while len(head) < 8:
        head += conn.recv(8 - len(head))
    (size,) = struct.unpack("!Q", head)
    body = b""
    while len(body) < size:
        chunk = conn.recv(min(1 << 20, size - len(body)))
        if not chunk:
            raise ConnectionError("request cut short")
        body += chunk
    return json.loads(body), list(fds)


def _plan(argv: list[str]) -> tuple[str, str, list[str]] | None:
    """``("c", code, argv)``, ``("m", module, argv)``, ``("script", path, argv)``; None: run the real one."""
    args = list(argv)
    while args and args[0] in ("-u", "-B"):  # unbuffered / no .pyc: no effect worth a cold start
        args.pop(0)
    if len(args) >= 2 and args[0] == "-c":
        return "c", args[1], ["-c", *args[2:]]
    if len(args) >= 2 and args[0] == "-m":
        return "m", args[1], [args[1], *args[2:]]
    if args and not args[0].startswith("-"):
        return "script", args[0], args
    return None


def _child(request: dict, fds: list[int]) -> None:
    """In the forked child: become ``python ARGV`` in the request's folder and environment; never returns."""
    import atexit
    import threading
    import traceback

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    plan = _plan(request["argv"])
    if plan is None:
        os.execv(sys.executable, [sys.executable, *request["argv"]])
    kind, what, sys.argv = plan
    code = 0
    try:
        if kind == "m":
            import runpy

            sys.path[0] = os.getcwd()
            runpy._run_module_as_main(what, alter_argv=True)  # type: ignore[attr-defined]  # what `-m` calls
        else:
            import types

            source = what if kind == "c" else Path(what).read_text()
            sys.path[0] = "" if kind == "c" else str(Path(what).resolve().parent)
            main = types.ModuleType("__main__")
            main.__dict__["__builtins__"] = __builtins__
            if kind == "script":
                main.__file__ = what
            sys.modules["__main__"] = main
            exec(compile(source, "<string>" if kind == "c" else what, "exec"), main.__dict__)
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:  # what interpreter shutdown does: wait for non-daemon threads, run atexit, flush
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def serve(socket_path: str, preload: list[str]) -> None:
    import importlib
    import select
    import signal

    for name in preload:
        try:
            importlib.import_module(name)
        except Exception as exc:  # the child imports it again and fails the way a fresh interpreter would
            print(f"warm_python: not preloaded {name}: {type(exc).__name__}: {exc}", flush=True)
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path + ".tmp")
    listener.listen(64)
    os.rename(socket_path + ".tmp", socket_path)  # the socket appears only once it accepts
    running: dict[int, socket.socket] = {}
    # SIGTERM (stop()): end now; finalising the imported libraries takes seconds and is not needed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while os.getppid() == parent:
            ready, _, _ = select.select([listener, *running.values()], [], [], 0.05)
            for conn in ready:
                if conn is listener:
                    conn, _ = listener.accept()
                    request, fds = _recv_request(conn)
                    sys.stdout.flush()
                    sys.stderr.flush()
                    pid = os.fork()
                    if pid == 0:
                        listener.close()
                        for other in running.values():
                            other.close()
                        conn.close()
                        os.setpgid(0, 0)
                        _child(request, fds)
                    for fd in fds:
                        os.close(fd)
                    try:
                        os.setpgid(pid, pid)
                    except OSError:  # the child already did (or exited)
                        pass
                    running[pid] = conn
                else:  # a client went away before its child finished (a timeout): end the child's group
                    pid = next(p for p, c in running.items() if c is conn)
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            for pid in list(running):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    code = os.waitstatus_to_exitcode(status)
                    conn = running.pop(pid)
                    try:
                        conn.sendall(str(code if code >= 0 else 128 - code).encode())
                    except OSError:
                        pass
                    conn.close()
    finally:
        for pid in running:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        Path(socket_path).unlink(missing_ok=True)
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3:])
    elif sys.argv[1] == "client":
        sys.exit(client(sys.argv[2], sys.argv[3:]))
    else:
        sys.exit(f"usage: {sys.argv[0]} serve SOCKET MODULE... | client SOCKET ARGS...")
