"""`anita sft`: QLoRA supervised fine-tuning / continued pre-training from the command line.

Every `TrainConfig` field is a flag (`lora_r` -> `--lora-r`) and a key of the `--config` file
(TOML or YAML). Run it under `torchrun --nproc-per-node N -m anita.cli sft ...` for data
parallelism. docs/training.md walks through the loop.
"""

from __future__ import annotations

from anita.train.config import TrainConfig, add_config_command, config_from_args
from anita.train.sft import run_sft


def run(args) -> int:
    cfg = config_from_args(args, TrainConfig)
    records = run_sft(cfg)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    if train:
        last = train[-1]
        print(f"done: {last['step']} steps, last loss {last['loss']:.4f}, peak memory {last['peak_mem_mb']:.0f} MiB; "
              f"adapter in {cfg.output}/adapter")
    if len(evals) >= 2:
        print(f"held-out loss {evals[0]['eval_loss']:.4f} -> {evals[-1]['eval_loss']:.4f}")
    return 0


def register(subparsers) -> None:
    add_config_command(subparsers, "sft", TrainConfig, run, help="QLoRA supervised fine-tuning or continued pre-training",
                       description="Train a LoRA adapter (over a 4-bit NF4 base unless --no-qlora) on JSONL data: "
                                   "{'messages': [...]}, {'prompt', 'completion'} or {'text'} rows.")
