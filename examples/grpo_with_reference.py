"""GRPO in TRL with a reference chosen by memory budget: the adapter-off base, a frozen copy, or int8.

    python examples/grpo_with_reference.py --model Qwen/Qwen2.5-0.5B-Instruct --reference adapter

``--reference adapter`` trains a LoRA policy whose reference is its own base with the adapters off (no
second copy of the weights); ``frozen`` keeps a frozen copy; ``int8`` a frozen int8 copy (extra ``quant``).
Every one scores at the sampling temperature, as TRL's own reference does. Runs on a CPU or a GPU.
"""

from __future__ import annotations

import argparse

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig

from refmodel import Frozen
from refmodel.integrations.trl import GRPOTrainer


def reward_len(completions, **kwargs) -> list[float]:
    """TRL's example reward: completions close to 20 characters."""
    return [-abs(20 - len(c)) / 20 for c in completions]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="Hub id or local folder")
    parser.add_argument("--dataset", default="trl-lib/tldr", help="prompt-only data: Hub name or local folder")
    parser.add_argument("--num-examples", type=int, default=256)
    parser.add_argument("--reference", choices=["adapter", "frozen", "int8"], default="adapter")
    parser.add_argument("--output-dir", default="runs/grpo-reference")
    parser.add_argument("--max-steps", type=int, default=10)
    args = parser.parse_args(argv)

    gpu = torch.cuda.is_available()
    config = GRPOConfig(args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=8, num_generations=4,
                        max_completion_length=32, beta=0.04, temperature=0.7, logging_steps=1,
                        use_cpu=not gpu, bf16=gpu, report_to=[])
    peft_config = None
    if args.reference == "adapter":
        from peft import LoraConfig

        peft_config, reference = LoraConfig(r=16, target_modules="all-linear"), "adapter"
    else:
        # a second, frozen copy of the start (refmodel loads folders only; a loaded model works for any id)
        reference = Frozen(AutoModelForCausalLM.from_pretrained(args.model),
                           quantize="int8" if args.reference == "int8" else None, temperature=config.temperature)
    trainer = GRPOTrainer(AutoModelForCausalLM.from_pretrained(args.model), reward_funcs=reward_len, args=config,
                          train_dataset=load_dataset(args.dataset, split=f"train[:{args.num_examples}]"),
                          processing_class=AutoTokenizer.from_pretrained(args.model), peft_config=peft_config,
                          reference=reference)
    trainer.train()
    print({k: v for k, v in trainer.state.log_history[-2].items() if k in ("loss", "kl", "reward")
           or k.startswith("refmodel/")})


if __name__ == "__main__":
    main()
