"""Write an anita/HF-layout Llama checkpoint as a llama.cpp GGUF file: the inverse of `anita.model.gguf`.

What goes in (the facts follow llama.cpp's `convert_hf_to_gguf.py` for the Llama architecture and the
`gguf` package's key names; no code is copied):
- `llama.*` metadata: context length, sizes, head counts, RMS eps, rope theta, vocabulary size;
- Llama 3.1 rope scaling as llama.cpp stores it: a `rope_freqs` tensor of per-frequency divisors
  (the base inverse frequencies divided by the scaled ones), plus the original context length;
- tensors under llama.cpp's names, q/k rows in Meta's interleaved RoPE order (`permute_qk`),
  1-D tensors in F32, matrices in the requested type (quantized by the `gguf` package);
- the tokenizer (byte-level BPE tokens, merges, token types, BOS/EOS/EOT ids, add_bos, the
  pre-tokenizer's llama.cpp name) and the chat template.
Shapes: D model dim, H heads, K kv heads, E head dim, V vocab.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants

from anita.errors import AnitaError
from anita.export.tokenizer import TokenizerMetadata, chat_template, tokenizer_metadata
from anita.export.ollama import modelfile_text
from anita.files import atomic_write, write_text
from anita.lora import load_adapter, merge_lora
from anita.lora.pretrained import read_adapter_for
from anita.model import LlamaConfig, Tokenizer, check_finite, from_pretrained
from anita.model.config import read_config_json
from anita.model.gguf import GGUF_TO_HF, rope_factors
from anita.model.llama import Llama

GGUF_TYPES = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16, "bf16": GGMLQuantizationType.BF16,
              "q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}
HF_TO_GGUF = {hf: g for g, hf in GGUF_TO_HF.items()}


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q/k per head from rotate-half (HF: i pairs with i+E/2) to interleaved pairs
    (Meta/llama.cpp: 2i pairs with 2i+1); the inverse of `anita.model.gguf.unpermute_qk`."""
    rows, cols = w.shape  # (n_heads * E, D)
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def gguf_name(hf_name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`, etc."""
    base = hf_name.removesuffix(".weight")
    if base in HF_TO_GGUF:
        return f"{HF_TO_GGUF[base]}.weight"
    _, _, layer, rest = base.split(".", 3)  # model.layers.N.<module>
    return f"blk.{layer}.{HF_TO_GGUF[rest]}.weight"


def encode_tensor(w: torch.Tensor, qtype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType]:
    """The bytes (or floats) to store for `w` and their type. Vectors stay F32, as llama.cpp
    keeps them; a matrix whose rows do not split into the type's blocks falls back to F16."""
    a = w.detach().float().contiguous().numpy()
    if a.ndim == 1 or qtype == GGMLQuantizationType.F32:
        return a, GGMLQuantizationType.F32
    block = quants.GGML_QUANT_SIZES[qtype][0]
    if qtype == GGMLQuantizationType.F16 or a.shape[-1] % block:
        return a.astype(np.float16), GGMLQuantizationType.F16
    return quants.quantize(a, qtype), qtype


def export_tensors(model: Llama):
    """Yield (llama.cpp name, fp32 tensor): tied heads once, q/k permuted, rope_freqs last."""
    c = model.config
    for name, w in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if name.endswith("q_proj.weight"):
            w = permute_qk(w, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = permute_qk(w, c.num_key_value_heads)
        yield gguf_name(name), w
    if c.rope_scaling is not None:
        yield "rope_freqs.weight", rope_factors(c)


def add_config(writer: GGUFWriter, config: LlamaConfig, name: str) -> None:
    """The `llama.*` keys llama.cpp reads for a Llama model."""
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if config.rope_scaling is not None:  # read back by anita's importer; llama.cpp reads rope_freqs
        writer.add_rope_scaling_orig_ctx_len(int(config.rope_scaling["original_max_position_embeddings"]))


def add_tokenizer(writer: GGUFWriter, meta: TokenizerMetadata, template: str | None) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(meta.pre)
    writer.add_token_list(meta.tokens)
    writer.add_token_types(meta.types)
    writer.add_token_merges(meta.merges)
    for add, value in [(writer.add_bos_token_id, meta.bos_id), (writer.add_eos_token_id, meta.eos_id),
                       (writer.add_eot_token_id, meta.eot_id), (writer.add_pad_token_id, meta.pad_id)]:
        if value is not None:
            add(value)
    writer.add_add_bos_token(meta.add_bos)
    if template:
        writer.add_chat_template(template)


def load_merged(model_dir, adapter=None) -> Llama:
    """The fp32 model, with the LoRA adapter (if any, checked before the base loads) merged into the
    unquantized weights, and checked finite."""
    files = read_adapter_for(Path(model_dir), adapter)
    model = from_pretrained(model_dir, dtype=torch.float32)
    if files is not None:
        load_adapter(model, files)
        merge_lora(model)
        check_finite(model, f"merging {adapter} into {model_dir}")
    return model.eval()


def write_gguf(path, model: Llama, meta: TokenizerMetadata, template: str | None, qtype, name: str) -> None:
    """Write the whole file at `path` (callers pass a temporary name)."""
    writer = GGUFWriter(str(path), "llama")
    add_config(writer, model.config, name)
    writer.add_file_type(_file_type(qtype))
    add_tokenizer(writer, meta, template)
    with torch.no_grad():
        for tensor_name, w in export_tensors(model):
            data, dtype = encode_tensor(w, qtype)
            writer.add_tensor(tensor_name, data, raw_dtype=dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _file_type(qtype) -> int:
    # llama.cpp's LLAMA_FTYPE numbers: ALL_F32, MOSTLY_F16, MOSTLY_Q4_0, MOSTLY_Q8_0, MOSTLY_BF16
    return {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "BF16": 32}[qtype.name]


def export_gguf(model_dir, out, qtype: str = "f16", adapter=None, ollama: bool = False, system: bool = False) -> Path:
    """Write `out` (atomically) from the HF-layout `model_dir`, merging `adapter` first if given;
    with `ollama` also `out` with suffix `.Modelfile` (`system`: the recipe's system prompt).
    Everything is checked before the first byte is written."""
    model_dir, out = Path(model_dir), Path(out)
    if qtype not in GGUF_TYPES:
        raise AnitaError(f"--type {qtype!r} is not supported; expected one of {', '.join(GGUF_TYPES)}")
    if not (model_dir / "tokenizer.json").is_file():
        raise AnitaError(f"{model_dir}: no tokenizer.json (a GGUF file carries its tokenizer)")
    _check_llama(model_dir)
    tok = Tokenizer.from_pretrained(model_dir)
    config = LlamaConfig.from_json(model_dir / "config.json")
    meta = tokenizer_metadata(tok, config.vocab_size, str(model_dir / "tokenizer.json"))
    template = chat_template(tok)
    modelfile = modelfile_text(out, tok, system) if ollama else None
    model = load_merged(model_dir, adapter)
    atomic_write(out, lambda tmp: write_gguf(tmp, model, meta, template, GGUF_TYPES[qtype], model_dir.name))
    if modelfile is not None:
        write_text(out.with_suffix(".Modelfile"), modelfile)
    return out


def _check_llama(model_dir: Path) -> None:
    file = model_dir / "config.json"
    raw = read_config_json(file)
    if raw.get("model_type", "llama") != "llama":
        raise AnitaError(f"{file}: model_type {raw['model_type']!r} is not a Llama model (expected 'llama')")
