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
