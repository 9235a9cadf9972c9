"""``LogprobStore``: reference token log-probs on disk, keyed by the exact token ids.

A store is a folder::

    manifest.json            fingerprint, storage dtype, the committed shards and their blake2b
    shard-00000.safetensors  immutable shards (see :mod:`refmodel.store.format`)
    writer.lock              flock'ed by the one writer

Commit protocol: a shard is written to a temp file, fsynced and renamed into place; only then is the
manifest (also written atomically) updated to list it. Readers see the shards of the manifest they
read, so they never see a partial shard; a shard file that no manifest lists (a crash between the two
renames) is deleted by the next writer. Many readers (DataLoader workers) can open a store while one
writer appends; a reader picks up new shards when it misses a key.

Damage stays local: a missing, truncated or corrupt shard fails only the lookups of rows that may be
in it (StoreCorrupt naming the shard and the repair), never the rows of the other shards.
:meth:`LogprobStore.problems` lists every damaged shard, :meth:`LogprobStore.verify` raises on any,
and ``refmodel store repair`` (or ``precompute --resume``) rescores them.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .._deprecation import renamed_keywords
from ..cluster import get_logger
from ..errors import ConfigError, FingerprintMismatch, InvalidInput, StoreCorrupt, StoreMiss
from .format import (
    FORMAT,
    VERSION,
    Entry,
    Shard,
    atomic_write,
    ids_array,
    key_bytes,
    make_entry,
    normalize_dtype,
    repair_hint,
    storage_error,
    write_shard,
)
from .integrity import logprob_problem, remove_path
from .manifest import (
    MANIFEST,
    dump_manifest,
    lock_writer,
    read_manifest,
    remove_orphans,
    shard_file,
    shard_name,
)

log = get_logger(__name__)  # shared warnings: main process only (refmodel.cluster)
DEFAULT_SHARD_ENTRIES = 4096


class ShardProblem(NamedTuple):
    """One thing :meth:`LogprobStore.problems` found wrong: the shard file (or ``manifest.json``) and what."""

    file: str
    reason: str


class LogprobStore:
    """Token log-probs of a reference (bound to its fingerprint), memory-mapped from disk.

    Use :meth:`create` (writable) or :meth:`open` (read-only unless ``mode="a"``); also a context manager.
    All returned log-probs are float32 nats aligned like :func:`refmodel.model_logprobs`.
    """

    def __init__(self, path: Path, manifest: dict, *, writable: bool, lock_fd: int | None = None,
                 shard_entries: int = DEFAULT_SHARD_ENTRIES):
        self.path = path
        self._manifest = manifest
        self._writable = writable
        self._lock_fd = lock_fd
        self._shard_entries = shard_entries
        self._shards: dict[str, Shard] = {}
        self._bad: dict[str, StoreCorrupt] = {}  # shards that failed to open, until the manifest changes
        self._pending: dict[bytes, Entry] = {}
        self._stamp = self._manifest_stamp()

    # ---------------------------------------------------------------- construction
    @classmethod
    def create(cls, path, fingerprint: str, dtype="bfloat16", *, exist_ok: bool = False,
               shard_entries: int = DEFAULT_SHARD_ENTRIES) -> LogprobStore:
        """A new, writable store at ``path`` bound to ``fingerprint``, storing ``dtype`` values.

        With ``exist_ok=True`` an existing store with the same fingerprint and dtype is opened for appending.
        """
        if not isinstance(fingerprint, str) or not fingerprint:
            raise InvalidInput(f"fingerprint must be a non-empty string, got {fingerprint!r}")
        dtype = normalize_dtype(dtype)
        path = Path(path)
        if (path / MANIFEST).exists():
            if not exist_ok:
                raise ConfigError(f"a log-prob store already exists at {path}; open it with "
                                  "LogprobStore.open(path, mode='a') or choose another folder")
            store = cls.open(path, fingerprint, mode="a", shard_entries=shard_entries)
            if store.dtype != dtype:
                store.close()
                raise ConfigError(f"store {path} holds {store.dtype} values, not the requested {dtype}")
            return store
        if path.exists() and any(p.name != "writer.lock" for p in path.iterdir()):
            raise ConfigError(f"{path} exists and is not an empty folder or a log-prob store")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error(path, exc, "create the store folder") from exc
        lock_fd = lock_writer(path)
        manifest = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "dtype": dtype,
                    "shards": [], "job": None}
        atomic_write(path / MANIFEST, dump_manifest(manifest))
        return cls(path, manifest, writable=True, lock_fd=lock_fd, shard_entries=shard_entries)

    @classmethod
    def open(cls, path, fingerprint: str | None = None, *, mode: str = "r", verify: bool = False,
             shard_entries: int = DEFAULT_SHARD_ENTRIES, wait: bool = False) -> LogprobStore:
        """Open the store at ``path``; ``fingerprint`` (if given) must equal the stored one.

        ``mode="a"`` takes the writer lock to append (``wait=True``: waiting for another writer to close,
        instead of a ConfigError). ``verify=True`` checks every shard's checksums now.
        Opening reads only the small manifest; shards are mapped on first use.
        """
        if mode not in ("r", "a"):
            raise InvalidInput(f"mode must be 'r' (read) or 'a' (append), got {mode!r}")
        path = Path(path)
        manifest = read_manifest(path)
        if fingerprint is not None and fingerprint != manifest["fingerprint"]:
            raise FingerprintMismatch(
                f"store {path} holds log-probs of reference {manifest['fingerprint']}, but reference "
                f"{fingerprint} was asked for; recompute the store for this model (refmodel precompute) "
                "or open it with the model it was made with")
        lock_fd = None
        if mode == "a":
            lock_fd = lock_writer(path, wait=wait)
            manifest = read_manifest(path)  # re-read under the lock
            remove_orphans(path, manifest)
        store = cls(path, manifest, writable=mode == "a", lock_fd=lock_fd, shard_entries=shard_entries)
        if verify:
            store.verify()
        return store

    # ---------------------------------------------------------------- properties
    @property
    def fingerprint(self) -> str:
        return self._manifest["fingerprint"]

    @property
    def dtype(self) -> str:
        """Storage dtype name: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (reads are always float32)."""
        return self._manifest["dtype"]

    @property
    def job(self) -> dict | None:
        """Description of the precompute job that fills this store (None for hand-filled stores)."""
        return self._manifest.get("job")

    @property
    def shard_files(self) -> list[str]:
        """Names of the committed shard files, in order."""
        return [s["file"] for s in self._manifest["shards"]]

    def __len__(self) -> int:
        return sum(s["entries"] for s in self._manifest["shards"]) + len(self._pending)

    def __contains__(self, input_ids) -> bool:
        key = key_bytes(ids_array(input_ids))
        if key in self._pending:
            return True
        found, bad = self._locate([key], refresh=True)
        if found[0] is None and bad:
            raise self._damaged(bad, 1, 1)
        return found[0] is not None

    def __enter__(self) -> LogprobStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LogprobStore({str(self.path)!r}, fingerprint={self.fingerprint!r}, dtype={self.dtype!r}, n={len(self)})"

    # ---------------------------------------------------------------- reading
    def get(self, input_ids) -> torch.Tensor:
        """``[T]`` float32 log-probs of one sequence (zeros outside the scored span); raises StoreMiss."""
        ids = ids_array(input_ids)
        out = np.zeros(ids.shape[0], dtype=np.float32)
        start, values, _ = self._fetch(key_bytes(ids), ids.shape[0])
        out[start:start + values.shape[0]] = values
        return torch.from_numpy(out)

    def get_sum(self, input_ids) -> float:
        """Sum of the scored log-probs of one sequence (from float32, before the storage cast)."""
        ids = ids_array(input_ids)
        return self._fetch(key_bytes(ids), ids.shape[0])[2]

    def get_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T]`` float32 log-probs of a padded batch, as ``model_logprobs`` returns them.

        Each row is looked up by its real tokens (``attention_mask == 1``), so left and right padding
        both work; padded positions are 0. Raises StoreMiss naming how many rows missed.
        """
        ids, real = self._batch(input_ids, attention_mask)
        out = np.zeros(ids.shape, dtype=np.float32)
        for b, (start, values, _) in enumerate(self._fetch_rows(ids, real)):
            pos = np.flatnonzero(real[b])[start:start + values.shape[0]]
            out[b, pos] = values
        return torch.from_numpy(out)

    def get_sums(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B]`` float32 per-sequence sums of a padded batch (see :meth:`get_sum`)."""
        ids, real = self._batch(input_ids, attention_mask)
        return torch.tensor([total for _, _, total in self._fetch_rows(ids, real)], dtype=torch.float32)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(hex key, [T] float32 log-probs)`` for every committed entry, shard by shard in key order."""
        for key, logps, _ in self.entries():
            yield key, logps

    def entries(self) -> Iterator[tuple[str, torch.Tensor, float]]:
        """``(hex key, [T] float32 log-probs, sequence sum)`` for every committed entry."""
        for spec in list(self._manifest["shards"]):
            shard = self._shard(spec["file"])
            for row in range(len(shard)):
                seq_len, start, values, total = shard.read(row)
                out = np.zeros(seq_len, dtype=np.float32)
                out[start:start + values.shape[0]] = values
                yield shard.keys[row].tobytes().hex(), torch.from_numpy(out), total

    def info(self) -> dict:
        """Summary: path, fingerprint, dtype, entries, stored tokens, shards, bytes, job."""
        shards = self._manifest["shards"]
        return {"path": str(self.path), "format": FORMAT, "version": self._manifest["version"],
                "fingerprint": self.fingerprint,
                "dtype": self.dtype, "entries": len(self), "tokens": sum(s["tokens"] for s in shards),
                "shards": len(shards), "bytes": sum(s["bytes"] for s in shards), "job": self.job,
                "pending": len(self._pending)}

    def problems(self) -> list[ShardProblem]:
        """Everything wrong with the committed store; ``[]`` when it is whole. Reads every shard in full.

        Per shard: a file inside the store, its size and blake2b as the manifest says, a valid header,
        the data checksum, key order, every entry's crc (values and, from format version 3, the sum),
        the entry and token counts and the fingerprint and dtype. For a store filled by a precompute
        job, also the job's shard list: each of its shards listed once, no other shard, and as many
        entries as the job has sequences.
        """
        problems = []
        for spec in self._manifest["shards"]:
            name = spec["file"]
            try:
                file = shard_file(self.path, name)
                if not file.exists():
                    raise StoreCorrupt("listed in the manifest but missing")
                size = file.stat().st_size
                if size != spec["bytes"]:
                    raise StoreCorrupt(f"has {size} bytes, the manifest says {spec['bytes']}")
                shard = Shard(file)
                try:
                    shard.verify(spec["blake2b"])
                    checks = (("entries", len(shard), spec["entries"]),
                              ("tokens", int(shard.values.shape[0]), spec["tokens"]),
                              ("fingerprint", shard.meta_info.get("fingerprint"), self.fingerprint),
                              ("dtype", shard.dtype, self.dtype))
                    for field, got, want in checks:
                        if got != want:
                            raise StoreCorrupt(f"holds {field} {got!r}, the manifest says {want!r}")
                finally:
                    shard.close()
            except StoreCorrupt as exc:  # the repair advice comes once, at the end of verify's message
                problems.append(ShardProblem(name, str(exc).replace(f"; {repair_hint(self.path)}", "")))
        job = self.job
        if isinstance(job, dict) and job.get("kind") == "precompute":
            want = [shard_name(i) for i in range(job["shards"])]
            listed = {s["file"] for s in self._manifest["shards"]}
            problems += [ShardProblem(n, f"is shard {i} of the store's precompute job ({job['shards']} shards) but "
                                      "is not in the manifest (dropped, or the job did not finish)")
                         for i, n in enumerate(want) if n not in listed]
            problems += [ShardProblem(n, "is in the manifest but not one of the precompute job's shards")
                         for n in sorted(listed - set(want))]
            if listed == set(want) and len(self) - len(self._pending) != job["sequences"]:
                problems.append(ShardProblem(MANIFEST, f"lists {len(self) - len(self._pending)} entries, the job "
                                             f"has {job['sequences']} sequences"))
        return problems

    def verify(self) -> dict:
        """Check the whole store (see :meth:`problems`); returns :meth:`info` when all is well.

        Raises StoreCorrupt listing every problem and how to repair it.
        """
        problems = self.problems()
        if problems:
            shown = "; ".join(f"{p.file}: {p.reason}" for p in problems[:10])
            more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
            raise StoreCorrupt(f"store {self.path} failed verification, {len(problems)} problem(s): {shown}{more}. "
                               f"Repair: {repair_hint(self.path)}")
        listed = {s["file"] for s in self._manifest["shards"]}
        log.info("verified %d shards of %s (%d unlisted files ignored)", len(listed), self.path,
                 sum(1 for p in self.path.glob("shard-*.safetensors") if p.name not in listed))
        return self.info()

    def discard_damaged(self, *, forget_job: bool = False) -> list[ShardProblem]:
        """Drop every damaged shard from the manifest (one atomic commit) and delete its file.

        Returns what :meth:`problems` found. A precompute job's missing shards are then simply pending:
        ``precompute(..., resume=True)`` (what ``refmodel store repair --model --data`` runs) rescores
        them. ``forget_job=True`` also clears the job, leaving a smaller, hand-filled store.
        """
        self._check_writable()
        problems = self.problems()
        damaged = {p.file for p in problems}
        keep = [s for s in self._manifest["shards"] if s["file"] not in damaged]
        if len(keep) != len(self._manifest["shards"]) or (forget_job and self.job is not None):
            for name in damaged:
                shard = self._shards.pop(name, None)
                if shard is not None:
                    shard.close()
            self._commit({**self._manifest, "shards": keep, **({"job": None} if forget_job else {})})
            for name in damaged - {MANIFEST}:
                remove_path(self.path / name)  # a symlink: the link only; a directory in a shard's place: all of it
            log.warning("store %s: dropped damaged shard(s) %s", self.path, ", ".join(sorted(damaged)))
        return problems

    def refresh(self) -> bool:
        """Re-read the manifest if a writer committed since; True when something changed."""
        stamp = self._manifest_stamp()
        if stamp == self._stamp:
            return False
        self._manifest = read_manifest(self.path)
        self._stamp = stamp
        self._bad.clear()
        return True

    # ---------------------------------------------------------------- writing
    @renamed_keywords(token_logps="token_logprobs")
    def put(self, input_ids, token_logprobs, score_mask) -> bool:
        """Add one sequence: ``input_ids`` [T] ints, ``token_logps`` [T] float, ``score_mask`` [T] bool.

        Values outside ``score_mask`` are dropped (read back as 0); inside the span from the first to
        the last scored position they are kept as given. Returns False (and writes nothing) when the
        store already holds these ids. Buffered; :meth:`flush` commits.
        """
        self._check_writable()
        ids = ids_array(input_ids)
        logps = torch.as_tensor(token_logprobs).detach().to("cpu", torch.float32).numpy()
        mask = torch.as_tensor(score_mask).detach().to("cpu").numpy().astype(bool)
        if logps.shape != ids.shape or mask.shape != ids.shape:
            raise InvalidInput(f"input_ids {ids.shape}, token_logps {logps.shape} and score_mask {mask.shape} "
                               "must all be [T] with the same T")
        problem = logprob_problem(logps[mask])
        if problem is not None:
            raise InvalidInput(f"token_logprobs are not log-probs at the scored positions: {problem}; pass the "
                               "reference's per-token log-probs (log_softmax, gathered), float32 nats")
        key = key_bytes(ids)
        if key in self._pending:
            return False
        found, bad = self._locate([key])
        if found[0] is None and bad:  # it may be in the damaged shard: a duplicate would hide the repair
            raise self._damaged(bad, 1, 1)
        if found[0] is not None:
            return False
        self._pending[key] = make_entry(ids, logps, mask)
        if len(self._pending) >= self._shard_entries:
            self.flush()
        return True

    def flush(self) -> None:
        """Commit buffered entries as a new shard (atomic); no-op when nothing is buffered."""
        if self._writable and self._pending:
            names = {s["file"] for s in self._manifest["shards"]}
            index = len(names)
            while shard_name(index) in names:
                index += 1
            self.write_shard(shard_name(index), list(self._pending.values()))
            self._pending.clear()

    def write_shard(self, name: str, entries: list[Entry]) -> None:
        """Write ``entries`` as shard file ``name`` and commit it to the manifest (used by precompute)."""
        self._check_writable()
        if any(s["file"] == name for s in self._manifest["shards"]):
            raise ConfigError(f"store {self.path} already has a shard named {name}")
        size, digest = write_shard(self.path / name, entries, fingerprint=self.fingerprint, dtype=self.dtype)
        spec = {"file": name, "entries": len(entries), "tokens": int(sum(e.values.shape[0] for e in entries)),
                "bytes": size, "blake2b": digest}
        shards = sorted(self._manifest["shards"] + [spec], key=lambda s: s["file"])
        self._commit({**self._manifest, "shards": shards})

    def set_job(self, job: dict | None) -> None:
        """Record the precompute job description in the manifest (atomic)."""
        self._check_writable()
        self._commit({**self._manifest, "job": job})

    def close(self, flush: bool = True) -> None:
        """Flush (if writable and ``flush``), unmap shards and release the writer lock.

        The lock is released even when the flush fails (disk full); ``flush=False`` drops what is buffered.
        """
        try:
            if self._writable and flush:
                self.flush()
        finally:
            self._pending.clear()
            for shard in self._shards.values():
                shard.close()
            self._shards.clear()
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None
            self._writable = False

    # ---------------------------------------------------------------- internals
    def _commit(self, manifest: dict) -> None:
        # Whatever this code commits may list version-3 shards, so the manifest says so: an older refmodel
        # then refuses the store by its version instead of calling the new shards corrupt.
        manifest = {**manifest, "version": VERSION}
        atomic_write(self.path / MANIFEST, dump_manifest(manifest))
        self._manifest = manifest
        self._bad.clear()
        self._stamp = self._manifest_stamp()

    def _check_writable(self) -> None:
        if not self._writable:
            raise ConfigError(f"store {self.path} is open read-only; use LogprobStore.create or "
                              "LogprobStore.open(path, mode='a') to write")

    def _manifest_stamp(self):
        try:
            st = os.stat(self.path / MANIFEST)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _shard(self, name: str) -> Shard:
        shard = self._shards.get(name)
        if shard is None:
            bad = self._bad.get(name)
            if bad is not None:
                raise bad
            try:
                shard = Shard(shard_file(self.path, name))
                if shard.meta_info.get("fingerprint") != self.fingerprint:
                    shard.close()
                    raise StoreCorrupt(f"store shard {shard.path} was written for reference "
                                       f"{shard.meta_info.get('fingerprint')}, the manifest says {self.fingerprint}; "
                                       f"{repair_hint(self.path)}")
            except StoreCorrupt as exc:
                self._bad[name] = exc
                raise
            self._shards[name] = shard
        return shard

    def _locate(self, keys: list[bytes], refresh: bool = False
                ) -> tuple[list[tuple[Shard, int] | None], dict[str, StoreCorrupt]]:
        """Shard and row of each key (None where no readable shard has it), and the shards that failed to open.

        A damaged shard is skipped, not fatal: keys in the other shards are still found, and the caller
        reports a key found nowhere as possibly in a damaged shard rather than as a plain miss.
        """
        found: list[tuple[Shard, int] | None] = [None] * len(keys)
        bad: dict[str, StoreCorrupt] = {}
        for attempt in range(2):
            todo = [i for i, f in enumerate(found) if f is None]
            bad = {}
            for spec in self._manifest["shards"]:
                if not todo:
                    break
                try:
                    shard = self._shard(spec["file"])
                except StoreCorrupt as exc:
                    bad[spec["file"]] = exc
                    continue
                rows = shard.find([keys[i] for i in todo])
                for i, row in zip(todo, rows.tolist(), strict=True):
                    if row >= 0:
                        found[i] = (shard, row)
                todo = [i for i in todo if found[i] is None]
            if not todo or attempt or not refresh or not self.refresh():
                break
        return found, bad

    def _damaged(self, bad: dict[str, StoreCorrupt], missed: int, asked: int) -> StoreCorrupt:
        first = next(iter(bad.values()))
        return StoreCorrupt(f"{missed} of {asked} rows are in no readable shard of store {self.path}, and "
                            f"{len(bad)} shard(s) cannot be read ({', '.join(sorted(bad))}), so they may be there: "
                            f"{first}")

    def _fetch(self, key: bytes, seq_len: int) -> tuple[int, np.ndarray, float]:
        pending = self._pending.get(key)
        if pending is not None:
            return pending.start, pending.values, pending.total
        found, bad = self._locate([key], refresh=True)
        if found[0] is None:
            if bad:
                raise self._damaged(bad, 1, 1)
            raise StoreMiss(f"no entry for these token ids (key {key.hex()}, {seq_len} tokens) in store "
                            f"{self.path}; run `refmodel precompute` on data that contains them")
        return self._read(found[0], seq_len)

    def _read(self, hit: tuple[Shard, int], seq_len: int) -> tuple[int, np.ndarray, float]:
        shard, row = hit
        stored_len, start, values, total = shard.read(row)
        if stored_len != seq_len:
            raise StoreCorrupt(f"entry {row} of {shard.path} has length {stored_len}, its key says {seq_len}; "
                               f"{repair_hint(self.path)}")
        return start, values, total

    def _batch(self, input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
        ids = torch.as_tensor(input_ids)
        if ids.dim() != 2 or ids.dtype.is_floating_point:
            raise InvalidInput(f"input_ids must be a [B, T] integer tensor, got shape {tuple(ids.shape)} "
                               f"dtype {ids.dtype}")
        if attention_mask is None:
            real = np.ones(tuple(ids.shape), dtype=bool)
        else:
            mask = torch.as_tensor(attention_mask)
            if tuple(mask.shape) != tuple(ids.shape):
                raise InvalidInput(f"attention_mask shape {tuple(mask.shape)} != input_ids {tuple(ids.shape)}")
            real = mask.detach().to("cpu").numpy().astype(bool)
        return ids.detach().to("cpu", torch.int64).numpy(), real

    def _fetch_rows(self, ids: np.ndarray, real: np.ndarray) -> list[tuple[int, np.ndarray, float]]:
        rows = [np.ascontiguousarray(ids[b][real[b]]) for b in range(ids.shape[0])]
        keys = [key_bytes(r) for r in rows]
        results: list = [None] * len(keys)
        lookup = []
        for i, key in enumerate(keys):
            pending = self._pending.get(key)
            if pending is not None:
                results[i] = (pending.start, pending.values, pending.total)
            else:
                lookup.append(i)
        hits, bad = self._locate([keys[i] for i in lookup], refresh=True)
        missed = [i for i, hit in zip(lookup, hits, strict=True) if hit is None]
        if missed and bad:
            raise self._damaged(bad, len(missed), len(keys))
        if missed:
            raise StoreMiss(f"{len(missed)} of {len(keys)} rows are not in store {self.path} (first: row "
                            f"{missed[0]}, key {keys[missed[0]].hex()}, {rows[missed[0]].shape[0]} real tokens); "
                            "check the tokenization and padding mask, or precompute these sequences")
        for i, hit in zip(lookup, hits, strict=True):
            assert hit is not None  # every miss raised above
            results[i] = self._read(hit, rows[i].shape[0])
        return results
