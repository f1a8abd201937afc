"""`anita merge`: fold a LoRA adapter into its base model and write an HF-layout model directory.

The last stage of the recipe (shared/RECIPE.md: "adapters merged into a bf16 base and published").
The base is loaded in full precision (`--dtype`), the adapter in fp32, and the merge is computed in
fp32 (`anita.lora.merge_lora`), so the written model gives the logits of base + adapter.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from anita.errors import AnitaError

# Files beside the weights that make the directory a usable model (tokenizer, chat template, generation).
COPIED = ("tokenizer*", "special_tokens_map.json", "generation_config.json", "*.jinja", "vocab.json", "merges.txt")


def merge_to_directory(model_path, adapter_dir, output, dtype="float32") -> str:
    """Load `model_path` + the adapter, merge, and write `output` (which must not exist or be empty)."""
    from anita.lora.model import merge_lora
    from anita.lora.peft_format import load_adapter
    from anita.model import Llama
    from anita.model.checkpoint import resolve_model_dir

    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise AnitaError(f"{output}: output directory exists and is not empty")
    model_dir = resolve_model_dir(model_path)
    model = Llama.from_pretrained(model_dir, dtype=dtype)
    report = load_adapter(model, adapter_dir)
    merge_lora(model)
    model.save_pretrained(output)
    for pattern in COPIED:
        for f in model_dir.glob(pattern):
            if f.is_file():
                shutil.copy2(f, output / f.name)
    return f"merged {len(report.wrapped)} LoRA layers with the weights of {model_dir}; wrote {output}"


def run_merge(args) -> int:
    print(merge_to_directory(args.model, args.adapter, args.output, args.dtype))
    return 0


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge a LoRA adapter into its base model (HF layout out)")
    p.add_argument("--model", required=True, help="base model: HF-layout directory or Hub id")
    p.add_argument("--adapter", required=True, help="LoRA adapter directory (PEFT format)")
    p.add_argument("--output", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the base and of the written weights (the recipe publishes bfloat16)")
    p.set_defaults(func=run_merge)
