"""Bodies of the ``refmodel precompute`` and ``refmodel store ...`` commands."""

from __future__ import annotations

import functools
import json
from pathlib import Path

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
    return wrapper


@_user_errors
def precompute_command(model: str, data: str, out: str, *, use_ray: bool = False, **settings) -> None:
    """``refmodel precompute``: ``settings`` are :class:`~refmodel.precompute.config.PrecomputeConfig` fields."""
    from ..precompute.config import PrecomputeConfig

    cfg = PrecomputeConfig(**settings)
    click.echo("# " + json.dumps({k: v for k, v in cfg.__dict__.items() if use_ray or not k.startswith(
        ("ray_", "num_workers", "gpus_", "cpus_", "max_task"))}), err=True)  # the resolved config
    if use_ray:
        from ..precompute.ray import precompute_on_ray

        store = precompute_on_ray(model, data, out, cfg)
    else:
        from ..precompute.job import precompute

        store = precompute(model, data, out, cfg)
    click.echo(json.dumps(store.info(), indent=1))


@_user_errors
def info_command(path: str) -> None:
    from ..store import LogprobStore

    click.echo(json.dumps(LogprobStore.open(path).info(), indent=1))


@_user_errors
def verify_command(path: str) -> None:
    from ..store import LogprobStore

    info = LogprobStore.open(path).verify()
    click.echo(f"ok: {info['shards']} shards, {info['entries']} entries, {info['tokens']} tokens verified")


def _fingerprint_of(model: str) -> tuple[object, object, str]:
    from ..models.fingerprint import fingerprint
    from ..precompute.job import _load_model

    loaded, tok = _load_model(model, None, None)
    return loaded, tok, fingerprint(loaded)


@_user_errors
def export_trl_command(path: str, data: str, model: str, out: str, max_length: int | None = 1024,
                       truncation_mode: str = "keep_start") -> None:
    from ..data import load_records
    from ..data.tokenize import tokenize_record
    from ..store import LogprobStore
    from ..store.interop import trl_columns

    _, tok, fp = _fingerprint_of(model)
    store = LogprobStore.open(path, fp)
    rows, examples = [], []
    for where, record in load_records(data):
        # The trainer's tokenization (max_length / truncation_mode), so the keys are the trainer's; records
        # the trainer drops are left out here too.
        ex = tokenize_record(record, tok, where, max_length=max_length, truncation_mode=truncation_mode)
        if ex is not None:
            rows.append(dict(record))
            examples.append(ex)
    cols = trl_columns(store, examples)
    for name, values in cols.items():
        for row, value in zip(rows, values, strict=True):
            row[name] = value
    out_path = Path(out)
    if out_path.suffix == ".jsonl":
        from ..testing import write_jsonl

        write_jsonl(rows, out_path)
    elif out_path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), out_path)
    else:
        from .._optional import require

        require("datasets", "trl").Dataset.from_list(rows).save_to_disk(str(out_path))
    click.echo(f"wrote {len(rows)} rows with {' / '.join(cols)} to {out_path}; train on it with "
               "refmodel.integrations.trl.DPOTrainer / KTOTrainer (plain TRL computes its own reference)")


@_user_errors
def import_halos_command(pkl: str, model: str, out: str, dtype: str) -> None:
    from ..store.interop import import_halos

    _, _, fp = _fingerprint_of(model)
    store = import_halos(pkl, out, fp, dtype=dtype)
    click.echo(json.dumps(store.info(), indent=1))
