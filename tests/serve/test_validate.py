"""The service refuses what precompute refuses: one position limit (``refmodel.models.limits``) for both.

``serve.runners`` had its own ``position_limit`` over ``n_positions`` and ``max_position_embeddings`` only,
so a model whose limit is in ``n_ctx``, ``max_sequence_length`` or ``seq_length`` (here a tiny BLOOM, which
has neither of the two) was served past it while precompute refused the same sequences.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

import refmodel
from refmodel.errors import InvalidInput
from refmodel.models.limits import POSITION_LIMIT_FIELDS, position_limit
from refmodel.remote import wire
from refmodel.serve.runners import _describe
from refmodel.serve.validate import FieldError, check_sequences, model_limits
from refmodel.testing import ServeProcess, make_tokenizer

LIMIT = 16
EXTRA_FIELDS = [f for f in POSITION_LIMIT_FIELDS if f not in ("max_position_embeddings", "n_positions")]


def _bloom(field: str):
    """A tiny BLOOM (ALiBi: no position field of its own) whose config sets only ``field`` = LIMIT."""
    from transformers import AutoModelForCausalLM, BloomConfig

    torch.manual_seed(0)
    cfg = BloomConfig(vocab_size=len(make_tokenizer()), hidden_size=16, n_layer=1, n_head=2, **{field: LIMIT})
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def bloom_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bloom")
    dirs = {}
    for field in EXTRA_FIELDS:
        dirs[field] = root / field
        _bloom(field).save_pretrained(dirs[field], safe_serialization=True)
        make_tokenizer().save_pretrained(dirs[field])
    return dirs


def test_the_three_extra_fields_are_the_ones_only_models_limits_saw():
    assert EXTRA_FIELDS == ["n_ctx", "max_sequence_length", "seq_length"]


@pytest.mark.parametrize("field", EXTRA_FIELDS)
def test_served_limits_are_precomputes(field):
    model = _bloom(field)
    served = _describe("m", "logprobs", model, "cpu")
    assert served.position_limit == position_limit(model) == (LIMIT, field)
    limits = model_limits(served.vocab_size, 64, 8, "m", served.position_limit)
    assert limits.max_seq_len == LIMIT
    check_sequences([[3] * LIMIT], limits)
    with pytest.raises(FieldError, match=rf"input_ids\[0\] has 17 tokens, more than model 'm'.s position "
                                         rf"limit \({field}\)={LIMIT}") as err:
        check_sequences([[3] * (LIMIT + 1)], limits)
    assert err.value.field == "input_ids"


@pytest.mark.integration
@pytest.mark.slow
def test_refmodel_serve_refuses_what_precompute_refuses(bloom_dirs, tmp_path):
    records = [{"prompt": "a b c d e f g h i j", "chosen": "k l m n o p q r", "rejected": "s t u v"}]
    lengths = {}
    for field, folder in bloom_dirs.items():
        with pytest.raises(InvalidInput, match=rf"position limit of {LIMIT} \(config\.{field}\)"):
            refmodel.precompute(folder, records, tmp_path / f"store-{field}", progress=False)
        tok = make_tokenizer()
        lengths[field] = len(tok(records[0]["prompt"] + " " + records[0]["chosen"])["input_ids"])
    assert min(lengths.values()) > LIMIT  # the row precompute refused is longer than the limit
    args = [x for field, folder in bloom_dirs.items() for x in ("--model", f"{field}={folder}")]
    with ServeProcess([*args, "--max-seq-len", 64], tmp_path / "server.log") as server:
        for field in bloom_dirs:
            ok = httpx.post(server.url + "/v1/logprobs", json={"model": field, "input_ids": [[3] * LIMIT]})
            assert ok.status_code == 200, ok.text
            r = httpx.post(server.url + "/v1/logprobs", json={"model": field, "input_ids": [[3] * (LIMIT + 1)]})
            assert r.status_code == 422, r.text
            assert r.json()["field"] == "input_ids" and f"position limit ({field})={LIMIT}" in r.json()["detail"]
            body = wire.encode_request(field, np.full((1, LIMIT + 1), 3, dtype=np.int32))
            r = httpx.post(server.url + "/v1/logprobs:binary", content=body,
                           headers={"Content-Type": wire.CONTENT_TYPE})
            assert r.status_code == 422 and f"position limit ({field})" in r.text
            listed = {m["name"]: m for m in httpx.get(server.url + "/v1/models").json()["models"]}
            assert listed[field]["max_seq_len"] == LIMIT
        # the temperature rule over HTTP: 422 naming the field, never a 500 or a NaN
        for bad in (True, "1", 1e-300, 0):
            r = httpx.post(server.url + "/v1/logprobs", json={"model": "n_ctx", "input_ids": [[3, 4]],
                                                              "temperature": bad})
            assert r.status_code == 422 and r.json()["field"] == "temperature", r.text
