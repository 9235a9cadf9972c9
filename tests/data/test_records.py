"""Data loading and tokenization: formats, chat templates, and errors that name file and line."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refmodel.data import load_examples, load_records, write_jsonl
from refmodel.errors import DataFormatError
from refmodel.testing import make_tokenizer, preference_pairs


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_pairs_from_jsonl_parquet_and_hf_dir(tmp_path, tok):
    rows = preference_pairs(5)
    jsonl = write_jsonl(rows, tmp_path / "d.jsonl")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    got = [load_examples(p, tok) for p in (jsonl, tmp_path / "d.parquet", tmp_path / "hf")]
    strip = [[(e.prompt_ids, e.completions, e.completion_masks, e.names) for e in g] for g in got]
    assert strip[0] == strip[1] == strip[2]
    ex = got[0][0]
    assert ex.names == ("chosen", "rejected")
    words = (rows[0]["prompt"] + " " + rows[0]["chosen"]).split() + [tok.eos_token]  # TRL appends EOS to text
    ids, mask = ex.sequences()[0]
    assert ids == tok.convert_tokens_to_ids(words)
    assert mask == [False] * len(rows[0]["prompt"].split()) + [True] * (len(rows[0]["chosen"].split()) + 1)


def test_prompt_completion_and_pretokenized(tok):
    ex = load_examples([{"prompt": "what is 1 plus 2 ?", "completion": "3 ."}], tok)[0]
    assert ex.names == ("completion",) and len(ex.completions[0]) == 3  # "3", ".", EOS
    ids = load_examples([{"input_ids": [5, 6, 7, 8], "score_mask": [0, 0, 1, 1]}])[0]
    assert ids.prompt_ids == (5, 6) and ids.completions == ((7, 8),)
    trl = load_examples([{"prompt_ids": [5], "chosen_ids": [6, 7], "rejected_ids": [8]}])[0]
    assert trl.sequences() == [([5, 6, 7], [False, True, True]), ([5, 8], [False, True])]


def test_conversational_uses_chat_template(tok):
    rec = {"prompt": [{"role": "user", "content": "what is 2 plus 2 ?"}],
           "chosen": [{"role": "assistant", "content": "4 ."}], "rejected": "5 ."}
    ex = load_examples([rec], tok)[0]
    assert tok.convert_ids_to_tokens(list(ex.prompt_ids)) == "<|user|> what is 2 plus 2 ? <|assistant|>".split()
    assert tok.convert_ids_to_tokens(list(ex.completions[0])) == ["4", "."]
    assert tok.convert_ids_to_tokens(list(ex.completions[1])) == ["5", "."]


def test_malformed_lines_name_file_and_line(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(preference_pairs(1)[0])
    path.write_text(good + "\n\n" + good + "\n{\"prompt\": \"x\", \n")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:4: not valid JSON"):
        load_records(path)
    path.write_text(good + "\n" + json.dumps({"prompt": "what", "chosen": "3"}) + "\n")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: the record fits no accepted type: it has "
                                              r"fields \[.chosen., .prompt.\]"):
        load_examples(path, tok)
    path.write_text(json.dumps({"input_ids": [1, "a"]}) + "\n")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:1: field 'input_ids'"):
        load_examples(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:1: expected a JSON object"):
        load_records(path)
    with pytest.raises(DataFormatError, match="unknown data format"):
        load_records(tmp_path / "x.csv") if (tmp_path / "x.csv").write_text("a") else None


def test_every_type_is_detected_and_loads_from_an_in_memory_dataset(tok):
    from refmodel.data import RECORD_TYPES, record_type

    conv = [{"role": "user", "content": "what is 1 plus 1 ?"}]
    reply = [{"role": "assistant", "content": "2 ."}]
    cases = {
        "preference": {"prompt": "what is 1 plus 1 ?", "chosen": " 2 .", "rejected": " 3 ."},
        "implicit_preference": {"chosen": conv + reply, "rejected": conv + [{"role": "assistant", "content": "3"}]},
        "unpaired_preference": {"prompt": conv, "completion": reply, "label": False},
        "prompt_completion": {"prompt": "what is 1 plus 1 ?", "completion": " 2 .", "id": 7},
        "prompt_only": {"prompt": conv},
        "language_modeling": {"messages": conv + reply},
        "tokenized_preference": {"prompt_ids": [5], "chosen_ids": [6], "rejected_ids": [7]},
        "tokenized_completion": {"prompt_ids": [5], "completion_ids": [6], "label": True},
        "tokenized_sequence": {"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1]},
    }
    assert sorted(cases) == sorted(RECORD_TYPES)
    for kind, rec in cases.items():
        assert record_type(rec) == kind
    assert record_type({"text": "so it is", "label": None}) == "language_modeling"  # nulls count as absent
    datasets = pytest.importorskip("datasets")
    rows = preference_pairs(3)
    got = load_examples(datasets.Dataset.from_list(rows), tok)
    assert [e.where for e in got] == ["row 0", "row 1", "row 2"]
    assert [e.sequences() for e in got] == [e.sequences() for e in load_examples(rows, tok)]
    unpaired = load_examples([cases["unpaired_preference"]], tok)[0]
    assert unpaired.label is False and unpaired.kind == "unpaired_preference"
    assert load_examples([cases["prompt_only"]], tok) == []  # nothing to score


@pytest.mark.parametrize("record,match", [
    ({"question": "x", "answer": "y"}, r"record 0: the record fits no accepted type: it has fields "
                                       r"\['answer', 'question'\]; accepted: prompt\+chosen\+rejected"),
    ({"prompt": 5, "completion": "y"}, r"record 0: field 'prompt' must be a string or a non-empty list"),
    ({"prompt": "x", "chosen": [{"role": "assistant", "content": "y"}], "rejected": "z"},
     r"record 0: field 'chosen' is a conversation but the prompt is text"),
    ({"prompt": "x", "completion": "y", "label": "good"}, r"record 0: field 'label' must be a bool"),
    ({"prompt": [{"role": "user", "content": "x"}], "completion": "y", "tools": "{not json"},
     r"record 0: field 'tools' is a string but not JSON"),
    ({"prompt_ids": [1, 2]}, r"record 0: 'prompt_ids' needs 'chosen_ids' and 'rejected_ids', or 'completion_ids'"),
    ({"input_ids": [1, 2, 3], "completion_mask": [0, 1]}, r"record 0: completion_mask has 2 values for 3"),
    ({"prompt_ids": [1], "completion_ids": [-4]}, r"record 0: field 'completion_ids' must be a list of non-neg"),
    ({"chosen": "", "rejected": "x"}, r"record 0: 'chosen' or 'rejected' is empty"),
    ({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},
     r"record 0: 'chosen' and 'rejected' share no leading message"),
])
def test_bad_records_name_the_record_and_what_is_accepted(tok, record, match):
    with pytest.raises(DataFormatError, match=match):
        load_examples([record], tok)


def test_bad_sources_and_settings(tok):
    from refmodel.errors import ConfigError

    with pytest.raises(DataFormatError, match="text records need a tokenizer"):
        load_examples([{"prompt": "x", "completion": "y"}])
    with pytest.raises(DataFormatError, match="data is one dict"):
        load_records({"prompt": "x"})
    with pytest.raises(DataFormatError, match=r"record 1: expected a record \(dict\), got str"):
        load_records([{"prompt": "x"}, "y"])
    with pytest.raises(ConfigError, match=r"unknown truncation_mode 'keep_middle'; expected one of"):
        load_examples([{"prompt_ids": [1], "completion_ids": [2]}], truncation_mode="keep_middle")
    with pytest.raises(ConfigError, match="max_length must be None or an int >= 1, got 0"):
        load_examples([{"prompt_ids": [1], "completion_ids": [2]}], max_length=0)
    no_eos = make_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(DataFormatError, match="the tokenizer has no eos_token"):
        load_examples([{"prompt": "x", "completion": "y"}], no_eos)
    no_template = make_tokenizer()
    no_template.chat_template = None
    with pytest.raises(DataFormatError, match="need a tokenizer with a chat template"):
        load_examples([{"prompt": [{"role": "user", "content": "x"}], "completion": "y"}], no_template)


def test_write_jsonl_round_trips_and_replaces_whole_files(tmp_path):
    rows = [{"prompt": "naïve café ?", "chosen": " ja", "rejected": " nein"}, {"prompt": "2", "completion": "3"}]
    path = write_jsonl(rows, tmp_path / "new" / "d.jsonl")
    assert [r for _, r in load_records(path)] == rows
    assert "naïve" in path.read_text(encoding="utf-8")  # UTF-8, not \u escapes
    write_jsonl(rows[:1], path)  # a rewrite replaces the file; no temporary file is left beside it
    assert [r for _, r in load_records(path)] == rows[:1]
    assert sorted(p.name for p in path.parent.iterdir()) == ["d.jsonl"]
