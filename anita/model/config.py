"""`LlamaConfig`: the numbers that fix a Llama 3 / 3.1 / 3.2 model, read from an HF `config.json`.

Field names are those of Hugging Face's `LlamaConfig`, so a `config.json` written by transformers
reads here and one written here reads there. Presets hold the shapes of the table in docs/recipe.md
(Meta's model cards) and a tiny size for tests.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from anita.errors import AnitaError, check_number

REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass
class LlamaConfig:
    vocab_size: int = 128256
    hidden_size: int = 4096  # D
    intermediate_size: int = 14336  # F, the SwiGLU hidden size
    num_hidden_layers: int = 32
    num_attention_heads: int = 32  # H
    num_key_value_heads: int | None = 8  # K; None = H (plain multi-head attention)
    head_dim: int | None = None  # E; None = D // H (SmolLM2 and Llama agree; some models differ)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # None, or HF's {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"} (Llama 3.1's frequency-dependent scaling).
    rope_scaling: dict | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False  # Llama 3.2 1B/3B and SmolLM2 share embed_tokens with lm_head
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128001  # 3.1 and later list several stop ids
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # the dtype the checkpoint was saved in; informative only

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        check_sizes(self)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        check_number("config: head_dim", self.head_dim, 2, integer=True)
        if self.head_dim % 2:
            raise AnitaError(f"config: head_dim must be even (RoPE rotates pairs of features), got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise AnitaError(
                f"config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise AnitaError(f"config: rope_scaling must be an object or null, got {self.rope_scaling!r}")
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in ("llama3", "default"):
                raise AnitaError(f"config: rope_scaling type {rope_type!r} is not supported (expected 'llama3')")
            if rope_type == "default":
                self.rope_scaling = None
            else:
                check_llama3_scaling(self.rope_scaling)

    # ------------------------------------------------------------------ reading and writing
    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "LlamaConfig":
        """Build from an HF config dict; `source` (a file name) goes into error messages."""
        missing = [k for k in REQUIRED if k not in raw]
        if missing:
            raise AnitaError(f"{source}: missing required field(s) {', '.join(missing)}")
        if raw.get("hidden_act", "silu") != "silu":
            raise AnitaError(f"{source}: hidden_act={raw['hidden_act']!r} is not supported (Llama uses 'silu')")
        for flag in ("attention_bias", "mlp_bias"):
            if raw.get(flag):
                raise AnitaError(f"{source}: {flag}=true is not supported (Llama 3 has no biases)")
        raw = dict(raw)
        # transformers >= 5 nests rope settings in `rope_parameters`; older files use theta + scaling.
        rope = raw.pop("rope_parameters", None)
        if rope is not None and not isinstance(rope, dict):
            raise AnitaError(f"{source}: rope_parameters must be an object, got {rope!r}")
        if rope:
            raw.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                raw["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        raw.setdefault("rope_theta", 10000.0)  # HF's default when the field is absent
        raw.setdefault("rms_norm_eps", 1e-6)  # likewise
        raw.setdefault("tie_word_embeddings", False)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names}
        try:
            return cls(**kwargs)
        except TypeError as e:  # pragma: no cover - dataclass arity errors
            raise AnitaError(f"{source}: {e}") from None
        except AnitaError as e:  # name the file, not "config"
            raise AnitaError(f"{source}: {str(e).removeprefix('config: ')}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "LlamaConfig":
        return cls.from_dict(read_config_json(path), source=str(path))

    def to_dict(self) -> dict:
        """The HF `config.json` content (transformers 4.x spelling, which 5.x still reads)."""
        out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
               "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
               "initializer_range": 0.02, "use_cache": True}
        out.update(dataclasses.asdict(self))
        if out["torch_dtype"] is None:
            del out["torch_dtype"]
        return out

    @classmethod
    def preset(cls, name: str) -> "LlamaConfig":
        if name not in PRESETS:
            raise AnitaError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])


# ------------------------------------------------------------------------ number checks
def check_sizes(config: LlamaConfig) -> None:
    """Every size a positive int, every float finite and positive, every token id an int: a
    config.json with `"rms_norm_eps": NaN` (Python's json reads it) would give an all-NaN model."""
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings"):
        check_number(f"config: {name}", getattr(config, name), 1, integer=True)
    check_number("config: rope_theta", config.rope_theta, 0, low_open=True)
    check_number("config: rms_norm_eps", config.rms_norm_eps, 0)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = getattr(config, name)
        for i in ids if isinstance(ids, list) else [] if ids is None else [ids]:
            check_number(f"config: {name}", i, integer=True)
    if not isinstance(config.tie_word_embeddings, bool):
        raise AnitaError(f"config: tie_word_embeddings must be true or false, got {config.tie_word_embeddings!r}")


def check_llama3_scaling(scaling: dict) -> None:
    """Llama 3.1's rope_scaling numbers: all present, finite, positive, low_freq_factor < high_freq_factor
    (the smoothing band between them divides by their difference; `anita.model.llama.rope_inv_freq`)."""
    for name in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if name not in scaling:
            raise AnitaError(f"config: rope_scaling of type 'llama3' needs {name!r}")
        check_number(f"config: rope_scaling.{name}", scaling[name], 0, low_open=True)
    if not scaling["low_freq_factor"] < scaling["high_freq_factor"]:
        raise AnitaError(f"config: rope_scaling.low_freq_factor ({scaling['low_freq_factor']}) must be below "
                         f"high_freq_factor ({scaling['high_freq_factor']})")


def read_config_json(path: str | Path) -> dict:
    """The raw fields of an HF `config.json`; a missing or malformed file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise AnitaError(f"{path}: config.json not found")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AnitaError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(raw, dict):
        raise AnitaError(f"{path}: expected a JSON object of model settings, got a {type(raw).__name__}")
    return raw


def _llama31_scaling(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


_L3_COMMON = dict(vocab_size=128256, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                  bos_token_id=128000)
PRESETS: dict[str, dict] = {
    "llama-3-8b": dict(_L3_COMMON, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, max_position_embeddings=8192, eos_token_id=128009),
    "llama-3.1-8b": dict(_L3_COMMON, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, max_position_embeddings=131072,
                         rope_scaling=_llama31_scaling(8.0), eos_token_id=[128001, 128008, 128009]),
    "llama-3.2-1b": dict(_L3_COMMON, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, head_dim=64, max_position_embeddings=131072,
                         rope_scaling=_llama31_scaling(32.0), tie_word_embeddings=True,
                         eos_token_id=[128001, 128008, 128009]),
    "llama-3.2-3b": dict(_L3_COMMON, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, head_dim=128, max_position_embeddings=131072,
                         rope_scaling=_llama31_scaling(32.0), tie_word_embeddings=True,
                         eos_token_id=[128001, 128008, 128009]),
    # Small enough for unit tests, Llama-3-shaped: GQA (4 heads / 2 kv heads), rope scaling on.
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0,
                 max_position_embeddings=512, rope_scaling=_llama31_scaling(8.0) | {
                     "original_max_position_embeddings": 64}, bos_token_id=1, eos_token_id=2),
}
