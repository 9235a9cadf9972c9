"""RefmodelCallback: per-step reference metrics into TRL's metric buffer, on_step, the KL monitor."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("trl")

import torch
from transformers import TrainerControl, TrainerState

from refmodel import Frozen, LogprobStore, Precomputed
from refmodel.integrations.trl import ReferenceRunner, RefmodelCallback
from refmodel.testing import make_tokenizer, tiny_config


@pytest.fixture(scope="module")
def frozen():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return Frozen(AutoModelForCausalLM.from_config(tiny_config("llama", len(make_tokenizer()))))


class Recorder:
    """A Reference that records on_step calls and answers through another one."""

    def __init__(self, inner):
        self.inner, self.steps = inner, []
        self.fingerprint, self.memory_bytes = inner.fingerprint, 0

    def logprobs(self, *args):
        return self.inner.logprobs(*args)

    def on_step(self, step, policy):
        self.steps.append((step, policy))


def test_metrics_land_in_trls_buffer_per_step_and_on_step_is_called(frozen):
    runner = ReferenceRunner(Recorder(frozen))
    buffer = {"train": {}}
    callback = RefmodelCallback(runner, metrics=buffer, unwrap=lambda m: ("unwrapped", m))
    ids = torch.tensor([[2, 5, 6, 7], [2, 8, 9, 0]])
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    for _ in range(2):  # two micro-batches in one optimizer step
        runner.logprobs(ids, attn, attn.bool())
    state = TrainerState(global_step=3)
    callback.on_step_end(None, state, TrainerControl(), model="policy")
    assert runner.reference.steps == [(3, ("unwrapped", "policy"))]
    assert buffer["train"]["refmodel/ref_rows"] == [4.0] and buffer["train"]["refmodel/ref_seconds"][0] > 0
    assert "refmodel/store_hits" not in buffer["train"]  # no store, no store metrics
    callback.on_step_end(None, state, TrainerControl(), model="policy")
    assert buffer["train"]["refmodel/ref_rows"] == [4.0, 0.0]  # reset after each step


def test_store_hits_and_misses_with_a_fallback(frozen, tmp_path):
    ids = torch.tensor([[2, 5, 6, 7], [2, 8, 9, 4]])
    with LogprobStore.create(tmp_path / "s", frozen.fingerprint, dtype="float32") as store:
        store.put(ids[0], frozen.logprobs(ids[:1])[0], torch.tensor([False, True, True, True]))
    runner = ReferenceRunner(Precomputed(LogprobStore.open(tmp_path / "s"), fallback=frozen))
    sums = runner.sequence_logps(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool))
    torch.testing.assert_close(sums, frozen.logprobs(ids).sum(1), atol=1e-5, rtol=0)
    assert runner.take_metrics() == pytest.approx({"refmodel/ref_seconds": runner.seconds, "refmodel/ref_rows": 2.0,
                                                   "refmodel/store_hits": 1.0, "refmodel/store_misses": 1.0})


def test_kl_monitor_warns_once_above_the_threshold(frozen, caplog):
    callback = RefmodelCallback(ReferenceRunner(frozen), kl_threshold=0.5)
    flags = []
    with caplog.at_level(logging.WARNING):
        for step, kl in enumerate([0.1, 0.7, 0.9], start=1):
            logs = {"kl": kl}
            callback.on_log(None, TrainerState(global_step=step), TrainerControl(), logs=logs)
            flags.append(logs["refmodel/kl_warnings"])
    assert flags == [0.0, 1.0, 0.0]
    assert caplog.text.count("exceeds the threshold") == 1
