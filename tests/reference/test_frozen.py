"""``Frozen`` with quantized weights, and ``auto`` building one: memory, log-probs, fingerprint (issue 19, 10).

Quantized weights are torchao tensor subclasses whose "storage" is not real memory (asking for its
data pointer raises "Attempted to access the data pointer on an invalid python storage"); the one byte
counter (``refmodel.models.quantize.model_nbytes``) counts their inner tensors instead.
"""

from __future__ import annotations

import logging

import pytest
import torch
from ref_helpers import make_batch
from torch import nn

import refmodel
from refmodel import Frozen, ReferenceConfig, model_logprobs
from refmodel.models.fingerprint import fingerprint
from refmodel.models.loading import load_model
from refmodel.models.quantize import BNB_MODES, QUANT_MODES, model_nbytes, quantize_model
from refmodel.reference import auto
from refmodel.reference.base import module_bytes
from refmodel.testing import load_tiny

pytest.importorskip("torchao")

# Max |Δ log p| per scored token against fp32 on the tiny models (as in tests/models/test_quantize.py).
MAX_ABS = {"int8": 0.1, "int4": 1.0}


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_frozen_quantized_memory_logprobs_and_fingerprint(tiny_model_dirs, family, mode):
    model, tok = load_tiny(tiny_model_dirs[family])
    batch = make_batch(tok)
    with torch.no_grad():
        want = model_logprobs(model, *batch)
    full = Frozen.from_policy(model)
    ref = Frozen.from_policy(model, quantize=mode)
    assert 0 < ref.memory_bytes < full.memory_bytes == model_nbytes(model)
    assert ref.memory_bytes == model_nbytes(ref.model)
    delta = (ref.logprobs(*batch) - want).abs()
    assert 1e-7 < delta.max() < MAX_ABS[mode], delta.max()  # changed, but only by quantization error
    assert ref.fingerprint == refmodel.fingerprint(ref.model, quantization=mode) != full.fingerprint
    assert f"quantize={mode}" in repr(ref)


def test_auto_builds_quantized_references(caplog, tiny_model_dirs):
    caplog.set_level(logging.INFO, logger="refmodel.reference")
    policy, _ = load_tiny(tiny_model_dirs["llama"])
    ref = auto(policy, ReferenceConfig(quantize="int8"))
    assert isinstance(ref, Frozen) and ref.quantize == "int8"
    assert f"extra memory {ref.memory_bytes} bytes" in caplog.text  # the line that used to crash
    from_path = auto(policy, ReferenceConfig(ref_model_path=str(tiny_model_dirs["gpt2"]), quantize="int8"))
    assert type(from_path.model).__name__.startswith("GPT2") and 0 < from_path.memory_bytes < model_nbytes(
        load_tiny(tiny_model_dirs["gpt2"])[0])


def test_byte_counter_counts_inner_tensors_and_shared_storage_once():
    lin = nn.Linear(64, 32)
    plain = module_bytes(nn.Sequential(lin))
    assert plain == (64 * 32 + 32) * 4
    quantized = quantize_model(nn.Sequential(nn.Linear(64, 32)), "int8")
    weight = quantized[0].weight
    assert type(weight) is not nn.Parameter  # a torchao subclass, no storage of its own
    # the inner tensors (nested in older torchao): one byte a weight plus, per output row, a float32 scale and a
    # zero point (int8; int64 in older torchao); then the float bias
    weight_bytes = module_bytes(quantized) - 32 * 4
    assert 64 * 32 + 32 * (4 + 1) <= weight_bytes <= 64 * 32 + 32 * (4 + 8)
    tied = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
    tied[1].weight = tied[0].weight
    view = nn.Module()
    view.register_buffer("a", tied[0].weight.detach()[:5])  # a view of the same storage
    tied.add_module("view", view)
    assert module_bytes(tied) == 10 * 8 * 4


@pytest.mark.parametrize("mode", QUANT_MODES)
def test_frozen_accepts_every_mode_the_loader_supports(tiny_model_dirs, mode):
    """Frozen and ReferenceConfig kept their own list ("int8", "int4") and refused the bitsandbytes modes
    that load_model supports; now all take ``QUANT_MODES``, and a path is quantized by the loader."""
    if mode in BNB_MODES:
        pytest.importorskip("bitsandbytes")
    path = tiny_model_dirs["llama"]
    ids = torch.randint(4, 90, (2, 9))
    loaded = load_model(path, quantize=mode)
    ref = Frozen(path, quantize=mode)
    assert ref.quantize == mode and ReferenceConfig(quantize=mode).quantize == mode
    assert ref.fingerprint == fingerprint(loaded, quantization=mode) != fingerprint(load_tiny(path)[0])
    torch.testing.assert_close(ref.logprobs(ids), model_logprobs(loaded, ids), rtol=0, atol=0)
    in_place = Frozen(load_tiny(path)[0], quantize=mode)  # a model: quantized in place
    assert in_place.memory_bytes < model_nbytes(load_tiny(path)[0])


def test_frozen_lives_on_the_policys_device(tiny_model_dirs, caplog):
    """``device=`` places the reference up front; without it, a reference on another device than the batches
    (on the policy's device) moves there at the first call, once, unless offloaded. Before: ``Frozen(path)``
    stayed on the CPU while the batches were on ``cuda``. Here "meta" stands in for the accelerator."""
    path = tiny_model_dirs["llama"]
    assert {p.device.type for p in Frozen(path, device="meta").model.parameters()} == {"meta"}
    frozen = Frozen(path)
    ids = torch.randint(4, 30, (2, 7))
    with caplog.at_level(logging.INFO, logger="refmodel.reference.frozen"), \
            pytest.raises((RuntimeError, NotImplementedError)):
        frozen.logprobs(ids.to("meta"))  # a meta batch cannot be computed; the weights moved to its device first
    assert {p.device.type for p in frozen.model.parameters()} == {"meta"}
    assert "moved from cpu to meta" in caplog.text
