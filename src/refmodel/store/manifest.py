"""The store folder's manifest (read and validated, atomic dump), its writer lock and crash-leftover cleanup.

The manifest is the one file a reader trusts to find the shards, so :func:`read_manifest` checks every
field it uses (types, ranges, names) and raises :class:`~refmodel.errors.StoreCorrupt` naming the field: a
hand-edited or damaged manifest never reaches the reader as a raw ``KeyError``/``TypeError``, and no
shard ``file`` can point outside the store folder (``../x``, an absolute path, a symlink). Every count is
bounded (:data:`MAX_SHARDS`, :data:`_COUNT_LIMITS`) before anything is allocated from it, and the manifest
and the lock are opened only as regular files (a FIFO would block, a symlink would lead out of the store).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
from pathlib import Path

from ..errors import ConfigError, InvalidInput, StoreCorrupt
from .format import DTYPES, FORMAT, READABLE_VERSIONS, VERSION, storage_error
from .integrity import open_regular, read_regular, remove_path

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
# Shard names are plain file names in the store folder: no separators, no "..", no temp-file marker.
_SHARD_NAME = re.compile(r"shard-[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_SHARD_FIELDS = {"file": str, "entries": int, "tokens": int, "bytes": int, "blake2b": str}
# Most shards a store (or its precompute job) may have: 4096 entries each, 400M sequences. Bounds what
# verify allocates per shard name (a job claiming 10**8 shards would otherwise cost GBs).
MAX_SHARDS = 100_000
MAX_MANIFEST_BYTES = 64 * 2**20  # ~200 bytes a shard: 100,000 shards fit 300 times over
# Upper bounds of each count (exclusive): what the shard format can hold (U32 offsets), and so that the
# sums over MAX_SHARDS shards stay far inside a Python index (len() of a store).
_COUNT_LIMITS = {"entries": 2**32, "tokens": 2**32, "bytes": 2**48}


def shard_name(index: int) -> str:
    """File name of shard ``index`` (precompute's shard ``i`` and a hand-filled store's ``i``-th flush)."""
    return f"shard-{index:05d}.safetensors"


def dump_manifest(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def read_manifest(path: Path) -> dict:
    """The validated manifest of the store at ``path`` (see :func:`validate_manifest`)."""
    file = path / MANIFEST
    if not file.exists() and not file.is_symlink():
        raise InvalidInput(f"{path} is not a log-prob store (no {MANIFEST}); create one with "
                           "LogprobStore.create or `refmodel precompute`")
    hint = "; restore it from a backup or recompute the store (refmodel precompute)"
    try:
        raw = read_regular(file, MAX_MANIFEST_BYTES, hint)
    except OSError as exc:
        raise storage_error(file, exc, "read") from exc
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested JSON
        raise StoreCorrupt(f"the manifest {file} is not JSON ({type(exc).__name__}: {str(exc)[:200]}){hint}") from exc
    return validate_manifest(manifest, file)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_manifest(manifest, file) -> dict:
    """``manifest`` if every field is well formed; else StoreCorrupt naming the field, its value and the rule."""
    def bad(field: str, value, expected: str):
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return StoreCorrupt(f"the manifest {file} is invalid: {field} is {shown}, expected {expected}; "
                            "restore it from a backup or recompute the store (refmodel precompute)")

    if not isinstance(manifest, dict):
        raise bad("the top level", type(manifest).__name__, "a JSON object")
    if manifest.get("format") != FORMAT or manifest.get("version") not in READABLE_VERSIONS \
            or not _is_int(manifest.get("version")):
        raise StoreCorrupt(f"{file} is not a {FORMAT} v{VERSION} manifest "
                           f"(format {manifest.get('format')!r}, version {manifest.get('version')!r}; "
                           f"this refmodel reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    fp = manifest.get("fingerprint")
    if not isinstance(fp, str) or not fp:
        raise bad("fingerprint", fp, "a non-empty string")
    if manifest.get("dtype") not in DTYPES:
        raise bad("dtype", manifest.get("dtype"), f"one of {sorted(DTYPES)}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or len(shards) > MAX_SHARDS:
        raise bad("shards", shards, f"a list of at most {MAX_SHARDS} shard entries")
    seen: set[str] = set()
    for i, spec in enumerate(shards):
        if not isinstance(spec, dict):
            raise bad(f"shards[{i}]", spec, "an object with " + ", ".join(_SHARD_FIELDS))
        for field, kind in _SHARD_FIELDS.items():
            value = spec.get(field)
            if kind is int and not (isinstance(value, int) and not isinstance(value, bool)
                                    and 0 <= value < _COUNT_LIMITS[field]):
                raise bad(f"shards[{i}].{field}", value, f"an integer in [0, {_COUNT_LIMITS[field]})")
            if kind is str and not isinstance(value, str):
                raise bad(f"shards[{i}].{field}", value, "a string")
        name = spec["file"]
        if not _SHARD_NAME.fullmatch(name) or ".tmp-" in name or len(name) > 200:
            raise bad(f"shards[{i}].file", name, "a plain file name inside the store folder "
                      "(shard-NAME.safetensors: no '/', no '..', not absolute)")
        if name in seen:
            raise bad(f"shards[{i}].file", name, "a name listed once")
        seen.add(name)
        if not _HEX32.fullmatch(spec["blake2b"]):
            raise bad(f"shards[{i}].blake2b", spec["blake2b"], "32 lowercase hex digits")
    job = manifest.get("job")
    if job is not None and not isinstance(job, dict):
        raise bad("job", job, "null or an object")
    if isinstance(job, dict) and job.get("kind") == "precompute":
        for field, limit in (("shards", MAX_SHARDS), ("sequences", MAX_SHARDS * _COUNT_LIMITS["entries"])):
            if not _is_int(job.get(field)) or not 0 <= job[field] <= limit:
                raise bad(f"job.{field}", job.get(field), f"an integer in [0, {limit}]")
    return manifest


def shard_file(root: Path, name: str) -> Path:
    """Path of shard ``name`` in the store at ``root``; StoreCorrupt if it is a symlink (shards are regular files)."""
    if not _SHARD_NAME.fullmatch(name):
        raise StoreCorrupt(f"shard file name {name!r} in the manifest of {root} is not a plain file name")
    file = root / name
    if file.is_symlink():
        target = file.resolve()
        where = "inside" if target.parent == root.resolve() else "outside"
        raise StoreCorrupt(f"store shard {file} is a symbolic link to {target}, {where} the store {root}; "
                           "shards must be regular files inside the store folder")
    return file


def lock_writer(path: Path, *, wait: bool = False) -> int:
    """An open fd holding the store's writer lock (``flock`` on ``writer.lock``, a regular file made here if
    missing); ConfigError when another process holds it, unless ``wait`` (block until it is released: the
    ranks of a split precompute take turns committing shards)."""
    hint = "; remove it (the writer makes a fresh writer.lock)"
    try:
        fd = open_regular(path / "writer.lock", os.O_RDWR | os.O_CREAT, hint)
    except OSError as exc:
        raise storage_error(path / "writer.lock", exc, "create") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"store {path} is being written by another process (writer.lock is held); "
                          "only one writer at a time, readers may open it with mode='r'") from None
    return fd


def remove_orphans(path: Path, manifest: dict) -> None:
    """Delete temp files and shard files no manifest lists (left by a crash); only the writer does this."""
    listed = {s["file"] for s in manifest["shards"]}
    for file in path.iterdir():
        if ".tmp-" in file.name or (file.name.startswith("shard-") and file.name not in listed):
            log.info("removing %s left by an interrupted write", file)
            remove_path(file)
