"""The one temperature rule (``refmodel.validation``), refused the same way at every public entry point.

Before it, 13 sites held 4 rules: ``Frozen(temperature=inf)`` passed while ``token_logprobs`` refused it,
``True`` passed some, and a temperature whose reciprocal overflows (1e-300) reached the float32 math.
"""

from __future__ import annotations

import struct
from functools import partial

import numpy as np
import pytest
import torch

from refmodel import validation
from refmodel.errors import ConfigError, InvalidBatch, InvalidInput
from refmodel.testing import make_tokenizer, tiny_config

BAD = [float("inf"), float("-inf"), float("nan"), 0, 0.0, -0.5, True, False, "1", None, 1e-300, 1e-310, 5e-324]
GOOD = [1, 1.0, 0.7, 2, np.float32(0.5), np.float64(1.3), 1e-30]


def _ids(bad) -> str:
    return repr(bad)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama", len(make_tokenizer()))).eval()


@pytest.fixture(scope="module")
def peft_model(model):
    import copy

    from peft import LoraConfig, get_peft_model

    return get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))


def _token_logprobs(t):
    from refmodel import token_logprobs

    return token_logprobs(torch.randn(2, 3, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 3)), temperature=t)


def _model_logprobs(t, model):
    from refmodel import model_logprobs

    # the full-logits path never reached token_logprobs' check: inf gave uniform log-probs
    return model_logprobs(model, torch.tensor([[2, 5, 6]]), temperature=t, use_fused_linear_logprobs=False)


def _head_logprobs(t, model):
    from refmodel.logprobs.model import head_logprobs

    return head_logprobs(model, torch.randn(1, 2, model.config.hidden_size), torch.tensor([[2, 5]]), temperature=t)


def _exact_kl(t):
    from refmodel.losses.kl_exact import exact

    h, w = torch.randn(2, 3, 8), torch.randn(11, 8)
    return exact(h, w, h, w, temperature=t)


def _wire_encode(t):
    from refmodel.remote import wire

    return wire.encode_request("m", np.array([[2, 5, 6]], dtype=np.int32), temperature=t)


def _wire_decode(t):
    """A hand-made binary body carrying ``t`` (floats only: the format has no other type)."""
    from refmodel.remote import wire

    body = bytearray(wire.encode_request("m", np.array([[2, 5, 6]], dtype=np.int32), temperature=0.5))
    offset = body.index(struct.pack("<d", 0.5))
    body[offset:offset + 8] = struct.pack("<d", float(t))
    return wire.decode_request(bytes(body))


def _service_rows(t):
    from refmodel.serve.validate import Limits, check_sequences

    return check_sequences([[1, 2, 3]], Limits(64, 16, 8), temperature=t)


def _service_block(t):
    from refmodel.serve.validate import Limits, check_block

    return check_block(np.array([[1, 2, 3]]), Limits(64, 16, 8), temperature=t)


def _reference_config(t):
    from refmodel.reference.config import ReferenceConfig

    return ReferenceConfig(temperature=t)


def _precompute_config(t):
    from refmodel.precompute.config import PrecomputeConfig

    return PrecomputeConfig(temperature=t)


def _sampling_config(t):
    from refmodel.rl.rollout import SamplingConfig

    return SamplingConfig(temperature=t)


def _remote(t):
    from refmodel.reference.remote import Remote

    return Remote("http://127.0.0.1:1", "tiny", temperature=t, max_retries=0, timeout_s=0.1)


# (entry point, the error class it raises): the class stays the caller's, the rule and message are one.
ENTRY_POINTS = {
    "validation.temperature": (validation.temperature, InvalidInput),
    "token_logprobs": (_token_logprobs, InvalidInput),
    "kl.exact": (_exact_kl, InvalidInput),
    "wire.encode_request": (_wire_encode, InvalidBatch),
    "serve.check_sequences": (_service_rows, InvalidBatch),
    "serve.check_block": (_service_block, InvalidBatch),
    "ReferenceConfig": (_reference_config, ConfigError),
    "PrecomputeConfig": (_precompute_config, ConfigError),
    "SamplingConfig": (_sampling_config, ConfigError),
    "Remote": (_remote, ConfigError),
}


def _rule_message(bad) -> str:
    with pytest.raises(InvalidInput) as err:
        validation.temperature(bad)
    return str(err.value)


@pytest.mark.parametrize("bad", BAD, ids=_ids)
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_refuses_with_the_one_rule(entry, bad):
    fn, error = ENTRY_POINTS[entry]
    with pytest.raises(error) as err:
        fn(bad)
    assert str(err.value) == _rule_message(bad)
    if entry.startswith("serve."):
        assert err.value.field == "temperature"  # the service's 422 names the field


@pytest.mark.parametrize("bad", BAD, ids=_ids)
@pytest.mark.parametrize("entry", [_model_logprobs, _head_logprobs], ids=["model_logprobs", "head_logprobs"])
def test_the_model_entry_points_refuse_with_the_one_rule(entry, bad, model):
    with pytest.raises(InvalidInput) as err:
        entry(bad, model)
    assert str(err.value) == _rule_message(bad)


@pytest.mark.parametrize("bad", BAD, ids=_ids)
@pytest.mark.parametrize("strategy", ["Frozen", "Frozen.from_policy", "Synced", "AdapterDisabled"])
def test_the_strategies_refuse_with_the_one_rule(strategy, bad, model, peft_model):
    from refmodel.reference import AdapterDisabled, Frozen, Synced

    make = {"Frozen": partial(Frozen, model), "Frozen.from_policy": partial(Frozen.from_policy, model),
            "Synced": partial(Synced, model), "AdapterDisabled": partial(AdapterDisabled, peft_model)}[strategy]
    with pytest.raises(ConfigError) as err:
        make(temperature=bad)
    assert str(err.value) == _rule_message(bad)


@pytest.mark.parametrize("bad", [b for b in BAD if isinstance(b, float)], ids=_ids)
def test_the_binary_body_is_refused_naming_the_field(bad):
    with pytest.raises(InvalidBatch) as err:
        _wire_decode(bad)
    assert err.value.field == "temperature" and str(err.value) == _rule_message(bad)


@pytest.mark.parametrize("bad", [True, "1", "0.7"], ids=_ids)
def test_the_json_schema_refuses_what_is_not_a_number(bad):
    """pydantic's lax float would turn ``true`` into 1.0 and ``"0.7"`` into 0.7 before the rule saw them."""
    from pydantic import ValidationError

    from refmodel.serve.schemas import LogprobsRequest

    with pytest.raises(ValidationError, match="temperature"):
        LogprobsRequest.model_validate({"model": "m", "input_ids": [[1, 2]], "temperature": bad})
    assert LogprobsRequest.model_validate({"model": "m", "input_ids": [[1, 2]], "temperature": 2}).temperature == 2


@pytest.mark.parametrize("good", GOOD, ids=_ids)
def test_good_temperatures_pass_everywhere_as_floats(good, model):
    from refmodel.reference import Frozen

    assert validation.temperature(good) == float(good) and type(validation.temperature(good)) is float
    assert Frozen(model, temperature=good).temperature == float(good)
    assert _service_rows(good)[0].temperature == float(good)
    assert torch.isfinite(_token_logprobs(good)).all()


def test_the_reciprocal_bound_is_where_float32_overflows():
    """1/T must be a float32: below ~2.94e-39 the scaled logits are inf and the log-softmax NaN."""
    assert torch.isinf(torch.ones(1).div(1e-300)).all()  # what 1e-300 did before the rule
    assert validation.temperature(3e-39) == 3e-39
    with pytest.raises(InvalidInput, match=r"too small: 1/temperature overflows float32.*>= 2\.94e-39"):
        validation.temperature(2.9e-39)


def test_positive_finite():
    assert validation.positive_finite(2, "beta") == 2.0 and validation.positive_finite(np.float32(0.5), "x") == 0.5
    for bad in (0, -1, float("nan"), float("inf"), True, "2", None, torch.tensor(1.0)):
        with pytest.raises(InvalidInput, match=r"^beta must be a finite number > 0, got "):
            validation.positive_finite(bad, "beta")
    with pytest.raises(ConfigError, match=r"got 0; or None to turn it off$"):
        validation.positive_finite(0, "softcap", error=ConfigError, hint="or None to turn it off")
