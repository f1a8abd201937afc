"""`anita merge`: fold a LoRA adapter into its base model and write an HF-layout model directory
(`anita.lora.merge_to_directory`)."""

from __future__ import annotations

from anita.dtypes import WEIGHT_DTYPE_NAMES
from anita.lora import merge_to_directory


def run_merge(args) -> int:
    print(merge_to_directory(args.model, args.adapter, args.output, args.dtype))
    return 0


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge a LoRA adapter into its base model (HF layout out)")
    p.add_argument("--model", required=True, help="base model: HF-layout directory or Hub id")
    p.add_argument("--adapter", required=True, help="LoRA adapter directory (PEFT format)")
    p.add_argument("--output", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--dtype", default="float32", choices=WEIGHT_DTYPE_NAMES,
                   help="dtype of the base and of the written weights (the recipe publishes bfloat16)")
    p.set_defaults(func=run_merge)
