"""Convert a llama.cpp GGUF file of a Llama-family model into an HF-layout directory.

What the conversion undoes (llama.cpp's `convert_hf_to_gguf.py` did the opposite):
- tensor names: `blk.N.attn_q` -> `model.layers.N.self_attn.q_proj`, etc. (`GGUF_TO_HF`);
- quantization: each tensor is dequantized to fp32 by the `gguf` package's reference
  dequantizers (Q4_0, Q4_1, Q8_0, K-quants, ...);
- q/k row order: llama.cpp stores q_proj and k_proj rows in Meta's interleaved RoPE layout
  (pairs (2i, 2i+1) rotate together); HF checkpoints, and anita, use "rotate half" (i, i+E/2).
  `unpermute_qk` maps one to the other;
- Llama 3.1 rope scaling from the `rope_freqs` tensor (`rope_scaling_from_factors`);
- config from the `llama.*` metadata, tokenizer.json from `tokenizer.ggml.*`, the chat template
  from `tokenizer.chat_template`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from anita.errors import AnitaError
from anita.model.checkpoint import assign_tensor, save_pretrained
from anita.model.config import LlamaConfig
from anita.model.llama import Llama, rope_inv_freq

GGUF_TO_HF = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# llama.cpp's names for pre-tokenizers whose split rules anita reproduces with `tokenizers`.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values of special tokens


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q/k per head from interleaved pairs (Meta/llama.cpp) to rotate-half (HF)."""
    rows, cols = w.shape  # (n_heads * E, D)
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_name(gguf_name: str) -> str:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if m and m.group(2) in GGUF_TO_HF:
        return f"model.layers.{m.group(1)}.{GGUF_TO_HF[m.group(2)]}.weight"
    base = gguf_name.removesuffix(".weight")
    if base in GGUF_TO_HF and "." not in base:
        return f"{GGUF_TO_HF[base]}.weight"
    raise AnitaError(f"unsupported GGUF tensor {gguf_name!r} (not part of a Llama model)")


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader, file: Path) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise AnitaError(f"{file}: architecture {arch!r} is not supported (expected 'llama')")
    g = lambda key, default=None: _field(reader, f"llama.{key}", default)  # noqa: E731
    heads = g("attention.head_count")
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    names = {t.name for t in reader.tensors}
    config = LlamaConfig(
        vocab_size=g("vocab_size", len(tokens)), hidden_size=g("embedding_length"),
        intermediate_size=g("feed_forward_length"), num_hidden_layers=g("block_count"),
        num_attention_heads=heads, num_key_value_heads=g("attention.head_count_kv", heads),
        head_dim=g("attention.key_length", g("embedding_length") // heads),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=float(g("rope.freq_base", 10000.0)),
        max_position_embeddings=g("context_length", 2048), tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"), torch_dtype="float32",
    )
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        config.rope_scaling = rope_scaling_from_factors(reader, config, np.asarray(freqs.data, np.float32), file)
    return config


def rope_factors(config: LlamaConfig) -> torch.Tensor:
    """(E/2,) llama.cpp's `rope_freqs`: what Llama 3.1 scaling divides each inverse frequency by."""
    plain = dataclasses.replace(config, rope_scaling=None)
    return (rope_inv_freq(plain).double() / rope_inv_freq(config).double()).float()


def rope_scaling_from_factors(reader, config: LlamaConfig, factors: np.ndarray, file: Path) -> dict:
    """Llama 3.1 scaling from llama.cpp's `rope_freqs` (each inverse frequency's divisor): factor =
    the largest divisor, Meta's low/high frequency factors 1 and 4, the original context from
    `llama.rope.scaling.original_context_length` (Meta's 8192 when absent). Refused unless these
    give back every divisor."""
    original = _field(reader, "llama.rope.scaling.original_context_length", 8192)
    scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": int(original)}
    want = rope_factors(dataclasses.replace(config, rope_scaling=scaling)).numpy()
    if want.shape != factors.shape or not np.allclose(factors, want, rtol=1e-5, atol=0):
        raise AnitaError(f"{file}: rope_freqs does not follow Llama 3.1's rope scaling (factor {scaling['factor']}, "
                         f"low/high frequency factors 1/4, original context {original}); not supported")
    return scaling


def gguf_tensors(reader, config: LlamaConfig, file: Path):
    """Yield (hf_name, fp32 tensor) for every tensor of the file, dequantized and un-permuted."""
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # read into config.rope_scaling by gguf_config
            continue
        name = hf_name(t.name)
        try:
            array = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise AnitaError(f"{file}: tensor {t.name!r} has type {GGMLQuantizationType(t.tensor_type).name}, "
                             "which the gguf package cannot dequantize") from None
        w = torch.from_numpy(np.array(array, dtype=np.float32))  # a writable copy
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))  # GGUF lists dims fastest-first
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, config.num_key_value_heads)
        yield name, w


def gguf_tokenizer(reader, file: Path):
    """Rebuild a byte-level BPE `tokenizers.Tokenizer` from the GGUF vocabulary and merges."""
    kind, pre = _field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise AnitaError(f"{file}: tokenizer model {kind!r} is not supported (expected byte-level BPE 'gpt2')")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "llama-bpe")
    if pre == "llama-bpe":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"), byte_level])
    elif pre in ("smollm", "starcoder", "refact"):  # llama.cpp: split every digit, then GPT-2's regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("gpt-2", "default"):
        tok.pre_tokenizer = byte_level
    else:
        raise AnitaError(f"{file}: pre-tokenizer {pre!r} is not supported (llama-bpe, smollm, gpt-2)")
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind in (CONTROL, USER_DEFINED)])
    return tok, tokens


def convert_gguf(gguf_file, out_dir) -> Path:
    """Write `out_dir` (which must not exist or be empty) as an HF-layout fp32 checkpoint."""
    file, out_dir = Path(gguf_file), Path(out_dir)
    if not file.is_file():
        raise AnitaError(f"{file}: no such GGUF file")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise AnitaError(f"{out_dir}: output directory exists and is not empty; choose another")
    try:
        reader = GGUFReader(str(file))
    except Exception as e:  # the reader raises ValueError/struct errors on foreign or truncated files
        raise AnitaError(f"{file}: not a readable GGUF file ({e})") from None
    config = gguf_config(reader, file)
    tokenizer = gguf_tokenizer(reader, file)  # validated before anything is written
    with torch.device("meta"):
        model = Llama(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if not (k == "lm_head.weight" and config.tie_word_embeddings)}
    for name, w in gguf_tensors(reader, config, file):
        if name not in expected or tuple(w.shape) != tuple(expected[name]):
            raise AnitaError(f"{file}: tensor {name!r} of shape {tuple(w.shape)} does not fit the config")
        assign_tensor(model, name, w)
    model.tie_weights()
    save_pretrained(model, out_dir)
    _write_tokenizer(reader, tokenizer, out_dir, config)
    return out_dir


def _write_tokenizer(reader, tokenizer, out_dir: Path, config: LlamaConfig) -> None:
    tok, tokens = tokenizer
    tok.save(str(out_dir / "tokenizer.json"))
    name = lambda i: tokens[i] if i is not None and 0 <= i < len(tokens) else None  # noqa: E731
    tok_config = {"bos_token": name(config.bos_token_id), "eos_token": name(config.eos_token_id),
                  "pad_token": name(config.pad_token_id), "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
                  "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_position_embeddings,
                  "clean_up_tokenization_spaces": False}
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tok_config["chat_template"] = template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
