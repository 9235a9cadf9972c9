"""Records (JSONL, Parquet, ``datasets``) and their tokenization (:mod:`.records`)."""
