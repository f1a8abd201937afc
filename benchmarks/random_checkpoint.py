"""A random-weight HF-layout checkpoint of any anita preset shape, written once and cached.

The CUDA workload needs a Llama-3.1-8B-shaped model without downloading one; both systems must
load the *same* directory, so the weights are drawn here (normal(0, 0.02) as HF initialises
Llama linears and embeddings, ones for the norms), tensor by tensor on the benchmark device, and
written as safetensors shards (one per layer) with a `model.safetensors.index.json`, the layout
`transformers` and `anita.model.checkpoint` both read. Host memory never holds more than a layer.

Shapes: D model dim, F ffn dim, H heads, K kv heads, E head dim, V vocab, L layers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from anita.assets import cache_dir
from anita.model import LlamaConfig


def layer_shapes(c: LlamaConfig, i: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of block i with its HF key and shape."""
    D, Fh, H, K, E = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    p = f"model.layers.{i}."
    return {p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (H * E, D), p + "self_attn.k_proj.weight": (K * E, D),
            p + "self_attn.v_proj.weight": (K * E, D), p + "self_attn.o_proj.weight": (D, H * E),
            p + "mlp.gate_proj.weight": (Fh, D), p + "mlp.up_proj.weight": (Fh, D),
            p + "mlp.down_proj.weight": (D, Fh)}


def outer_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    return shapes


def draw(shapes: dict, gen: torch.Generator, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            out[key] = torch.ones(shape, dtype=dtype)
        else:
            t = torch.empty(shape, device=device, dtype=torch.float32).normal_(0.0, 0.02, generator=gen)
            out[key] = t.to(dtype).cpu()
    return out


def random_checkpoint(preset: str, device: str = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Return the directory of a random `preset`-shaped checkpoint, writing it on first use."""
    name = f"random-{preset}-{str(dtype).removeprefix('torch.')}-seed{seed}"
    out = cache_dir() / "bench" / name
    if (out / "model.safetensors.index.json").is_file():
        return out
    config = LlamaConfig.preset(preset)
    gen = torch.Generator(device=device).manual_seed(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".random-", dir=out.parent))
    try:
        weight_map, total = {}, 0
        groups = [outer_shapes(config)] + [layer_shapes(config, i) for i in range(config.num_hidden_layers)]
        for g, shapes in enumerate(groups):
            tensors = draw(shapes, gen, device, dtype)
            file = f"model-{g:05d}-of-{len(groups):05d}.safetensors"
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            weight_map |= {k: file for k in tensors}
            total += sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        raw = config.to_dict() | {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                  "torch_dtype": str(dtype).removeprefix("torch.")}
        (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
