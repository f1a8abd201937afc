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
from anita.lora.peft_format import AdapterFiles, check_adapter_fits, load_adapter, read_adapter
from anita.model import Llama, Tokenizer, check_finite, from_pretrained, model_skeleton, save_pretrained

# Files beside the weights that make the directory a usable model (tokenizer, chat template, generation).
COPIED = ("tokenizer*", "special_tokens_map.json", "generation_config.json", "*.jinja", "vocab.json", "merges.txt")


def load_for_inference(model_path, adapter=None, dtype="float32", device="cpu",
                       quantize: str | None = None) -> tuple[Llama, Tokenizer]:
    """Model (+ LoRA adapter) in eval mode, and its tokenizer. With `quantize="nf4"` the base
    linears are 4-bit and compute in `dtype`. The adapter is checked before the weights load."""
    quant = {"quantize": quantize, "quantize_kwargs": {"compute_dtype": parse_dtype(dtype)}} if quantize else {}
    model_dir = resolve_model_dir(model_path)
    files = read_adapter_for(model_dir, adapter)
    model = from_pretrained(model_dir, dtype=dtype, device=device, **quant)
    if files is not None:
        load_adapter(model, files)
    return model.eval(), Tokenizer.from_pretrained(model_dir)


def read_adapter_for(model_dir: Path, adapter) -> AdapterFiles | None:
    """The adapter directory read and checked against the model's config.json alone (its meta-device
    skeleton), so a bad adapter is refused before any base weight is read; None without one."""
    if adapter is None:
        return None
    files = read_adapter(adapter)
    check_adapter_fits(model_skeleton(model_dir), files)
    return files


def check_output_dir(output: Path) -> None:
    """The merge writes a new model directory: `output` must not exist, or be an empty directory."""
    if output.exists() and not output.is_dir():
        raise AnitaError(f"{output}: is a file, not a directory; give --output a directory that does not exist "
                         "or is empty")
    if output.is_dir() and any(output.iterdir()):
        raise AnitaError(f"{output}: output directory exists and is not empty")


def merge_to_directory(model_path, adapter_dir, output, dtype="float32") -> str:
    """Load `model_path` + the adapter, merge, and write `output` (which must not exist or be empty).

    Everything is checked before the base loads (output, adapter files and fit), and the merged
    weights are checked finite before anything is written."""
    output = Path(output)
    check_output_dir(output)
    model_dir = resolve_model_dir(model_path)
    files = read_adapter_for(model_dir, adapter_dir)
    model = from_pretrained(model_dir, dtype=dtype)
    report = load_adapter(model, files)
    merge_lora(model)
    check_finite(model, f"merging {adapter_dir} into {model_dir} in {parse_dtype(dtype)}")
    save_pretrained(model, output)
    for pattern in COPIED:
        for f in model_dir.glob(pattern):
            if f.is_file():
                shutil.copy2(f, output / f.name)
    return f"merged {len(report.wrapped)} LoRA layers with the weights of {model_dir}; wrote {output}"
