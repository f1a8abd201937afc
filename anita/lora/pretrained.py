"""A base checkpoint and a LoRA adapter directory together: loaded for generation and scoring
(`load_for_inference`), or folded into one HF-layout model directory (`merge_to_directory`, the
recipe's last stage: "adapters merged into a bf16 base and published", docs/recipe.md).

The merge loads the base in full precision (`dtype`), the adapter in fp32, and computes the merged
weights in fp32 (`anita.lora.merge_lora`), so the written model gives the logits of base + adapter.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from anita.dtypes import parse_dtype
from anita.errors import AnitaError
from anita.hub import resolve_model_dir
from anita.lora.model import merge_lora
from anita.lora.peft_format import load_adapter
from anita.model import Llama, Tokenizer, from_pretrained, save_pretrained

# Files beside the weights that make the directory a usable model (tokenizer, chat template, generation).
COPIED = ("tokenizer*", "special_tokens_map.json", "generation_config.json", "*.jinja", "vocab.json", "merges.txt")


def load_for_inference(model_path, adapter=None, dtype="float32", device="cpu",
                       quantize: str | None = None) -> tuple[Llama, Tokenizer]:
    """Model (+ LoRA adapter) in eval mode, and its tokenizer. With `quantize="nf4"` the base
    linears are 4-bit and compute in `dtype`."""
    quant = {"quantize": quantize, "quantize_kwargs": {"compute_dtype": parse_dtype(dtype)}} if quantize else {}
    model = from_pretrained(model_path, dtype=dtype, device=device, **quant)
    if adapter is not None:
        load_adapter(model, adapter)
    return model.eval(), Tokenizer.from_pretrained(model_path)


def merge_to_directory(model_path, adapter_dir, output, dtype="float32") -> str:
    """Load `model_path` + the adapter, merge, and write `output` (which must not exist or be empty)."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise AnitaError(f"{output}: output directory exists and is not empty")
    model_dir = resolve_model_dir(model_path)
    model = from_pretrained(model_dir, dtype=dtype)
    report = load_adapter(model, adapter_dir)
    merge_lora(model)
    save_pretrained(model, output)
    for pattern in COPIED:
        for f in model_dir.glob(pattern):
            if f.is_file():
                shutil.copy2(f, output / f.name)
    return f"merged {len(report.wrapped)} LoRA layers with the weights of {model_dir}; wrote {output}"
