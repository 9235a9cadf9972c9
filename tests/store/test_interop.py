"""store.interop.trl_columns: the reference columns `refmodel store export-trl` writes beside each record
(the command end to end is in tests/precompute: test_job.py and test_precompute_then_train.py)."""

from __future__ import annotations

import pytest
import torch

from refmodel.data import Example
from refmodel.errors import DataFormatError, StoreMiss
from refmodel.store import LogprobStore
from refmodel.store.interop import trl_columns


def _example(names, prompt=(5, 6), completions=((7, 8, 9), (7, 10))):
    completions = completions[:len(names)]
    return Example(prompt, completions, tuple((True,) * len(c) for c in completions), names, "row 3", "test")


def _store(path, examples):
    store = LogprobStore.create(path, "fp", dtype="bfloat16")  # sums stay float32 whatever the dtype
    g = torch.Generator().manual_seed(0)
    for ex in examples:
        for ids, mask in ex.sequences():
            store.put(torch.tensor(ids), -torch.rand(len(ids), generator=g) * 5, torch.tensor(mask))
    store.close()
    return LogprobStore.open(path, "fp")


def test_pairs_and_unpaired_get_trls_column_names_and_the_stored_sums(tmp_path):
    pair, unpaired = _example(("chosen", "rejected")), _example(("completion",), completions=((11, 12),))
    store = _store(tmp_path / "s", [pair, unpaired])
    cols = trl_columns(store, pair, {})
    assert list(cols) == ["ref_chosen_logps", "ref_rejected_logps"]
    assert cols["ref_chosen_logps"] == store.get_sum([5, 6, 7, 8, 9])
    assert cols["ref_rejected_logps"] == store.get_sum([5, 6, 7, 10])
    assert trl_columns(store, unpaired, {}) == {"ref_logps": store.get_sum([5, 6, 11, 12])}


def test_a_dropped_record_gets_null_columns_named_by_its_kind(tmp_path):
    store = _store(tmp_path / "s", [])
    assert trl_columns(store, None, {"prompt": "p", "chosen": "c", "rejected": "r"}) == {
        "ref_chosen_logps": None, "ref_rejected_logps": None}
    assert trl_columns(store, None, {"prompt": "p", "completion": "c", "label": True}) == {"ref_logps": None}


def test_other_records_and_missing_sequences_are_refused(tmp_path):
    store = _store(tmp_path / "s", [])
    with pytest.raises(DataFormatError, match="row 3: export-trl writes preference or unpaired"):
        trl_columns(store, _example(("a", "b")), {})
    with pytest.raises(StoreMiss):
        trl_columns(store, _example(("chosen", "rejected")), {})
