"""The ``refmodel`` command line. Each feature module contributes its own command(s) here."""

from __future__ import annotations

import logging

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="refmodel")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug). Default: warnings only.")
def main(verbose: int) -> None:
    """refmodel: the reference model for LLM preference and RL training.

    Fused token log-probs, reference strategies, a persistent log-prob store, a model cache and an
    HTTP reference service. Run `refmodel COMMAND --help` for each command's flags.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("refmodel").setLevel(logging.INFO if verbose == 0 else level)


@main.command("make-tiny-model")
@click.argument("path", type=click.Path(file_okay=False))
@click.option("--family", type=click.Choice(["llama", "gpt2", "gemma2"]), default="llama", show_default=True,
              help="Architecture of the tiny random model.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
def make_tiny_model_cmd(path: str, family: str, seed: int) -> None:
    """Save a tiny random causal LM and its tokenizer to PATH (for tests and trying things out)."""
    from .testing import make_tiny_model

    click.echo(str(make_tiny_model(family, path, seed=seed)))


@main.command("demo")
@click.option("--out", type=click.Path(file_okay=False), default="runs/demo", show_default=True,
              help="Folder for the tiny model, the store, metrics and the plot.")
def demo_cmd(out: str) -> None:
    """Run the end-to-end demo on the built-in tiny model and preference data."""
    from .demo import run_demo

    run_demo(out)


@main.command("bench")
@click.option("--quick", is_flag=True, help="Smaller shapes (seconds instead of minutes).")
def bench_cmd(quick: bool) -> None:
    """Run the fused log-prob benchmark and print ratios against the baselines."""
    from .bench import run_logprob_benchmark

    run_logprob_benchmark(quick=quick)


@main.command("serve")
@click.option("--model", "models", multiple=True, metavar="NAME=PATH",
              help="Allow-listed causal LM to serve (repeatable). Env: REFMODEL_MODELS (JSON).")
@click.option("--reward-model", "reward_models", multiple=True, metavar="NAME=PATH",
              help="Allow-listed sequence-classification reward model (repeatable).")
@click.option("--host", default=None, help="Interface to bind. [default: 127.0.0.1]")
@click.option("--port", type=int, default=None, help="Port. [default: 8000]")
@click.option("--token-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="File holding the bearer token clients must send (or env REFMODEL_TOKEN).")
@click.option("--device", default=None, help="Where the models run. [default: cpu]")
@click.option("--max-batch-tokens", type=int, default=None, help="Padded tokens per model call. [default: 8192]")
@click.option("--max-wait-ms", type=float, default=None, help="How long a batch waits for more requests. [default: 5]")
@click.option("--max-seq-len", type=int, default=None, help="Tokens per sequence. [default: 2048]")
@click.option("--max-sequences", type=int, default=None, help="Sequences per request. [default: 1024]")
@click.option("--max-queue", type=int, default=None, help="Admitted sequences per model before 429. [default: 1024]")
@click.option("--max-body-bytes", type=int, default=None, help="Request body limit (413). [default: 16 MiB]")
@click.option("--torch-threads", type=int, default=None, help="torch intra-op threads. [default: torch's]")
@click.option("--batching/--no-batching", default=None, help="Merge concurrent requests. [default: on]")
def serve_cmd(models, reward_models, **flags) -> None:
    """Serve reference log-probs (and reward scores) over HTTP with dynamic batching."""
    from .errors import RefModelError
    from .serve.main import serve_from_flags

    try:
        serve_from_flags(models, reward_models, **flags)
    except RefModelError as exc:
        raise click.ClickException(str(exc)) from exc


if __name__ == "__main__":  # pragma: no cover
    main()
