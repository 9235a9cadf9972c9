"""refmodel inside TRL: ``DPOTrainer``, ``KTOTrainer`` and ``GRPOTrainer`` taking ``reference=``.

Drop-in subclasses of TRL's trainers (same names, same arguments) plus ``reference=``: any refmodel
reference (``Precomputed`` / a store path, ``Remote`` / a service URL, ``Frozen`` incl. quantized,
``AdapterDisabled``, ``Synced``) or a ``ReferenceConfig``. TRL then loads no reference model and runs
no reference forward. :class:`RefmodelCallback` logs the reference's metrics into TRL's logs.

Needs the ``trl`` extra: ``pip install -e '.[trl]'`` from refmodel's source folder.
"""

from ..._optional import require
from ...cluster import get_logger

_trl = require("trl", "trl")
# The subclasses hook TRL's own loss / precompute / log-prob methods, which are not public API.
if not str(_trl.__version__).startswith("1.16."):
    get_logger(__name__).warning(
        "refmodel.integrations.trl is written and tested against TRL 1.16; TRL %s is installed, whose trainer "
        "internals may differ. Install trl>=1.16,<1.17 (refmodel's 'trl' extra) or check the results", _trl.__version__)

from ._reference import ReferenceRunner, resolve_reference  # noqa: E402
from .callback import RefmodelCallback  # noqa: E402
from .dpo import DPOTrainer  # noqa: E402
from .grpo import GRPOTrainer  # noqa: E402
from .kto import KTOTrainer  # noqa: E402

__all__ = ["DPOTrainer", "GRPOTrainer", "KTOTrainer", "RefmodelCallback", "ReferenceRunner", "resolve_reference"]
