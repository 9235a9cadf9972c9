"""The fingerprint's one identity rule for settings: the store, the service and the strategies agree.

A store written by ``precompute`` at a temperature is only usable by a reference (``Frozen``, ``Synced``,
``AdapterDisabled``, ``Remote``) whose fingerprint is the same string; the service names its answers with
the same fingerprint. Before ``fingerprint_settings`` each path dropped temperature 1.0 itself, and
precompute hashed ``temperature=2`` as ``2`` where ``Frozen`` hashed ``2.0``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import refmodel
from refmodel.models.fingerprint import fingerprint, fingerprint_settings, finish_fingerprint, weights_digest
from refmodel.models.loading import load_model
from refmodel.reference import AdapterDisabled, Frozen, Synced
from refmodel.serve.runners import _describe
from refmodel.testing import preference_pairs


def test_fingerprint_settings_drops_defaults_and_normalizes():
    assert fingerprint_settings(temperature=1.0, quantization=None) == {}
    assert fingerprint_settings(temperature=1) == {} and fingerprint_settings(x=None) == {}
    assert fingerprint_settings(temperature=2) == {"temperature": 2.0}
    assert type(fingerprint_settings(temperature=2)["temperature"]) is float
    assert fingerprint_settings(temperature=0.7, quantization="int8") == {"temperature": 0.7, "quantization": "int8"}


def test_fingerprint_applies_the_rule():
    model = torch.nn.Linear(3, 2)
    plain = fingerprint(model)
    assert fingerprint(model, temperature=1.0) == fingerprint(model, temperature=1) == plain
    assert fingerprint(model, temperature=2) == fingerprint(model, temperature=2.0) != plain
    assert finish_fingerprint(weights_digest(model.state_dict()), temperature=1.0) == plain


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dirs):
    return tiny_model_dirs["llama"]


@pytest.mark.parametrize("temperature", [1.0, 1, 0.7, 2])
def test_store_service_and_strategies_agree(llama_dir, tmp_path, temperature):
    from peft import LoraConfig, get_peft_model

    model = load_model(llama_dir)
    store = refmodel.precompute(llama_dir, preference_pairs(2), tmp_path / "store", temperature=temperature,
                                progress=False)
    served = _describe("tiny", "logprobs", model, "cpu")
    policy = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    paths = {
        "precompute (store)": store.fingerprint,
        "service": served.fingerprint_at(temperature),
        "Frozen": Frozen(model, temperature=temperature).fingerprint,
        "Frozen(path)": Frozen(llama_dir, temperature=temperature).fingerprint,
        "Synced (full copy)": Synced(model, temperature=temperature).fingerprint,
        "AdapterDisabled": AdapterDisabled(policy, temperature=temperature).fingerprint,
        "refmodel.fingerprint": refmodel.fingerprint(model, temperature=temperature),
    }
    assert len(set(paths.values())) == 1, paths
    assert (paths["Frozen"] == served.fingerprint) == (temperature == 1.0)  # 1.0 is the plain fingerprint
