"""RL against a real ``refmodel serve`` on 127.0.0.1: a reward model through ``/v1/rewards`` in the GRPO
recipe, and ``forward_backward`` routing a named reference to the service by the placement rule."""

from __future__ import annotations

import pytest
import torch
from rl_helpers import make_rollouts

from refmodel import get_global_reference_cache
from refmodel.recipes.grpo import GRPOConfig, ServiceRewardModel, grpo
from refmodel.rl import configure_reference_service, forward_backward, group_advantages
from refmodel.testing import (
    ServeProcess,
    load_tiny,
    make_tokenizer,
    tiny_config,
    verifiable_prompts,
    verifiable_reward,
)
from refmodel.testing.lora import lora_policy

pytestmark = pytest.mark.integration


def _reward_model(path):
    from transformers import AutoModelForSequenceClassification

    tok = make_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = AutoModelForSequenceClassification.from_config(tiny_config("llama", len(tok), num_labels=1))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_srv")
    rm = _reward_model(root / "rm")
    srv = ServeProcess(["--model", f"tiny={tiny_model_dirs['llama']}", "--reward-model", f"rm={rm}"], root / "server.log")
    yield srv, rm
    srv.stop()


def test_service_reward_model_in_the_recipe(server, tiny_model_dirs):
    srv, rm_path = server
    from transformers import AutoModelForSequenceClassification

    model, tok = load_tiny(tiny_model_dirs["llama"])
    rm = ServiceRewardModel(srv.url, "rm")
    ro = make_rollouts(model, tok, n_prompts=2, generations=3, max_new_tokens=3)
    got = rm(ro)
    local = AutoModelForSequenceClassification.from_pretrained(rm_path).eval()
    with torch.no_grad():  # left-padded rows: the score of each row's last real token
        want = torch.stack([local(input_ids=ro.input_ids[i:i + 1, ro.attention_mask[i]]).logits[0, 0]
                            for i in range(ro.batch_size)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    cfg = GRPOConfig(max_steps=2, prompts_per_step=2, num_generations=3, max_new_tokens=2, progress=False,
                     lora_r=4, lora_alpha=8)
    res = grpo(model, tok, verifiable_prompts(), [verifiable_reward, rm], cfg, reward_weights=[1.0, 0.5])
    assert {"reward/verifiable_reward", "reward/service:rm"} <= set(res.history[0])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_backward_routes_a_large_reference_to_the_service(server, tiny_model_dirs, temperature):
    """Served and local reference give the same loss, at the sampling temperature too (the service divides
    the logits by it; forward_backward once refused any temperature but 1 for the service)."""
    srv, _ = server
    cache = get_global_reference_cache()
    cache.registry.add("tiny", tiny_model_dirs["llama"])  # the service serves it under the same name
    base, tok = load_tiny(tiny_model_dirs["llama"])
    policy = lora_policy(base)
    ro = make_rollouts(policy, tok, n_prompts=2, generations=4, max_new_tokens=4, temperature=temperature)
    batch = {"input_ids": ro.input_ids, "attention_mask": ro.attention_mask, "completion_mask": ro.completion_mask,
             "advantages": group_advantages(torch.arange(8.0) % 2, 4)}
    kw = {"reference_model": "tiny", "beta": 0.05, "temperature": temperature}
    local = forward_backward(policy, batch, loss_kwargs=kw)
    policy.zero_grad(set_to_none=True)
    loads = cache.get_cache_info()["loads"]
    try:
        configure_reference_service(srv.url, max_local_bytes=0)  # every reference is "too large": served
        remote = forward_backward(policy, batch, loss_kwargs=kw)
    finally:
        configure_reference_service(None)
    assert cache.get_cache_info()["loads"] == loads  # nothing loaded locally for the routed call
    assert abs(remote.loss - local.loss) <= 1e-5
    torch.testing.assert_close(remote.ref_logprobs, local.ref_logprobs, atol=1e-5, rtol=0)
    cache.remove("tiny", quantize="all")
