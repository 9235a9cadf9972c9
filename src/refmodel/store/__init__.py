"""Persistent reference log-prob store: safetensors shards + a JSON manifest, memory-mapped reads.

See :class:`LogprobStore` and the format description in :mod:`refmodel.store.format`.
"""

from .format import DTYPES, FORMAT, key_of
from .store import LogprobStore

__all__ = ["DTYPES", "FORMAT", "LogprobStore", "key_of"]
