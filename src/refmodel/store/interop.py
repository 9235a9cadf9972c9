"""Import HALOs' pickled reference cache (safely) and export TRL's precomputed columns.

The exported columns are read by ``refmodel.integrations.trl.DPOTrainer`` / ``KTOTrainer`` (plain TRL 1.16
computes its own and ignores them).

HALOs caches ``{tuple(token ids): per-token log-probs}`` in a pickle. Loading a pickle runs whatever
it names, so :class:`PlainDataUnpickler` admits no global at all: only the pickle opcodes for dict,
list, tuple, int, float, str, bytes, bool and None work; a file naming any class or function
(``os.system``, ``numpy`` arrays, ``torch`` tensors) is refused with :class:`~refmodel.StoreCorrupt`.
Save such caches with plain lists (``tensor.tolist()``) to import them.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from ..errors import DataFormatError, StoreCorrupt
from .format import ids_array
from .store import LogprobStore


class PlainDataUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global: plain containers and scalars only."""

    def find_class(self, module: str, name: str):
        raise StoreCorrupt(f"refusing to unpickle {module}.{name}: only plain data (dict, list, tuple, int, "
                           "float, str) is accepted; re-save the cache with lists instead of arrays/tensors")


def load_plain_pickle(path) -> object:
    """Unpickle ``path`` admitting plain data only (see :class:`PlainDataUnpickler`)."""
    data = Path(path).read_bytes()
    try:
        return PlainDataUnpickler(io.BytesIO(data)).load()
    except StoreCorrupt:
        raise
    except Exception as exc:
        raise StoreCorrupt(f"{path} is not a readable pickle of plain data ({exc})") from exc


def import_halos(pkl, out, fingerprint: str, dtype: str = "bfloat16") -> LogprobStore:
    """Build a store from a HALOs cache ``{tuple(ids): [per-token log-probs]}``.

    HALOs keeps one value per predicted token (``len(ids) - 1``, aligned to ``ids[1:]``, possibly
    padded); positions with log-prob exactly 0 are taken as unscored (HALOs masks them to 0).
    """
    cache = load_plain_pickle(pkl)
    if not isinstance(cache, dict):
        raise DataFormatError(f"{pkl}: expected a dict of token-id tuples to log-probs, got {type(cache).__name__}")
    with LogprobStore.create(out, fingerprint, dtype=dtype) as store:
        for n, (ids, values) in enumerate(cache.items()):
            if not isinstance(ids, tuple) or not isinstance(values, (list, tuple)):
                raise DataFormatError(f"{pkl}: entry {n} is not (tuple of ids) -> list of log-probs")
            ids = ids_array(list(ids))
            vals = np.asarray(values, dtype=np.float32)[: len(ids) - 1]
            if vals.shape[0] != len(ids) - 1:
                raise DataFormatError(f"{pkl}: entry {n} has {vals.shape[0]} log-probs for {len(ids)} tokens; "
                                      f"expected {len(ids) - 1} (one per predicted token)")
            logps = np.concatenate([[0.0], vals]).astype(np.float32)
            store.put(ids, logps, logps != 0)
    return LogprobStore.open(out, fingerprint)


def trl_columns(store: LogprobStore, examples) -> dict[str, list[float]]:
    """Reference sequence sums, one value per example, in the columns TRL's trainers name them.

    Preference pairs give ``ref_chosen_logps`` / ``ref_rejected_logps`` (``DPOTrainer``); unpaired (KTO)
    and prompt-completion examples give ``ref_logps``. All examples must be of one kind. Sums are the
    store's float32 sums (exact whatever the storage dtype). KTO's ``ref_KL_logps`` is not exported: its
    mismatched pairs depend on the trainer's batches.
    """
    examples = list(examples)
    kinds = {tuple(ex.names) for ex in examples}
    if len(kinds) > 1:
        raise DataFormatError(f"export-trl needs one kind of record per file, got completions named {sorted(kinds)}; "
                              "export preference pairs and unpaired/prompt-completion data separately")
    names = kinds.pop() if kinds else ("chosen", "rejected")
    if names not in (("chosen", "rejected"), ("completion",)):
        raise DataFormatError(f"export-trl handles preference pairs (chosen, rejected) and unpaired or "
                              f"prompt-completion records (completion), got completions named {names}")
    keys = ["ref_chosen_logps", "ref_rejected_logps"] if len(names) == 2 else ["ref_logps"]
    cols: dict[str, list[float]] = {k: [] for k in keys}
    for ex in examples:
        for (ids, _), key in zip(ex.sequences(), keys, strict=True):
            cols[key].append(store.get_sum(ids))
    return cols
