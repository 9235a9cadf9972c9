"""The store folder's manifest (read, atomic dump), its writer lock and crash-leftover cleanup."""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path

from ..errors import ConfigError, InvalidInput, StoreCorrupt
from .format import FORMAT, READABLE_VERSIONS, VERSION

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def dump_manifest(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not file.exists():
        raise InvalidInput(f"{path} is not a log-prob store (no {MANIFEST}); create one with "
                           "LogprobStore.create or `refmodel precompute`")
    try:
        manifest = json.loads(file.read_bytes())
    except (OSError, ValueError) as exc:
        raise StoreCorrupt(f"the manifest {file} is unreadable or not JSON ({exc})") from exc
    if manifest.get("format") != FORMAT or manifest.get("version") not in READABLE_VERSIONS:
        raise StoreCorrupt(f"{file} is not a {FORMAT} v{VERSION} manifest "
                           f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})")
    return manifest


def lock_writer(path: Path) -> int:
    fd = os.open(path / "writer.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
            file.unlink(missing_ok=True)
