"""Tools: the benchmark harness (:mod:`.bench`) and ``quantize-report``."""
