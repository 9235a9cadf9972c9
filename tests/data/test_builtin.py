"""The built-in preference data (refmodel.data.builtin): deterministic, correct, and bundled as JSONL."""

import json

from refmodel.data.builtin import BUILTIN_DATASET_SIZE, builtin_dataset_path, preference_pairs


def test_preference_pairs_deterministic_and_correct():
    pairs = preference_pairs(200, seed=3)
    assert pairs == preference_pairs(200, seed=3)
    assert pairs != preference_pairs(200, seed=4)
    for pair in pairs:
        assert set(pair) == {"prompt", "chosen", "rejected"}
        assert pair["chosen"] != pair["rejected"]
        words = pair["prompt"].split()
        if len(words) == 6 and words[3] in ("plus", "minus"):  # "what is A op B ?"
            a, b = int(words[2]), int(words[4])
            expected = a + b if words[3] == "plus" else a - b
            assert pair["chosen"].split()[-2] == str(expected)
            assert pair["rejected"].split()[-2] != str(expected)


def test_builtin_dataset_is_the_generator_output():
    lines = builtin_dataset_path().read_text().splitlines()
    assert len(lines) == BUILTIN_DATASET_SIZE
    assert [json.loads(x) for x in lines] == preference_pairs(BUILTIN_DATASET_SIZE, seed=0)
