"""The KL completions of TRL's KTOTrainer (:mod:`refmodel.data.kto_kl`); TRL's own trainer is the oracle in
``tests/integrations/test_trl_kto.py`` (a KTO store serving ``KTOTrainer`` with no misses)."""

from __future__ import annotations

import pytest

from refmodel.data import kto_kl_examples
from refmodel.errors import ConfigError


def test_kto_kl_examples_rotate_untruncated_completions_within_each_batch():
    # row i: prompt [1, 10 + i], completion of i + 1 tokens, all equal to 20 + i; one paired record is skipped
    rows = [{"prompt_ids": [1, 10 + i], "completion_ids": [20 + i] * (i + 1), "label": bool(i % 2)} for i in range(5)]
    rows.insert(2, {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]})
    got = kto_kl_examples(rows, batch_size=2, max_length=5)
    # batches (0, 1), (2, 3), (4,): each prompt takes the previous row's completion in its batch (TRL's +1
    # rotation), the untruncated one, then prompt + completion is cut to max_length keeping the start
    want = [(0, [21, 21]), (1, [20]), (2, [23, 23, 23]), (3, [22, 22, 22]), (4, [24, 24, 24])]
    assert [(ex.prompt_ids, ex.completions, ex.names, ex.label) for ex in got] == [
        ((1, 10 + i), (tuple(comp),), ("KL completion",), bool(i % 2)) for i, comp in want]
    with pytest.raises(ConfigError, match="per_device_train_batch_size"):
        kto_kl_examples(rows, batch_size=0)
