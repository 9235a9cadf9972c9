"""The public API: about 25 names grouped by job; every name that moved still works for one release."""

from __future__ import annotations

import importlib
import pydoc
import warnings

import pytest

import refmodel
from refmodel import _MOVED  # the table under test

PUBLIC = {
    "__version__",
    "token_logprobs", "model_logprobs", "head_logprobs", "LMHead",                     # log-probs
    "Reference", "ReferenceConfig", "auto", "Frozen", "AdapterDisabled", "Precomputed",  # references
    "Synced", "Remote", "ReferenceFree",
    "LogprobStore", "PrecomputeConfig", "precompute",                                  # store, precompute
    "ReferenceClient",                                                                 # the service's client
    "fingerprint", "ReferenceModelCache", "get_global_reference_cache",                # models
    "losses", "kl", "rl",                                                              # namespaces
    "RefModelError",                                                                   # errors
}


def test_the_public_api_is_the_grouped_list():
    assert set(refmodel.__all__) == PUBLIC and len(refmodel.__all__) == len(PUBLIC)
    for name in refmodel.__all__:
        assert getattr(refmodel, name) is not None


def test_every_loss_is_in_losses_and_the_kl_namespace_imports_as_documented():
    for name in ("dpo", "kto", "orpo", "simpo", "policy_loss", "fused_policy_loss", "PolicyLossConfig",
                 "kl_penalized_rewards", "group_advantages", "rloo_advantages", "gae_advantages"):
        assert name in refmodel.losses.__all__, name
    from refmodel.kl import KLMonitor, estimate, exact  # the paths the docs write

    assert KLMonitor is refmodel.losses.kl.KLMonitor and estimate is refmodel.kl.estimate and callable(exact)


def test_help_names_the_trl_integration():
    text = pydoc.render_doc(refmodel, renderer=pydoc.plaintext)
    assert "refmodel.integrations.trl" in text and "DPOTrainer" in text


@pytest.mark.parametrize("old", sorted(_MOVED))
def test_an_old_top_level_name_warns_and_is_its_new_home(old):
    owner, _, attr = _MOVED[old].rpartition(".")
    with pytest.warns(FutureWarning, match=rf"refmodel\.{old} is deprecated .* use {_MOVED[old]}"):
        got = getattr(refmodel, old)
    assert got is getattr(importlib.import_module(owner), attr)
    assert old not in refmodel.__all__


def test_from_import_of_an_old_name_still_works_with_a_warning():
    with pytest.warns(FutureWarning, match="refmodel.losses.policy_loss"):
        from refmodel import policy_loss
    assert policy_loss is refmodel.losses.policy_loss


def test_an_unknown_name_is_an_attribute_error_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
            refmodel.no_such_name  # noqa: B018


def test_the_old_per_token_keywords_fields_and_batch_keys_still_work_with_a_warning():
    import torch

    from refmodel.losses import policy_loss
    from refmodel.rl import ForwardBackwardOutput
    from refmodel.rl.forward_backward import _get

    g = torch.Generator().manual_seed(0)
    lp, old, ref = (-torch.rand(2, 5, generator=g) for _ in range(3))
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 5, dtype=torch.bool)
    new = policy_loss(lp, old, adv, mask, ref_logprobs=ref, beta=0.1).loss
    with pytest.warns(FutureWarning, match=r"policy_loss\(ref_logps=\.\.\.\) is deprecated .* use ref_logprobs"):
        got = policy_loss(logps=lp, old_logprobs=old, advantages=adv, mask=mask, ref_logps=ref, beta=0.1).loss
    assert torch.equal(got, new)
    out = ForwardBackwardOutput(loss=1.0, metrics={}, logprobs=lp, ref_logprobs=ref)
    with pytest.warns(FutureWarning, match=r"ForwardBackwardOutput\.ref_logps is deprecated .* use \.ref_logprobs"):
        assert out.ref_logps is ref
    with pytest.warns(FutureWarning, match="batch key 'old_logps' is deprecated"):
        assert _get({"old_logps": old}, "old_logprobs") is old
    with pytest.warns(FutureWarning, match="refmodel.rl.reference_logps is deprecated"):
        assert refmodel.rl.reference_logps is refmodel.rl.reference_logprobs
