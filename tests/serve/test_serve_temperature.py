"""The service's temperature: on the wire, in validation, in the batch runner and in the fingerprint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refmodel import Frozen, model_logprobs
from refmodel.errors import InvalidBatch
from refmodel.remote import wire
from refmodel.serve.runners import _describe
from refmodel.serve.validate import FieldError, Limits, Sequence, check_block, check_sequences
from refmodel.testing import make_tokenizer, tiny_config


@pytest.fixture(scope="module")
def served():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(make_tokenizer())), attn_implementation="eager")
    model.eval().requires_grad_(False)
    return _describe("tiny", "logprobs", model, "cpu")


def test_wire_carries_the_temperature_and_stays_byte_identical_at_one():
    ids = np.array([[2, 5, 6]], dtype=np.int32)
    assert wire.encode_request("m", ids, temperature=1.0) == wire.encode_request("m", ids)
    req = wire.decode_request(wire.encode_request("m", ids, None, np.array([[0, 1, 1]]), temperature=0.7))
    assert req.temperature == 0.7 and req.score_mask.tolist() == [[0, 1, 1]]
    np.testing.assert_array_equal(req.input_ids, ids)
    assert wire.decode_request(wire.encode_request("m", ids)).temperature == 1.0
    for bad in (0.0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(InvalidBatch, match="temperature"):
            wire.encode_request("m", ids, temperature=bad)
    body = bytearray(wire.encode_request("m", ids, temperature=0.5))
    body[17:25] = np.float64(-2.0).tobytes()  # a hand-made body with a negative temperature
    with pytest.raises(InvalidBatch, match="temperature must be a finite number > 0"):
        wire.decode_request(bytes(body))


def test_validation_refuses_bad_temperatures_naming_the_field():
    limits = Limits(64, 16, 8)
    for bad in (0, -0.5, float("nan")):
        with pytest.raises(FieldError, match="temperature") as err:
            check_sequences([[1, 2, 3]], limits, temperature=bad)
        assert err.value.field == "temperature"
        with pytest.raises(FieldError, match="temperature"):
            check_block(np.array([[1, 2, 3]]), limits, temperature=bad)
    seqs = check_block(np.array([[1, 2, 3]]), limits, np.array([[1, 1, 0]], dtype=np.uint8), temperature=0.7)
    assert seqs[0].temperature == 0.7 and check_sequences([[1, 2]], limits)[0].temperature == 1.0


def test_mixed_temperatures_in_one_batch_score_like_alone(served):
    rows = [torch.tensor([2, 5, 6, 7]), torch.tensor([2, 8, 9]), torch.tensor([2, 5, 6, 7])]
    temps = [0.7, 1.0, 1.3]
    got = served.run([Sequence(r, temperature=t) for r, t in zip(rows, temps, strict=True)])
    for row, t, out in zip(rows, temps, got, strict=True):
        want = model_logprobs(served.model, row[None], temperature=t)[0].numpy()
        np.testing.assert_allclose(out, want, atol=1e-6)
    assert not np.allclose(got[0], got[2])  # same tokens, other temperature: other log-probs


def test_the_fingerprint_at_a_temperature_is_frozens(served):
    assert served.fingerprint_at(1.0) == served.fingerprint == Frozen(served.model).fingerprint
    assert served.fingerprint_at(0.7) == Frozen(served.model, temperature=0.7).fingerprint
    assert served.fingerprint_at(0.7) != served.fingerprint
