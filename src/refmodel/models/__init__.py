"""Reference models: the safe loader and registry (:mod:`.loading`), the LRU cache (:mod:`.cache`), quantization, fingerprints."""
