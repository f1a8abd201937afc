"""`anita dpo`: preference optimization (docs/recipe.md, stage 2) of a LoRA adapter; `anita.dpo.run_dpo`.

    anita dpo --model DIR [--adapter SFT_ADAPTER] --data FILE --output DIR --beta 0.1 --loss sigmoid
              [--label-smoothing E] [--reference adapters-off|adapter|precomputed|none]
              [--rpo-alpha A] [--max-prompt-length N] [--eval-data FILE] [--config FILE] ...

Every field of `anita.dpo.config.DPOConfig` is a flag and a key of the `--config` file (TOML or YAML).
"""

from __future__ import annotations

from anita.dpo.config import DPOConfig
from anita.dpo.run import run_dpo
from anita.train.config import add_config_arguments, config_from_args


def summary_lines(records: list[dict]) -> list[str]:
    """The end-of-run lines: last training step, and held-out reward accuracy/margins first -> last."""
    lines = []
    train = [r for r in records if "rewards/margins" in r]
    if train:
        last = train[-1]
        lines.append(f"done: {last['step']} steps, last loss {last['loss']:.4f}, reward accuracy "
                     f"{last['rewards/accuracies']:.3f}, margin {last['rewards/margins']:.4f}, "
                     f"peak memory {last['peak_mem_mb']:.0f} MiB")
    evals = [r for r in records if "eval_loss" in r]
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        text = f"held-out loss {first['eval_loss']:.4f} -> {last['eval_loss']:.4f}"
        for key in ("rewards/accuracies", "rewards/margins"):
            if f"eval_{key}" in first:
                text += f", {key} {first[f'eval_{key}']:.4f} -> {last[f'eval_{key}']:.4f}"
        lines.append(text)
    return lines


def run(args) -> int:
    cfg = config_from_args(args, DPOConfig)
    records = run_dpo(cfg)
    for line in summary_lines(records):
        print(line)
    print(f"adapter in {cfg.output}/adapter")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "dpo", help="DPO (and its variants) of a LoRA adapter on preference pairs",
        description="Train a LoRA adapter (over a 4-bit NF4 base unless --no-qlora) with DPO on JSONL rows "
                    "{'prompt', 'chosen', 'rejected'}; continue an SFT adapter with --adapter.")
    add_config_arguments(p, DPOConfig)
    p.set_defaults(func=run)
