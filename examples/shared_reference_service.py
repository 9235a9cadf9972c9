"""One reference service shared by two training jobs (DPO and GRPO in TRL), with a bearer token.

    python examples/shared_reference_service.py --model Qwen/Qwen2.5-0.5B-Instruct

Saves the model to a local folder (the service loads allow-listed folders only), writes a random token,
starts ``refmodel serve`` with it, then runs two jobs at once as separate processes, each with
``reference=Remote(url, "sft", token=...)``: a DPO job, and a GRPO job whose reference is scored at its
sampling temperature. On a cluster, start the server once (``refmodel serve --host 0.0.0.0 --model
sft=DIR --token-file FILE``) and run ``--job dpo --url http://HOST:8000 --token-file FILE`` anywhere.
"""

from __future__ import annotations

import argparse
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

URL_WAIT_S = 300


def run_job(kind: str, args) -> None:
    """One training job against the service (a separate process in ``main``)."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refmodel import Remote

    token = Path(args.token_file).read_text().strip()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    gpu = torch.cuda.is_available()
    common = dict(max_steps=args.max_steps, logging_steps=1, use_cpu=not gpu, bf16=gpu, report_to=[])
    if kind == "dpo":
        from trl import DPOConfig

        from refmodel.integrations.trl import DPOTrainer

        trainer = DPOTrainer(AutoModelForCausalLM.from_pretrained(args.model_dir),
                             args=DPOConfig(f"{args.output_dir}/dpo", per_device_train_batch_size=4, **common),
                             train_dataset=load_dataset(args.dataset, split=f"train[:{args.num_examples}]"),
                             processing_class=tokenizer, reference=Remote(args.url, "sft", token=token))
    else:
        from trl import GRPOConfig

        from refmodel.integrations.trl import GRPOTrainer

        config = GRPOConfig(f"{args.output_dir}/grpo", per_device_train_batch_size=8, num_generations=4,
                            max_completion_length=32, beta=0.04, temperature=0.7, **common)
        trainer = GRPOTrainer(AutoModelForCausalLM.from_pretrained(args.model_dir),
                              reward_funcs=lambda completions, **kw: [-abs(20 - len(c)) / 20 for c in completions],
                              args=config, processing_class=tokenizer,
                              train_dataset=load_dataset(args.prompts, split=f"train[:{args.num_examples}]"),
                              reference=Remote(args.url, "sft", token=token, temperature=config.temperature))
    trainer.train()
    print(kind, "done:", {k: v for k, v in trainer.state.log_history[-2].items()
                          if k in ("loss", "kl") or k.startswith("refmodel/")})


def wait_until_up(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + URL_WAIT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"refmodel serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"refmodel serve did not answer at {url} within {URL_WAIT_S} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="Hub id or local folder")
    parser.add_argument("--dataset", default="trl-lib/ultrafeedback_binarized", help="preference data (DPO)")
    parser.add_argument("--prompts", default="trl-lib/tldr", help="prompt-only data (GRPO)")
    parser.add_argument("--num-examples", type=int, default=256)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--output-dir", default="runs/shared-service")
    parser.add_argument("--job", choices=["dpo", "grpo"], help="run one job against --url (used by the launcher)")
    parser.add_argument("--url", help="the service (with --job)")
    parser.add_argument("--token-file", help="the service's token (with --job)")
    parser.add_argument("--model-dir", help="the saved model folder (with --job)")
    args = parser.parse_args(argv)
    if args.job:
        run_job(args.job, args)
        return

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir, token_file = out / "sft-model", out / "token.txt"
    if not (model_dir / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        for part in (AutoModelForCausalLM, AutoTokenizer):
            part.from_pretrained(args.model).save_pretrained(model_dir)
    token_file.write_text(secrets.token_urlsafe(32))
    url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen([sys.executable, "-m", "refmodel", "serve", "--model", f"sft={model_dir}",
                               "--token-file", str(token_file), "--port", str(args.port)])
    try:
        wait_until_up(url, server)
        shared = ["--url", url, "--token-file", str(token_file), "--model-dir", str(model_dir),
                  "--dataset", args.dataset, "--prompts", args.prompts, "--num-examples", str(args.num_examples),
                  "--max-steps", str(args.max_steps), "--output-dir", args.output_dir]
        jobs = [subprocess.Popen([sys.executable, __file__, "--job", kind, *shared]) for kind in ("dpo", "grpo")]
        codes = [job.wait() for job in jobs]
    finally:
        server.terminate()
        server.wait(timeout=60)
    if any(codes):
        raise SystemExit(f"jobs exited with {codes}")
    print("both jobs trained against one reference service")


if __name__ == "__main__":
    main()
