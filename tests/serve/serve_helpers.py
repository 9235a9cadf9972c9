"""A real ``refmodel serve`` subprocess on a free loopback port, and a tiny reward model."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from refmodel.testing import subprocess_env

TOKEN = "s3cret-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m refmodel serve ARGS`` on 127.0.0.1:port; logs go to ``log_path``."""

    def __init__(self, args: list, log_path: Path, token: str | None = None, startup_s: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        self.log_path = log_path
        self._log = open(log_path, "w")
        cmd = [sys.executable, "-m", "refmodel", "serve", "--port", str(self.port), *map(str, args)]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=subprocess_env())
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start within {startup_s} s:\n{self.log()}")

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def make_tiny_reward_model(path: Path, **config_overrides) -> Path:
    """A tiny Llama sequence-classification model (one label), saved with save_pretrained."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from refmodel.testing import make_tokenizer, tiny_config

    tok = make_tokenizer()
    cfg = tiny_config("llama", len(tok), num_labels=1, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = AutoModelForSequenceClassification.from_config(cfg)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


# The limits of the main test server (the checks in service_checks.py rely on them).
MAIN_LIMITS = {"max_seq_len": 64, "max_batch_tokens": 1024, "max_body_bytes": 65536, "max_sequences": 64,
               "max_wait_ms": 20}


def write_token_file(root: Path) -> Path:
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o600)
    return token_file


def start_main_server(llama_dir: Path, reward_dir: Path, root: Path) -> ServerProcess:
    """The main test server: llama as "tiny", a reward model "rm", auth on, small limits."""
    limits = [x for k, v in MAIN_LIMITS.items() for x in ("--" + k.replace("_", "-"), v)]
    return ServerProcess(["--model", f"tiny={llama_dir}", "--reward-model", f"rm={reward_dir}",
                          "--token-file", write_token_file(root), *limits], root / "server.log", token=TOKEN)


class Endpoint:
    """A running service at ``url`` (e.g. a Ray Serve proxy): what the shared checks need."""

    def __init__(self, url: str, token: str | None = None):
        self.url, self.token = url, token

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


# The hardened test server (conftest.hardened_server): models with few positions, short timeouts.
POSITIONS = 32
HARDENED_TIMEOUT_S = 1.0  # header, body and keep-alive timeouts


def start_hardened_server(gpt2_dir: Path, reward_dir: Path, root: Path) -> ServerProcess:
    """GPT-2 ``n_positions=32`` as "short" beside ``--max-seq-len 64``, a reward model "rm" with 32
    positions, auth on, small header limits and 1 s header/body/keep-alive timeouts."""
    t = HARDENED_TIMEOUT_S
    return ServerProcess(["--model", f"short={gpt2_dir}", "--reward-model", f"rm={reward_dir}",
                          "--token-file", write_token_file(root), "--max-seq-len", 64,
                          "--max-batch-tokens", 4096, "--max-wait-ms", 50, "--max-body-bytes", 2**20,
                          "--max-headers", 20, "--max-header-bytes", 4096, "--header-timeout-s", t,
                          "--body-timeout-s", t, "--keep-alive-timeout-s", t], root / "server.log", token=TOKEN)
