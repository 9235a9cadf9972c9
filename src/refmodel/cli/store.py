"""Bodies of the ``refmodel precompute`` and ``refmodel store ...`` commands."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import click

from ..errors import RefModelError


def _user_errors(fn):
    """Show refmodel's own errors as a one-line CLI error (exit 1), not a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RefModelError as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
        except OSError as exc:  # a file outside the store (the data, an export): the same one-line error
            from ..store.format import storage_error

            err = storage_error(exc.filename or "a file", exc, "read or write")
            raise click.ClickException(f"{type(err).__name__}: {err}") from exc
    return wrapper


@_user_errors
def precompute_command(model: str, data: str, out: str, *, use_ray: bool = False, **settings) -> None:
    """``refmodel precompute``: ``settings`` are :class:`~refmodel.precompute.config.PrecomputeConfig` fields."""
    from ..precompute.config import PrecomputeConfig
    from ..precompute.ranks import launcher_ranks

    cfg = PrecomputeConfig(**settings)
    ranks = launcher_ranks()  # under torchrun / accelerate launch: the ranks split the shards; rank 0 reports
    main = ranks is None or ranks.is_main
    if main:
        click.echo("# " + json.dumps({k: v for k, v in cfg.__dict__.items() if use_ray or not k.startswith(
            ("ray_", "num_workers", "gpus_", "cpus_", "max_task"))}), err=True)  # the resolved config
    if use_ray:
        from ..precompute.ray import precompute_on_ray

        store = precompute_on_ray(model, data, out, cfg)
    else:
        from ..precompute.job import precompute

        store = precompute(model, data, out, cfg)
    if main:
        click.echo(json.dumps(store.info(), indent=1))
    store.close()


@_user_errors
def info_command(path: str) -> None:
    """The store's :meth:`~refmodel.store.LogprobStore.info`; for a precompute job's store also ``finished`` and
    ``missing_shards`` (the job's shards not committed yet), and a line on stderr when it is unfinished."""
    from ..precompute.plan import pending_shards
    from ..store import LogprobStore

    with LogprobStore.open(path) as store:
        info = store.info()
        job = store.job if isinstance(store.job, dict) and store.job.get("kind") == "precompute" else None
        missing = pending_shards(store, job["shards"]) if job is not None else []
    if job is not None:
        info.update(finished=not missing, missing_shards=len(missing))
    click.echo(json.dumps(info, indent=1))
    if job is not None and missing:
        click.echo(f"unfinished: {len(missing)} of the {job['shards']} shards of its precompute job are not written "
                   f"(first: shard {missing[0]}); run the same `refmodel precompute` with --resume to finish it",
                   err=True)


@_user_errors
def verify_command(path: str) -> None:
    from ..store import LogprobStore

    info = LogprobStore.open(path).verify()
    click.echo(f"ok: {info['shards']} shards, {info['entries']} entries, {info['tokens']} tokens verified")


@_user_errors
def repair_command(path: str, model: str | None, data: str | None, drop: bool) -> None:
    from ..store import LogprobStore

    if drop and (model is not None or data is not None):
        raise click.UsageError("--drop removes the damaged shards; it takes no --model / --data")
    if not drop and (model is None or data is None):
        raise click.UsageError("give --model and --data (the ones the store was made from) to rescore the damaged "
                               "shards, or --drop to remove them from the store")
    if drop:
        with LogprobStore.open(path, mode="a") as store:
            for p in store.discard_damaged(forget_job=True):
                click.echo(f"dropped {p.file}: {p.reason}", err=True)
    else:
        from ..precompute.job import repair_store

        repair_store(model, data, path, progress=False).close()
    info = LogprobStore.open(path).verify()
    click.echo(f"repaired, ok: {info['shards']} shards, {info['entries']} entries, {info['tokens']} tokens verified")


def _fingerprint_of(model: str) -> tuple[object, object, str]:
    """``(model, tokenizer, fingerprint)`` of a local model folder, through the one safe loader."""
    from ..models.fingerprint import fingerprint
    from ..models.loading import load_model, load_tokenizer

    loaded = load_model(model, what="--model")
    return loaded, load_tokenizer(model), fingerprint(loaded)


@_user_errors
def export_trl_command(path: str, data: str, model: str, out: str, max_length: int | None = None,
                       truncation_mode: str | None = None) -> None:
    """Write DATA with TRL's reference columns, each record tokenized by :mod:`refmodel.data` with the
    store's own tokenization settings (recorded by ``refmodel precompute``) unless given.

    The columns of each record are :func:`refmodel.store.interop.trl_columns`: preference records get
    ``ref_chosen_logps`` / ``ref_rejected_logps``, unpaired (KTO) records ``ref_logps``, the stored float32
    sequence sums; records TRL drops get null columns.
    """
    from ..data import load_records, tokenize_record
    from ..precompute.config import PrecomputeConfig
    from ..store import LogprobStore
    from ..store.interop import trl_columns

    _, tok, fp = _fingerprint_of(model)
    store = LogprobStore.open(path, fp)
    recorded = (store.job or {}).get("tokenization", {})
    default = PrecomputeConfig()
    settings: dict[str, Any] = {"max_length": recorded.get("max_length", default.max_length) if max_length is None else
                (max_length or None),
                "truncation_mode": truncation_mode or recorded.get("truncation_mode", default.truncation_mode)}
    rows, dropped = [], 0
    for where, record in load_records(data):
        ex = tokenize_record(record, tok, where, **settings)
        rows.append({**record, **trl_columns(store, ex, record)})
        dropped += ex is None
    out_path = Path(out)
    if out_path.suffix == ".jsonl":
        from ..data.records import write_jsonl

        write_jsonl(rows, out_path)
    elif out_path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), out_path)
    else:
        from .._optional import require

        require("datasets", "trl").Dataset.from_list(rows).save_to_disk(str(out_path))
    click.echo(f"wrote {len(rows)} rows with TRL's reference log-prob columns to {out_path} ({dropped} rows that "
               f"TRL drops at max_length={settings['max_length']} have null columns); train on it with "
               "refmodel.integrations.trl.DPOTrainer / KTOTrainer (plain TRL computes its own reference)")


@_user_errors
def import_halos_command(pkl: str, model: str, out: str, dtype: str) -> None:
    from ..store.interop import import_halos

    _, _, fp = _fingerprint_of(model)
    store = import_halos(pkl, out, fp, dtype=dtype)
    click.echo(json.dumps(store.info(), indent=1))
