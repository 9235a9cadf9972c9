"""Import HALOs' pickled reference cache (safely) and export TRL's precomputed columns.

The exported columns are read by ``refmodel.integrations.trl.DPOTrainer`` / ``KTOTrainer`` (plain TRL 1.16
computes its own and ignores them).

HALOs caches ``{tuple(token ids): per-token log-probs}`` in a pickle. Loading a pickle runs whatever
it names, so :class:`PlainDataUnpickler` admits no global at all: only the pickle opcodes for dict,
list, tuple, int, float, str, bytes, bool and None work; a file naming any class or function
(``os.system``, ``numpy`` arrays, ``torch`` tensors) is refused with :class:`~refmodel.errors.DataFormatError`.
Save such caches with plain lists (``tensor.tolist()``) to import them.

Memory stays bounded by the file's size: a pickle can reference one list from many places (a few
bytes per reference), so a tiny file can describe a nested structure of billions of elements. The
import never expands such a structure: it reads, per entry, the ids (each must be an int) and exactly
``len(ids) - 1`` values (each must be a number), and refuses anything else at the first bad element.
"""

from __future__ import annotations

import io
import itertools
import math
import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..data import Example
from ..errors import DataFormatError
from .format import storage_error
from .store import LogprobStore

_NUMBER = (int, float)


class PlainDataUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global: plain containers and scalars only."""

    def find_class(self, module: str, name: str):
        raise DataFormatError(f"refusing to unpickle {module}.{name}: only plain data (dict, list, tuple, int, "
                              "float, str) is accepted; re-save the cache with lists instead of arrays/tensors")

    def persistent_load(self, pid):
        raise DataFormatError("refusing a pickle with persistent ids: only plain data is accepted")


def load_plain_pickle(path) -> object:
    """Unpickle ``path`` admitting plain data only (see :class:`PlainDataUnpickler`)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise storage_error(path, exc, "read") from exc
    try:
        return PlainDataUnpickler(io.BytesIO(data)).load()
    except DataFormatError:
        raise
    except Exception as exc:
        raise DataFormatError(f"{path} is not a readable pickle of plain data ({type(exc).__name__}: "
                              f"{str(exc)[:200]})") from exc


def halos_entry(pkl, n: int, ids, values) -> tuple[np.ndarray, np.ndarray]:
    """``(int64 ids [T], float32 log-probs [T])`` of HALOs entry ``n``; DataFormatError naming what is wrong.

    HALOs' values are aligned to ``ids[1:]`` (possibly padded past ``T - 1``): position 0 gets 0.
    Reads exactly ``T`` ids and ``T - 1`` values, checking each element's type, so a value list that
    nests or shares references is refused without being expanded.
    """
    if not isinstance(ids, tuple) or not isinstance(values, (list, tuple)):
        raise DataFormatError(f"{pkl}: entry {n} is not (tuple of ids) -> list of log-probs "
                              f"(got {type(ids).__name__} -> {type(values).__name__})")
    t = len(ids)
    if t < 2:
        raise DataFormatError(f"{pkl}: entry {n} has {t} token ids; a scored sequence needs at least 2")
    if len(values) < t - 1:
        raise DataFormatError(f"{pkl}: entry {n} has {len(values)} log-probs for {t} tokens; "
                              f"expected {t - 1} (one per predicted token)")
    bad = next((i for i, x in enumerate(ids) if type(x) is not int or not 0 <= x < 2**63), None)
    if bad is not None:
        raise DataFormatError(f"{pkl}: entry {n}: token id {bad} is a {type(ids[bad]).__name__}, expected an "
                              "int in [0, 2**63)")
    vals = list(itertools.islice(values, t - 1))
    bad = next((i for i, v in enumerate(vals) if type(v) not in _NUMBER or not math.isfinite(v)), None)
    if bad is not None:
        raise DataFormatError(f"{pkl}: entry {n}: log-prob {bad} is a {type(vals[bad]).__name__} "
                              f"({'not finite' if type(vals[bad]) in _NUMBER else 'not a number'}), expected a "
                              "finite float (a nested or shared list is refused)")
    logps = np.zeros(t, dtype=np.float32)
    logps[1:] = np.asarray(vals, dtype=np.float64)
    return np.asarray(ids, dtype=np.int64), logps


def import_halos(pkl, out, fingerprint: str, dtype: str = "bfloat16") -> LogprobStore:
    """Build a store from a HALOs cache ``{tuple(ids): [per-token log-probs]}``.

    HALOs keeps one value per predicted token (``len(ids) - 1``, aligned to ``ids[1:]``, possibly
    padded); positions with log-prob exactly 0 are taken as unscored (HALOs masks them to 0).
    A failed import (bad entry, disk full) leaves no store behind, so the same command can run again.
    """
    cache = load_plain_pickle(pkl)
    if not isinstance(cache, dict):
        raise DataFormatError(f"{pkl}: expected a dict of token-id tuples to log-probs, got {type(cache).__name__}")
    out = Path(out)
    existed = out.exists()
    store = LogprobStore.create(out, fingerprint, dtype=dtype)
    try:
        for n, (ids, values) in enumerate(cache.items()):
            ids_arr, logps = halos_entry(pkl, n, ids, values)
            store.put(ids_arr, logps, logps != 0)
        store.close()
    except BaseException:
        store.close(flush=False)
        _remove_store(out, keep_folder=existed)
        raise
    return LogprobStore.open(out, fingerprint)


def _remove_store(out: Path, keep_folder: bool) -> None:
    """Remove what a failed import made at ``out`` (the folder itself only if the import created it)."""
    if not keep_folder:
        shutil.rmtree(out, ignore_errors=True)
        return
    for file in out.iterdir():
        file.unlink(missing_ok=True)


def trl_columns(store: LogprobStore, example: Example | None, record: Mapping) -> dict[str, float | None]:
    """TRL's reference columns of one record, as ``refmodel store export-trl`` writes them beside it.

    A preference pair gets ``ref_chosen_logps`` / ``ref_rejected_logps`` (``DPOTrainer``'s names), an
    unpaired (KTO) or prompt-completion record ``ref_logps``: the store's float32 sequence sums (exact
    whatever the storage dtype). ``example`` is ``record`` tokenized by :mod:`refmodel.data`; None (a
    record TRL drops at ``max_length``) gives the same columns, null. KTO's ``ref_KL_logps`` is not
    exported: its mismatched pairs depend on the trainer's batches.

    Raises StoreMiss for a sequence the store lacks, StoreCorrupt for a damaged entry, DataFormatError
    for another kind of record.
    """
    if example is None:
        names: tuple[str, ...] = ("chosen", "rejected") if "chosen" in record else ("completion",)
        return {_trl_column(name): None for name in names}
    if example.names not in (("chosen", "rejected"), ("completion",)):
        raise DataFormatError(f"{example.where}: export-trl writes preference or unpaired (KTO) records, not "
                              f"{example.kind}")
    return {_trl_column(name): store.get_sum(ids)
            for name, (ids, _) in zip(example.names, example.sequences(), strict=True)}


def _trl_column(name: str) -> str:
    return "ref_logps" if name == "completion" else f"ref_{name}_logps"


__all__ = ["PlainDataUnpickler", "halos_entry", "import_halos", "load_plain_pickle", "trl_columns"]
