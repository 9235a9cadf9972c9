"""The ``refmodel`` command line. Each feature module contributes its own command(s) here."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import click

from .._version import __version__
from ..data import TRUNCATION_MODES
from ..models.dtypes import DTYPE_NAMES
from ..models.quantize import QUANT_MODES
from ..precompute.config import MODEL_DTYPES, PrecomputeConfig

if TYPE_CHECKING:
    from ..models.tiny import Family


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="refmodel")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug). Default: warnings only "
              "(serve: info).")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """refmodel: the reference model for LLM preference and RL training.

    Fused token log-probs, reference strategies, a persistent log-prob store, a model cache and an
    HTTP reference service. Run `refmodel COMMAND --help` for each command's flags.
    """
    ctx.obj = {"verbose": verbose}  # a command with its own -v (serve) adds to it
    configure_logging(verbose)


def configure_logging(verbose: int) -> None:
    """Warnings only by default, INFO with ``-v``, DEBUG with ``-vv`` (refmodel's loggers and the root).

    Below ``-vv`` the optional extras' import-time notices about kernels this machine lacks (torchao's
    ``Failed to load ... _C_mxfp8`` / ``Detected no triton``, bitsandbytes', torch pytree deprecations
    for torchao's enums) are hidden: they are not about the user's command.
    """
    from .._optional import hide_import_noise

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)  # basicConfig sets it only on its first call (serve calls this again)
    logging.getLogger("refmodel").setLevel(level)
    hide_import_noise(verbose < 2)


@main.command("make-tiny-model")
@click.argument("path", type=click.Path(file_okay=False))
@click.option("--family", type=click.Choice(["llama", "gpt2", "gemma2"]), default="llama", show_default=True,
              help="Architecture of the tiny random model.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
def make_tiny_model_cmd(path: str, family: Family, seed: int) -> None:
    """Save a tiny random causal LM and its tokenizer to PATH (for tests and trying things out)."""
    from ..models.tiny import make_tiny_model

    click.echo(str(make_tiny_model(family, path, seed=seed)))


@main.command("demo")
@click.option("--out", type=click.Path(file_okay=False), default="runs/demo", show_default=True,
              help="Folder for the tiny model, the store, metrics and the plot.")
@click.option("--algo", type=click.Choice(["dpo", "grpo", "both"]), default="dpo", show_default=True,
              help="dpo: preference training with a precomputed reference; grpo: RL on the built-in verifiable "
                   "task with a LoRA policy and the adapter-off reference; both: one after the other.")
def demo_cmd(out: str, algo: str) -> None:
    """Run the end-to-end demo on the built-in tiny model and data.

    Without matplotlib (the 'plot' extra) the demo still trains and reports; only the plot is skipped.
    """
    from .._optional import require
    from ..errors import RefModelError

    try:
        if algo in ("grpo", "both"):
            require("peft", "peft")  # the GRPO policy is a LoRA adapter: say so before anything runs
        if algo in ("dpo", "both"):
            from ..recipes.demo import run_demo

            run_demo(out)
        if algo in ("grpo", "both"):
            from pathlib import Path

            from ..recipes.demo_grpo import run_grpo_demo

            run_grpo_demo(Path(out) / "grpo" if algo == "both" else out)
    except RefModelError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


@main.command("bench")
@click.option("--quick", is_flag=True, help="Smaller shapes (seconds instead of minutes).")
def bench_cmd(quick: bool) -> None:
    """Run the fused log-prob benchmark and print ratios against the baselines."""
    from ..tools.bench import run_logprob_benchmark

    run_logprob_benchmark(quick=quick)


@main.command("quantize-report")
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, file_okay=False),
              help="Local model directory (safetensors weights).")
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="JSONL preference pairs with prompt / chosen / rejected.")
@click.option("--max-pairs", type=click.IntRange(min=1), default=64, show_default=True,
              help="Pairs to score (each gives a chosen and a rejected sequence).")
@click.option("--modes", default=",".join(QUANT_MODES), show_default=True,
              help="Comma-separated quantization modes to compare with the unquantized reference.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Sequences per forward pass (each pair gives two).")
@click.option("--dtype", default=None, help="Load dtype (default: as stored), e.g. bfloat16.")
@click.option("--device", default="cpu", show_default=True,
              help="Where the models run: cpu, cuda or cuda:N.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Paired timing rounds (reference and quantized pass back to back); speed is their median.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON instead of a table.")
def quantize_report_cmd(model_path, data_path, max_pairs, modes, batch_size, dtype, device, repeats,
                        as_json) -> None:
    """Per-token |delta log p|, KL, memory and speed of each quantization mode vs the reference."""
    import json

    from ..errors import RefModelError
    from ..tools.bench import provenance
    from ..tools.quantize_report import format_report, quantize_report

    wanted = tuple(m.strip() for m in modes.split(",") if m.strip())
    try:
        rows = quantize_report(model_path, data_path, max_pairs=max_pairs, modes=wanted, batch_size=batch_size,
                               dtype=dtype, device=device, repeats=repeats)
    except RefModelError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
    if as_json:
        click.echo(json.dumps(rows))
        return
    click.echo(f"# quantize-report: model={model_path} data={data_path} pairs<={max_pairs}")
    click.echo(f"# {provenance()}")
    click.echo(format_report(rows))


_DTYPES = click.Choice(list(DTYPE_NAMES))


_PRE = PrecomputeConfig()  # the defaults shown in --help come from here, never a copy


@main.command("precompute")
@click.option("--model", required=True, type=click.Path(exists=True, file_okay=False), help="Reference model folder.")
@click.option("--data", required=True, type=click.Path(exists=True),
              help=".jsonl, .parquet or HF dataset folder (any TRL dataset type, text or conversational).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Store folder to create (or resume).")
@click.option("--dtype", type=_DTYPES, default=_PRE.dtype, show_default=True, help="Storage dtype.")
@click.option("--max-length", type=click.IntRange(min=0), default=_PRE.max_length, show_default=True,
              help="TRL's max_length: sequences are truncated to it and records whose prompt fills it dropped, "
                   "as the trainer does (0: no limit).")
@click.option("--truncation-mode", type=click.Choice(list(TRUNCATION_MODES)), default=_PRE.truncation_mode,
              show_default=True, help="TRL's truncation_mode (unpaired/KTO data always keeps the start).")
@click.option("--max-tokens-per-batch", type=click.IntRange(min=1), default=_PRE.max_tokens_per_batch,
              show_default=True, help="Padded tokens per forward batch.")
@click.option("--kto-kl-batch-size", type=click.IntRange(min=2), default=None, metavar="N",
              help="Also score the KL completions TRL's KTOTrainer builds with per_device_train_batch_size=N "
                   "(losses with a KL term; the trainer needs train_sampling_strategy='sequential' and the same "
                   "max_length). [default: off]")
@click.option("--resume", is_flag=True, help="Finish an interrupted run into the same --out.")
@click.option("--shard-examples", type=click.IntRange(min=1), default=_PRE.shard_examples, show_default=True,
              help="Examples per shard (the unit of crash recovery).")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=_PRE.temperature,
              show_default=True, help="Log-probs of logits / T.")
@click.option("--device", default=None, metavar="DEVICE",
              help=f"cpu, cuda, cuda:N or auto (CUDA when present); without --ray. [default: {_PRE.device}]")
@click.option("--model-dtype", type=click.Choice(list(MODEL_DTYPES)), default=_PRE.model_dtype, show_default=True,
              help="Dtype to load the model weights in (auto: as saved).")
@click.option("--ray", "use_ray", is_flag=True,
              help="Score on a Ray cluster: an actor pool of scorers, one model each (extra 'ray').")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="Ray cluster to join (needs --ray). [default: env RAY_ADDRESS, else a new local cluster]")
@click.option("--num-workers", type=click.IntRange(min=1), default=None,
              help="Scorer actors, one model each (needs --ray). [default: the cluster's GPUs or CPUs]")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=None,
              help=f"GPUs per scorer actor; > 0 scores on CUDA (needs --ray). [default: {_PRE.gpus_per_worker:g}]")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=None,
              help="CPUs per scorer actor; a CPU actor runs torch on that many threads, and its store bytes "
                   f"equal a single-process run's on as many threads (needs --ray). [default: {_PRE.cpus_per_worker:g}]")
def precompute_cmd(use_ray, ray_address, num_workers, gpus_per_worker, cpus_per_worker, device, max_length,
                   **kwargs) -> None:
    """Compute reference log-probs of a dataset into a log-prob store."""
    from .store import precompute_command

    kwargs["max_length"] = max_length or None
    ray_flags = (("--ray-address", ray_address), ("--num-workers", num_workers),
                 ("--gpus-per-worker", gpus_per_worker), ("--cpus-per-worker", cpus_per_worker))
    if not use_ray:
        given = [flag for flag, value in ray_flags if value is not None]
        if given:
            raise click.UsageError(f"{', '.join(given)}: only used with --ray; add --ray to score on a Ray "
                                   "cluster, or drop them")
    if use_ray and device is not None:
        raise click.UsageError("--device: not used with --ray (actors score on CUDA when --gpus-per-worker > 0)")
    try:
        if not use_ray:
            precompute_command(use_ray=False, **kwargs, **({"device": device} if device is not None else {}))
            return
        ray = {name: value for name, value in (("ray_address", ray_address), ("num_workers", num_workers),
                                               ("gpus_per_worker", gpus_per_worker),
                                               ("cpus_per_worker", cpus_per_worker)) if value is not None}
        precompute_command(use_ray=True, **kwargs, **ray)
    except KeyboardInterrupt:
        # Shards are committed atomically, so everything finished so far is kept: say how to go on
        # (click alone would print a bare "Aborted!").
        click.echo(f"\nInterrupted. Every finished shard is saved in {kwargs['out']}; run the same command "
                   "with --resume to score the rest.", err=True)
        raise SystemExit(130) from None  # 128 + SIGINT, as a shell reports it


@main.group("store")
def store_group() -> None:
    """Inspect, verify, export and import log-prob stores."""


@store_group.command("info")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
def store_info_cmd(path: str) -> None:
    """Print a store's fingerprint, dtype, entries, tokens and size as JSON."""
    from .store import info_command

    info_command(path)


@store_group.command("verify")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
def store_verify_cmd(path: str) -> None:
    """Check every shard (checksums, sizes, counts) and the job's shard list; exits non-zero on any damage."""
    from .store import verify_command

    verify_command(path)


@store_group.command("repair")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--model", default=None, type=click.Path(exists=True, file_okay=False),
              help="The reference model the store was made from (rescores the damaged shards).")
@click.option("--data", default=None, type=click.Path(exists=True), help="The data the store was made from.")
@click.option("--drop", is_flag=True, help="Instead remove the damaged shards (their entries are lost).")
def store_repair_cmd(path: str, model: str | None, data: str | None, drop: bool) -> None:
    """Make a damaged store whole: rescore missing/corrupt shards (--model, --data) or --drop them."""
    from .store import repair_command

    repair_command(path, model, data, drop)


@store_group.command("export-trl")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True), help="The preference data the store covers.")
@click.option("--model", required=True, type=click.Path(exists=True, file_okay=False),
              help="Reference model (tokenizer + fingerprint check).")
@click.option("--out", required=True, type=click.Path(), help=".jsonl, .parquet or a folder (HF save_to_disk).")
@click.option("--max-length", type=click.IntRange(min=0), default=None,
              help="The trainer's max_length (0: no limit). [default: the store's, from its precompute]")
@click.option("--truncation-mode", type=click.Choice(list(TRUNCATION_MODES)), default=None,
              help="The trainer's truncation_mode. [default: the store's, from its precompute]")
def store_export_trl_cmd(path: str, data: str, model: str, out: str, max_length, truncation_mode) -> None:
    """Write DATA with TRL's ref_chosen_logps / ref_rejected_logps (or KTO's ref_logps) columns from the store.

    The columns are read by refmodel.integrations.trl.DPOTrainer / KTOTrainer; plain TRL computes its own.
    """
    from .store import export_trl_command

    export_trl_command(path, data, model, out, max_length, truncation_mode)


@store_group.command("import-halos")
@click.argument("pkl", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", required=True, type=click.Path(exists=True, file_okay=False),
              help="The reference model the cache was computed with (for its fingerprint).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Store folder to create.")
@click.option("--dtype", type=_DTYPES, default="bfloat16", show_default=True, help="Storage dtype.")
def store_import_halos_cmd(pkl: str, model: str, out: str, dtype: str) -> None:
    """Import a HALOs cached_reference_logprobs.pkl (plain data only; no code is run)."""
    from .store import import_halos_command

    import_halos_command(pkl, model, out, dtype)


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
@click.option("--max-wait-ms", type=float, default=None, help="How long a batch waits for more requests (a closed loop of clients pays it every round, so keep it short). [default: 2]")
@click.option("--max-seq-len", type=int, default=None, help="Tokens per sequence. [default: 2048]")
@click.option("--max-sequences", type=int, default=None, help="Sequences per request. [default: 1024]")
@click.option("--max-queue", type=int, default=None, help="Admitted sequences per model before 429. [default: 1024]")
@click.option("--max-body-bytes", type=int, default=None, help="Request body limit (413). [default: 16 MiB]")
@click.option("--torch-threads", type=int, default=None, help="torch intra-op threads. [default: torch's]")
@click.option("--batching/--no-batching", default=None, help="Merge concurrent requests. [default: on]")
@click.option("--max-header-bytes", type=int, default=None,
              help="Request headers limit in bytes (431 above). [default: 16 KiB]")
@click.option("--max-headers", type=int, default=None, help="Header fields per request (431 above). [default: 100]")
@click.option("--header-timeout-s", type=float, default=None,
              help="A connection must send a complete request head within this, else it is closed. [default: 10]")
@click.option("--body-timeout-s", type=float, default=None,
              help="The whole request body must arrive within this (408). [default: 30]")
@click.option("--keep-alive-timeout-s", type=float, default=None,
              help="Idle keep-alive connections close after this. [default: 5]")
@click.option("--allow-no-auth", is_flag=True, default=None,
              help="Allow a non-loopback --host without a token (logs a WARNING); refused otherwise.")
@click.option("--ray", "use_ray", is_flag=True,
              help="Serve as a Ray Serve deployment (replicas, @serve.batch token budget). Needs the 'ray' extra.")
@click.option("--replicas", type=click.IntRange(min=1), default=None,
              help="With --ray: replicas, each holding its own copy of the models. [default: 1]")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="With --ray: join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting a "
                   "local one. Model paths must exist on every node.")
@click.option("-v", "--verbose", count=True,
              help="More logging: -v debug. Default for serve: info (the URL once listening, model loads).")
@click.pass_context
def serve_cmd(ctx: click.Context, models, reward_models, use_ray, replicas, ray_address, verbose, **flags) -> None:
    """Serve reference log-probs (and reward scores) over HTTP with dynamic batching."""
    from ..errors import RefModelError

    # A long-running service reports at info by default; `serve -v` and `refmodel -v serve` both add one.
    configure_logging(1 + verbose + (ctx.obj or {}).get("verbose", 0))

    if not use_ray and (replicas is not None or ray_address is not None):
        given = "--replicas" if replicas is not None else "--ray-address"
        raise click.UsageError(f"{given} needs --ray (replicas and clusters are Ray Serve features)")
    try:
        if use_ray:
            from ..serve.ray_serve import serve_from_flags as serve_on_ray

            serve_on_ray(models, reward_models, replicas=replicas or 1, ray_address=ray_address, **flags)
        else:
            from ..serve.main import serve_from_flags

            serve_from_flags(models, reward_models, **flags)
    except RefModelError as exc:
        raise click.ClickException(str(exc)) from exc


if __name__ == "__main__":  # pragma: no cover
    main()
