"""`anita dpo`: preference optimization (docs/recipe.md, stage 2) of a LoRA adapter; `anita.dpo.run_dpo`.

    anita dpo --model DIR [--adapter SFT_ADAPTER] --data FILE --output DIR --beta 0.1 --loss sigmoid
              [--label-smoothing E] [--reference adapters-off|adapter|precomputed|none]
              [--loss orpo|simpo [--simpo-gamma G]] [--loss kto [--desirable-weight W] [--undesirable-weight W]]
              [--rpo-alpha A] [--max-prompt-length N] [--eval-data FILE] [--config FILE] ...

Every field of `anita.dpo.config.DPOConfig` is a flag and a key of the `--config` file (TOML or YAML).
"""

from __future__ import annotations

from anita.dpo.config import DPOConfig
from anita.dpo.run import run_dpo
from anita.train.config import add_config_command, config_from_args


# what the end-of-run lines show, when the loss logs it: DPO's accuracy and margin, ORPO's log odds, KTO's z₀
SUMMARY_KEYS = ("rewards/accuracies", "rewards/margins", "log_odds_chosen", "kl")


def summary_lines(records: list[dict]) -> list[str]:
    """The end-of-run lines: last training step, and the held-out metrics first -> last."""
    lines = []
    train = [r for r in records if "loss" in r]
    if train:
        last = train[-1]
        shown = ", ".join(f"{k} {last[k]:.4f}" for k in SUMMARY_KEYS if k in last)
        lines.append(f"done: {last['step']} steps, last loss {last['loss']:.4f}, {shown}, "
                     f"peak memory {last['peak_mem_mb']:.0f} MiB")
    evals = [r for r in records if "eval_loss" in r]
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        text = f"held-out loss {first['eval_loss']:.4f} -> {last['eval_loss']:.4f}"
        for key in SUMMARY_KEYS:
            if f"eval_{key}" in first and f"eval_{key}" in last:
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
    add_config_command(
        subparsers, "dpo", DPOConfig, run,
        help="DPO (and its variants), ORPO, SimPO and KTO of a LoRA adapter on preference data",
        description="Train a LoRA adapter (over a 4-bit NF4 base unless --no-qlora) with DPO on JSONL rows "
                    "{'prompt', 'chosen', 'rejected'}, or ORPO/SimPO (no reference model), or KTO on unpaired "
                    "rows {'prompt', 'completion', 'label'} (pairs are unpaired); continue an SFT adapter "
                    "with --adapter.")
