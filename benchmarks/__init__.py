"""Benchmarks, run from the repository root as ``python -m benchmarks.NAME``.

Without an installed refmodel, this checkout's ``src`` is put on the path (also for the subprocesses).
The optional extras' import-time notices about kernels this machine lacks (torchao, DeepSpeed, torch's
pytree) are hidden, as the CLI hides them: a benchmark prints its figures.
"""

import importlib.util
import os
import sys
from pathlib import Path

if importlib.util.find_spec("refmodel") is None:
    _src = str(Path(__file__).resolve().parents[1] / "src")
    sys.path.insert(0, _src)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_src, os.environ.get("PYTHONPATH")) if p)

from refmodel.tools.bench import hide_import_noise  # after the path is set

hide_import_noise()
