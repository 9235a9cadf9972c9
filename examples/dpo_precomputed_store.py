"""DPO in TRL on a precomputed reference store: the reference is scored once, then only read.

    python examples/dpo_precomputed_store.py --model Qwen/Qwen2.5-0.5B-Instruct --max-steps 10

Step 1 writes the reference's per-token log-probs of the dataset into a store (skipped when the store is
already there: run the script again with other training settings and it reuses it); step 2 trains with
refmodel's ``DPOTrainer``, TRL's own plus ``reference=``, which loads no reference model. Runs on a CPU or
a GPU (``use_cpu`` / ``bf16`` follow the device).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig

import refmodel
from refmodel.integrations.trl import DPOTrainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="Hub id or local folder (the SFT model)")
    parser.add_argument("--dataset", default="trl-lib/ultrafeedback_binarized", help="Hub name or local folder")
    parser.add_argument("--num-examples", type=int, default=256)
    parser.add_argument("--store", default="runs/ref-store", help="store folder (reused when it exists)")
    parser.add_argument("--output-dir", default="runs/dpo-store")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--max-length", type=int, default=1024, help="TRL's max_length, for the store and the trainer")
    args = parser.parse_args(argv)

    dataset = load_dataset(args.dataset, split=f"train[:{args.num_examples}]")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)

    if not (Path(args.store) / "manifest.json").is_file():
        # the SFT model is the reference: score it once, with the trainer's tokenization settings
        refmodel.precompute(model, dataset, args.store, tokenizer=tokenizer, max_length=args.max_length)
    print(refmodel.LogprobStore.open(args.store).info())

    gpu = torch.cuda.is_available()
    config = DPOConfig(args.output_dir, max_steps=args.max_steps, max_length=args.max_length,
                       per_device_train_batch_size=4, logging_steps=1, use_cpu=not gpu, bf16=gpu, report_to=[])
    trainer = DPOTrainer(model, args=config, train_dataset=dataset, processing_class=tokenizer, reference=args.store)
    trainer.train()
    print({k: v for k, v in trainer.state.log_history[-2].items() if k.startswith(("loss", "refmodel/"))})


if __name__ == "__main__":
    main()
