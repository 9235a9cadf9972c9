"""PrecomputeConfig: one set of defaults for precompute(), precompute_on_ray(), the Ray scorer and the CLI."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from click.testing import CliRunner

from refmodel import PrecomputeConfig, fingerprint
from refmodel.cli.main import main, precompute_cmd
from refmodel.errors import ConfigError, InvalidInput
from refmodel.precompute.job import precompute
from refmodel.precompute.ray import ShardScorer
from refmodel.testing import load_tiny, preference_pairs


def test_cli_defaults_are_the_configs():
    cfg = PrecomputeConfig()
    defaults = {p.name: p.default for p in precompute_cmd.params}
    for name in ("dtype", "max_length", "truncation_mode", "max_tokens_per_batch", "shard_examples", "temperature",
                 "model_dtype"):
        assert defaults[name] == getattr(cfg, name), name
    help_text = CliRunner().invoke(main, ["precompute", "--help"], terminal_width=200).output
    assert f"[default: {cfg.device}]" in help_text and f"[default: {cfg.cpus_per_worker:g}]" in help_text
    scorer = inspect.signature(ShardScorer.__init__).parameters
    assert scorer["max_tokens_per_batch"].default == cfg.max_tokens_per_batch
    assert scorer["share_prompt"].default == cfg.share_prompt


def test_bad_settings_are_refused_with_the_allowed_values(tiny_model_dirs, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown precompute setting\(s\) \['max_tokens'\]; PrecomputeConfig has"):
        precompute(tiny_model_dirs["llama"], preference_pairs(2), tmp_path / "s", max_tokens=5)
    for bad, match in [({"device": "tpu"}, "unknown device 'tpu'"), ({"model_dtype": "int8"}, "unknown model_dtype"),
                       ({"truncation_mode": "middle"}, "unknown truncation_mode"), ({"dtype": "int4"}, "int4"),
                       ({"max_tokens_per_batch": 0}, "max_tokens_per_batch must be >= 1"),
                       ({"temperature": 0.0}, "temperature must be a finite number > 0")]:
        with pytest.raises(ConfigError, match=match):
            PrecomputeConfig(**bad)
    assert not (tmp_path / "s").exists()
    runner = CliRunner()
    args = ["precompute", "--model", str(tiny_model_dirs["llama"]), "--data", str(tiny_model_dirs["llama"]),
            "--out", str(tmp_path / "o")]
    out = runner.invoke(main, [*args, "--num-workers", "2"])
    assert out.exit_code == 2 and "--num-workers: only used with --ray" in out.output
    out = runner.invoke(main, [*args, "--ray", "--device", "cuda"])
    assert out.exit_code == 2 and "--device: not used with --ray" in out.output


def test_model_dtype_and_device(tiny_model_dirs, tmp_path):
    store = precompute(tiny_model_dirs["llama"], preference_pairs(2), tmp_path / "s", model_dtype="bfloat16",
                       device="cpu", progress=False)
    model, _ = load_tiny(tiny_model_dirs["llama"])
    assert store.fingerprint == fingerprint(model.to(torch.bfloat16)) != fingerprint(model.float())
    assert dataclasses.replace(PrecomputeConfig(), device="auto").resolved_device() in ("cpu", "cuda")


def test_sequences_past_the_position_limit_are_refused_before_any_store(tiny_model_dirs, tmp_path):
    long = [{"prompt": "so " * 300 + "what is 1 plus 1 ?", "chosen": " 2 .", "rejected": " 3 ."}]  # > 256 positions
    with pytest.raises(InvalidInput, match=r"record 0: the chosen sequence has \d+ tokens .* position limit of "
                                           r"256 \(config\.max_position_embeddings\).* max_length \(--max-length\)"):
        precompute(tiny_model_dirs["llama"], long, tmp_path / "s", max_length=None, progress=False)
    assert not (tmp_path / "s").exists()
    store = precompute(tiny_model_dirs["llama"], long, tmp_path / "t", max_length=256, truncation_mode="keep_end",
                       progress=False)
    assert len(store) == 2
