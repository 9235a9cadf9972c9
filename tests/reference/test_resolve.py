"""``refmodel.reference.resolve``: every kind of ``reference=`` argument, and the temperature check.

Real tiny models, real PEFT, a real log-prob store and a real ``refmodel serve`` child on 127.0.0.1.
Log-probs are compared at 1e-5 nats (same fp32 kernels on the same weights).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from ref_helpers import make_batch

from refmodel import model_logprobs
from refmodel.errors import ConfigError
from refmodel.reference import (
    AdapterDisabled,
    Frozen,
    Precomputed,
    ReferenceConfig,
    ReferenceFree,
    Synced,
    resolve,
)
from refmodel.testing import ServeProcess, load_tiny
from refmodel.testing.lora import lora_policy

T = 0.7
TOL = dict(atol=1e-5, rtol=0)


@pytest.fixture
def llama(tiny_model_dirs):
    model, tok = load_tiny(tiny_model_dirs["llama"])
    return model, tok, make_batch(tok)


def _at(model, batch, temperature=1.0):
    with torch.no_grad():
        return model_logprobs(model, *batch, temperature=temperature)


def test_a_reference_is_itself_and_one_at_another_temperature_is_refused(llama, tmp_path):
    model, _, _ = llama
    ref = Frozen.from_policy(model, temperature=T)
    assert resolve(ref, model, temperature=T) is ref
    with pytest.raises(ConfigError, match=r"temperature 0\.7.*samples at temperature=1\.0.*temperature=1\.0"):
        resolve(ref, model)
    with pytest.raises(ConfigError, match="GRPOTrainer: the reference computes log-probs at temperature 1.0"):
        resolve(Synced(model), model, temperature=T, who="GRPOTrainer")
    # a store does not know its temperature, but its live fallback does
    frozen = Frozen.from_policy(model)
    store = _store_of(frozen, llama[2], tmp_path / "store")
    with pytest.raises(ConfigError, match="temperature 1.0"):
        resolve(Precomputed(store, fallback=frozen), model, temperature=T)


def test_none_is_the_default_reference_at_the_temperature(llama):
    model, _, batch = llama
    ref = resolve(None, model, temperature=T)
    assert isinstance(ref, Frozen) and ref.model is not model and ref.temperature == T
    torch.testing.assert_close(ref.logprobs(*batch), _at(model, batch, T), **TOL)
    peft_policy = lora_policy(model)
    ref = resolve(None, peft_policy, temperature=T)
    assert isinstance(ref, AdapterDisabled) and ref.temperature == T
    torch.testing.assert_close(ref.logprobs(*batch), _at(model, batch, T), **TOL)


def test_a_config_takes_the_callers_temperature_and_refuses_another(llama):
    model, _, batch = llama
    ref = resolve(ReferenceConfig(), model, temperature=T)
    assert isinstance(ref, Frozen) and ref.temperature == T
    assert resolve(ReferenceConfig(temperature=T), model, temperature=T).temperature == T
    with pytest.raises(ConfigError, match=r"ReferenceConfig\(temperature=0\.7\) but the policy samples at "
                                          r"temperature=1\.0.*Drop temperature"):
        resolve(ReferenceConfig(temperature=T), model)
    assert isinstance(resolve(ReferenceConfig(reference_free=True), model), ReferenceFree)
    synced = resolve(ReferenceConfig(sync_ref_model=True, ref_model_sync_steps=2), model, temperature=T)
    assert isinstance(synced, Synced) and synced.temperature == T and synced.sync_steps == 2


def test_a_peft_policy_with_a_ref_adapter_uses_it_like_trl(llama):
    model, _, batch = llama
    policy = lora_policy(model)
    policy.add_adapter("ref", copy.deepcopy(policy.peft_config["default"]))
    from refmodel.testing.lora import perturb_adapter

    perturb_adapter(policy, seed=7, adapter="ref")
    ref = resolve(ReferenceConfig(), policy)
    assert isinstance(ref, AdapterDisabled) and ref.adapter_name == "ref"
    ref_only = copy.deepcopy(policy)
    ref_only.set_adapter("ref")
    torch.testing.assert_close(ref.logprobs(*batch), _at(ref_only.merge_and_unload(), batch), **TOL)


def test_keywords(llama):
    model, _, batch = llama
    assert isinstance(resolve("none", model), ReferenceFree)
    ref = resolve("adapter", lora_policy(model), temperature=T)
    assert isinstance(ref, AdapterDisabled) and ref.adapter_name is None
    torch.testing.assert_close(ref.logprobs(*batch), _at(model, batch, T), **TOL)
    with pytest.raises(ConfigError, match="AdapterDisabled needs a PEFT model"):
        resolve("adapter", model)


def _store_of(frozen, batch, path):
    from refmodel.store import LogprobStore

    ids, attn, score = batch
    lp = frozen.logprobs(ids, attn, score)
    store = LogprobStore.create(path, frozen.fingerprint, dtype="float32")
    for b in range(ids.shape[0]):
        real = attn[b].bool()
        store.put(ids[b][real], lp[b][real], score[b][real])
    store.close()
    return LogprobStore.open(path)


@pytest.mark.parametrize("as_path", [False, True])
def test_a_store_folder_is_precomputed(llama, tmp_path, as_path):
    model, _, batch = llama
    _store_of(Frozen.from_policy(model), batch, tmp_path / "store")
    ref = resolve(tmp_path / "store" if as_path else str(tmp_path / "store"), model)
    assert isinstance(ref, Precomputed) and ref.fallback is None
    torch.testing.assert_close(ref.logprobs(*batch), _at(model, batch), **TOL)


def test_a_model_folder_is_frozen_at_the_temperature(tiny_model_dirs, llama):
    model, _, batch = llama
    policy = copy.deepcopy(model)
    ref = resolve(str(tiny_model_dirs["llama"]), policy, temperature=T)
    assert isinstance(ref, Frozen) and ref.model is not policy and ref.temperature == T
    torch.testing.assert_close(ref.logprobs(*batch), _at(model, batch, T), **TOL)
    assert ref.fingerprint == Frozen(model, temperature=T).fingerprint


def test_a_module_is_frozen_but_not_the_policy_itself(llama):
    model, _, batch = llama
    policy = copy.deepcopy(model)
    ref = resolve(model, policy, temperature=T)
    assert isinstance(ref, Frozen) and ref.model is model and ref.temperature == T
    with pytest.raises(ConfigError, match="is the policy itself"):
        resolve(policy, policy)


@pytest.mark.parametrize("bad, match", [
    ("no/such/folder", "'no/such/folder' is neither a log-prob store folder.*found no such folder"),
    (42, "got int"),
    (0.5, "got float"),
])
def test_other_inputs_are_refused_with_what_is_accepted(llama, bad, match):
    with pytest.raises(ConfigError, match=match):
        resolve(bad, llama[0])


def test_a_folder_that_is_neither_store_nor_model_is_refused(llama, tmp_path):
    with pytest.raises(ConfigError, match="refmodel precompute.*found a folder without manifest.json or config"):
        resolve(tmp_path, llama[0])


@pytest.mark.parametrize("temperature", [0, -1.0, True, "0.7"])
def test_a_bad_temperature_is_refused(llama, temperature):
    with pytest.raises(ConfigError, match="temperature must be a number > 0"):
        resolve(None, llama[0], temperature=temperature)


def test_the_old_names_are_deprecated_aliases(llama):
    pytest.importorskip("trl")
    from refmodel.integrations.trl import resolve_reference as trl_resolve
    from refmodel.recipes.grpo import GRPOConfig, resolve_rl_reference
    from refmodel.recipes.train import resolve_reference as train_resolve

    model = llama[0]
    calls = [lambda: trl_resolve(None, model, temperature=T), lambda: train_resolve(model, None),
             lambda: resolve_rl_reference(model, None, GRPOConfig(temperature=T))]
    for call, temperature in zip(calls, (T, 1.0, T), strict=True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ref = call()
        assert isinstance(ref, Frozen) and ref.temperature == temperature
        assert any(issubclass(w.category, FutureWarning) and "refmodel.reference.resolve" in str(w.message)
                   for w in caught)


# ---------------------------------------------------------------------------------------- a live service
@pytest.fixture(scope="module")
def service(tiny_model_dirs, tmp_path_factory):
    """A ``refmodel serve`` child with one log-prob model and a bearer token."""
    root = tmp_path_factory.mktemp("resolve-service")
    (root / "token").write_text("s3cret\n")
    with ServeProcess(["--model", f"tiny={tiny_model_dirs['llama']}", "--token-file", root / "token"],
                      root / "server.log", token="s3cret") as server:
        yield server


@pytest.mark.integration
@pytest.mark.slow
def test_a_url_and_a_config_with_a_token_are_remote(service, llama, monkeypatch):
    from refmodel.errors import Unauthorized
    from refmodel.reference import Remote

    model, _, batch = llama
    # the bare-URL shortcut carries no token of its own: this server refuses it (401), saying how to send one
    monkeypatch.delenv("REFMODEL_TOKEN", raising=False)
    with pytest.raises(Unauthorized, match="REFMODEL_TOKEN"):
        resolve(service.url, model, temperature=T)
    # ... it takes the token from REFMODEL_TOKEN, as the README's examples do
    monkeypatch.setenv("REFMODEL_TOKEN", "s3cret")
    ref = resolve(service.url, model, temperature=T)
    assert isinstance(ref, Remote) and ref.model == "tiny"
    torch.testing.assert_close(ref.logprobs(*batch), _at(model, batch, T), **TOL)
    monkeypatch.delenv("REFMODEL_TOKEN")
    # ... and a ReferenceConfig carries one, with or without the model's name
    for cfg in (ReferenceConfig(remote_url=service.url, remote_token="s3cret"),
                ReferenceConfig(remote_url=service.url, remote_model="tiny", remote_token="s3cret")):
        ref = resolve(cfg, copy.deepcopy(model), temperature=T)
        assert isinstance(ref, Remote) and ref.model == "tiny" and ref.temperature == T
        assert ref.fingerprint == Frozen(model, temperature=T).fingerprint
        torch.testing.assert_close(ref.logprobs(*batch), _at(model, batch, T), **TOL)
    ref = Remote(service.url, token="s3cret", temperature=T)
    assert resolve(ref, model, temperature=T) is ref
    with pytest.raises(ConfigError, match="temperature 0.7"):
        resolve(ref, model)


@pytest.mark.integration
@pytest.mark.slow
def test_a_bare_url_without_a_token(tiny_model_dirs, llama, tmp_path):
    model, _, batch = llama
    with ServeProcess(["--model", f"tiny={tiny_model_dirs['llama']}"], tmp_path / "server.log") as server:
        ref = resolve(server.url, model, temperature=T)
        assert ref.model == "tiny" and ref.temperature == T
        torch.testing.assert_close(ref.logprobs(*batch), _at(model, batch, T), **TOL)
    with ServeProcess(["--model", f"a={tiny_model_dirs['llama']}", "--model", f"b={tiny_model_dirs['gpt2']}"],
                      tmp_path / "server2.log") as server:
        with pytest.raises(ConfigError, match=r"serves 2 log-prob models \['a', 'b'\].*remote_model=NAME"):
            resolve(server.url, model)
