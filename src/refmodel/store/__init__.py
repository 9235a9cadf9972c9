"""Persistent reference log-prob store: safetensors shards + a JSON manifest, memory-mapped reads.

See :class:`LogprobStore` and the format description in :mod:`refmodel.store.format`.
"""

from .format import DTYPES, FORMAT, key_of
from .store import LogprobStore, ShardProblem

__all__ = ["DTYPES", "FORMAT", "LogprobStore", "ShardProblem", "key_of"]
