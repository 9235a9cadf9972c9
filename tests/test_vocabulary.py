"""One vocabulary for the public API (CONTRIBUTING, "Vocabulary"), checked on every public signature.

- ``logprobs``: per-token log-probs ``[B, T]`` (``ref_logprobs``, ``old_logprobs``, ``rollout_logprobs``);
  ``logps`` only for names TRL uses: its per-sequence sums (``chosen_logps``, ``ref_chosen_logps``, ...)
  and the per-token fields its trainers pass (``per_token_logps``, ``sampling_per_token_logps``).
- ``ref_`` prefixes the reference's tensors and config fields; ``reference`` names the object (a
  :class:`refmodel.Reference`, or what :func:`refmodel.reference.resolve` accepts): never a bare ``ref``,
  nor ``reference_<tensor>``.
- One mask name per layer: ``score_mask`` (with ``attention_mask``) where sequences are scored (log-probs,
  references, store, precompute, the TRL runner); ``mask`` in the losses and KL; ``completion_mask`` (TRL's
  field) in the RL loop.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re

import pytest

# The names TRL uses, which refmodel mirrors where it meets TRL (sequence sums and trainer fields).
TRL_NAMES = {"chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "policy_chosen_logps",
             "policy_rejected_logps", "policy_kl_logps", "ref_kl_logps", "sequence_logps", "per_token_logps",
             "sampling_per_token_logps", "old_per_token_logps", "ref_per_token_logps"}
MASK_OF_LAYER = {"refmodel": "score_mask", "refmodel.logprobs": "score_mask", "refmodel.reference": "score_mask",
                 "refmodel.store": "score_mask", "refmodel.precompute": "score_mask",
                 "refmodel.integrations.trl": "score_mask", "refmodel.losses": "mask", "refmodel.kl": "mask",
                 "refmodel.rl": "completion_mask"}


def _names(obj) -> list[str]:
    """Parameter names of a public callable; fields and public methods' parameters of a class."""
    names: list[str] = []
    targets = [obj]
    if inspect.isclass(obj):
        if dataclasses.is_dataclass(obj):
            names += [f.name for f in dataclasses.fields(obj)]
        names += list(getattr(obj, "_fields", ()))
        # refmodel's own methods (a TRL trainer subclass inherits TRL's names, which are TRL's business)
        targets = [f for n, f in vars(obj).items() if inspect.isfunction(f) and (not n.startswith("_") or n == "__init__")]
    for fn in targets:
        try:
            names += [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")]
        except (TypeError, ValueError):
            pass
    return names


def _public(namespace: str):
    module = importlib.import_module(namespace)
    for name in getattr(module, "__all__", ()):
        obj = getattr(module, name)
        if callable(obj) and not inspect.ismodule(obj):
            yield f"{namespace}.{name}", name, obj


def _layer(obj, namespace: str) -> str:
    """The layer an object belongs to: the longest of MASK_OF_LAYER's prefixes of the module defining it."""
    home = getattr(obj, "__module__", "") or namespace
    prefixes = [p for p in MASK_OF_LAYER if home == p or home.startswith(p + ".")]
    return max(prefixes, key=len) if prefixes else namespace


def vocabulary_problems(namespace: str, public=None) -> list[str]:
    bad = []
    for where, name, obj in public if public is not None else _public(namespace):
        mask = MASK_OF_LAYER[_layer(obj, namespace)]
        if "logps" in name and name not in TRL_NAMES:
            bad.append(f"{where}: {name!r} (per-token log-probs are '...logprobs')")
        for word in _names(obj):
            if "logps" in word and word not in TRL_NAMES:
                bad.append(f"{where}: {word!r} (per-token log-probs are '...logprobs')")
            if word in ("ref", "ref_model") or re.fullmatch(r"reference_\w*(logp|logprob|kl|mask)\w*", word):
                bad.append(f"{where}: {word!r} ('reference' for the object, 'ref_' for its tensors and fields)")
            if word.endswith("mask") and word not in ("attention_mask", mask):
                bad.append(f"{where}: {word!r} (the mask of this layer is {mask!r})")
    return bad


@pytest.mark.parametrize("namespace", sorted(MASK_OF_LAYER))
def test_public_signatures_use_the_one_vocabulary(namespace):
    assert vocabulary_problems(namespace) == []


def test_the_checker_sees_each_rule_broken():
    def loss(logps, ref_logps, score_mask, chosen_logps):  # defined here: its layer is the namespace's  # one per-token 'logps' too many, and the wrong mask
        ...

    def score(reference_logprobs, ref, mask):
        ...

    assert vocabulary_problems("refmodel.losses", [("probe.loss", "loss", loss)]) == [
        "probe.loss: 'logps' (per-token log-probs are '...logprobs')",
        "probe.loss: 'ref_logps' (per-token log-probs are '...logprobs')",
        "probe.loss: 'score_mask' (the mask of this layer is 'mask')",
    ]
    assert vocabulary_problems("refmodel.reference", [("probe.score", "score", score)]) == [
        "probe.score: 'reference_logprobs' ('reference' for the object, 'ref_' for its tensors and fields)",
        "probe.score: 'ref' ('reference' for the object, 'ref_' for its tensors and fields)",
        "probe.score: 'mask' (the mask of this layer is 'score_mask')",
    ]
