"""Data loading and tokenization: formats, chat templates, and errors that name file and line."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refmodel import DataFormatError
from refmodel.data.records import load_examples, load_records
from refmodel.testing import make_tokenizer, preference_pairs, write_jsonl


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
    words = (rows[0]["prompt"] + " " + rows[0]["chosen"]).split()
    ids, mask = ex.sequences()[0]
    assert ids == tok.convert_tokens_to_ids(words)
    assert mask == [False] * len(rows[0]["prompt"].split()) + [True] * len(rows[0]["chosen"].split())


def test_prompt_completion_and_pretokenized(tok):
    ex = load_examples([{"prompt": "what is 1 plus 2 ?", "completion": "3 ."}], tok)[0]
    assert ex.names == ("completion",) and len(ex.completions[0]) == 2
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
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: .*needs 'chosen' and 'rejected'"):
        load_examples(path, tok)
    path.write_text(json.dumps({"input_ids": [1, "a"]}) + "\n")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:1: field 'input_ids'"):
        load_examples(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:1: expected a JSON object"):
        load_records(path)
    with pytest.raises(DataFormatError, match="unknown data format"):
        load_records(tmp_path / "x.csv") if (tmp_path / "x.csv").write_text("a") else None
