"""Fuzzing the running service: schemathesis from its own OpenAPI schema, and hypothesis on the binary
route (random well-formed and malformed bodies). Never a 5xx; answers conform to the schema; the
binary and the JSON form of a request give the same answer (status, field, log-probs within 1e-5).
"""

from __future__ import annotations

import struct

import httpx
import numpy as np
import pytest
import torch
from serve_helpers import POSITIONS, TOKEN

from refmodel.remote import wire

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def fuzz(examples: int) -> settings:
    """Bounded, reproducible runs: a fixed seed, no example database, no deadline (a shared CPU)."""
    return settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_5xx_and_answers_conform_to_the_schema(hardened_server, mode):
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(hardened_server.url + "/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    calls = []

    @fuzz(150)
    @given(case=schema.as_strategy(schemathesis.GenerationMode(mode)))
    def run(case):
        response = case.call(base_url=hardened_server.url, headers=AUTH, timeout=30)
        calls.append(response.status_code)
        case.validate_response(response, checks=checks)

    run()
    assert len(calls) >= 100 and max(calls) < 500


@pytest.fixture(scope="module")
def vocab(hardened_server) -> int:
    models = httpx.get(hardened_server.url + "/v1/models", headers=AUTH).json()["models"]
    return next(m["vocab_size"] for m in models if m["name"] == "short")


@st.composite
def batches(draw, vocab: int):
    """A [B, T] batch, mostly valid: ids sometimes out of the vocabulary, T sometimes over the limit,
    masks 0/1 that may leave a row empty or score padding."""
    b = draw(st.integers(1, 4))
    t = draw(st.integers(1, POSITIONS + 3))
    ids = draw(st.lists(st.lists(st.integers(-2, vocab + 1) if draw(st.booleans()) else st.integers(0, vocab - 1),
                                 min_size=t, max_size=t), min_size=b, max_size=b))
    mask = st.lists(st.lists(st.integers(0, 1), min_size=t, max_size=t), min_size=b, max_size=b)
    attn = draw(st.one_of(st.none(), mask))
    score = draw(st.one_of(st.none(), mask))
    return np.asarray(ids, dtype=np.int32), attn, score


@pytest.mark.slow
def test_binary_and_json_answers_are_equal(hardened_server, vocab):
    statuses = []

    @fuzz(60)
    @given(batch=batches(vocab))
    def run(batch):
        ids, attn, score = batch
        body = wire.encode_request("short", ids, None if attn is None else np.asarray(attn),
                                   None if score is None else np.asarray(score))
        binary = httpx.post(hardened_server.url + "/v1/logprobs:binary", content=body, headers=AUTH, timeout=30)
        payload = {"model": "short", "input_ids": ids.tolist()}
        if attn is not None:
            payload["attention_mask"] = attn
        if score is not None:
            payload["score_mask"] = score
        as_json = httpx.post(hardened_server.url + "/v1/logprobs", json=payload, headers=AUTH, timeout=30)
        assert binary.status_code == as_json.status_code, (binary.text, as_json.text)
        statuses.append(binary.status_code)
        if binary.status_code == 200:
            _, out = wire.decode_response(binary.content)
            want = torch.tensor(as_json.json()["logprobs"], dtype=torch.float32)
            torch.testing.assert_close(torch.from_numpy(out), want, atol=1e-5, rtol=0)
        else:
            assert binary.status_code == 422
            assert binary.json()["field"] == as_json.json()["field"]
            assert binary.json()["detail"] == as_json.json()["detail"]

    run()
    assert statuses.count(200) >= 10 and statuses.count(422) >= 10, statuses  # both kinds were exercised


def _mutations():
    """Malformed binary bodies: random bytes, or a valid body with its header or length damaged."""
    valid = wire.encode_request("short", np.asarray([[1, 2, 3]]), np.asarray([[1, 1, 0]]))
    header = st.tuples(st.binary(min_size=4, max_size=4), st.integers(0, 255), st.integers(0, 255),
                       st.integers(0, 2**16 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
    return st.one_of(
        st.binary(max_size=256),
        st.builds(lambda h, rest: struct.pack("<4sBBHII", *h) + rest, header, st.binary(max_size=64)),
        st.builds(lambda cut: valid[:cut], st.integers(0, len(valid) - 1)),
        st.builds(lambda pos, byte: valid[:pos] + bytes([byte]) + valid[pos + 1:],
                  st.integers(0, len(valid) - 1), st.integers(0, 255)),
        st.builds(lambda extra: valid + extra, st.binary(min_size=1, max_size=16)),
    )


@pytest.mark.slow
def test_malformed_binary_bodies_get_a_4xx_naming_the_part(hardened_server):
    @fuzz(150)
    @given(body=_mutations())
    def run(body):
        r = httpx.post(hardened_server.url + "/v1/logprobs:binary", content=body, headers=AUTH, timeout=30)
        if r.status_code == 200:  # a mutation that kept the body valid
            fp, out = wire.decode_response(r.content)
            assert out.dtype == np.float32 and fp
            return
        assert r.status_code in (404, 422), r.text
        assert set(r.json()) == {"detail", "field"} and r.json()["detail"]

    run()
