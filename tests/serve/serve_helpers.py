"""A real ``refmodel serve`` subprocess on a free loopback port, and a tiny reward model."""

from __future__ import annotations

import os
from pathlib import Path

from refmodel.testing import ServeProcess as ServerProcess

TOKEN = "s3cret-token"


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
