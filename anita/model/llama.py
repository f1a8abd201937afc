"""Llama 3 / 3.1 / 3.2, written out: RMSNorm, RoPE (with Llama 3.1's frequency scaling),
grouped-query attention through PyTorch's `scaled_dot_product_attention`, the SwiGLU MLP, and a
KV cache.

References: Touvron et al. 2023 (LLaMA), Meta's `llama/model.py`, the Llama 3 herd paper
(Dubey et al. 2024, §3 and the 3.1 rope scaling), Su et al. 2021 (RoFormer), Ainslie et al. 2023
(GQA), Shazeer 2020 (GLU variants), Zhang & Sennrich 2019 (RMSNorm).

Layout: parameter names equal Hugging Face's `LlamaForCausalLM` keys, and q/k rows use HF's
"rotate half" RoPE layout (Meta's original checkpoints interleave pairs instead; see
`anita.model.gguf` for the conversion). Loading and saving live in `anita.model.checkpoint`, and what
backward recomputes (`Llama.checkpointing`) in `anita.model.activation_checkpointing`.
`PROJECTIONS` names the seven linears of a block, the default targets of NF4 and LoRA.

Shapes: B batch, T new tokens (queries), S keys (cache + new), D model dim, H heads,
K kv heads, E head dim, F ffn dim, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from anita.errors import AnitaError
from anita.model.activation_checkpointing import checkpoint_block
from anita.model.config import LlamaConfig
from anita.model.fused import can_fuse, fused_projections
from anita.model.masks import Spans
from anita.model.varlen import attend_varlen, flash_applies

# The seven projections of a block, by their HF names (docs/recipe.md: "q, k, v, o, gate, up, down").
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in fp32 and cast back (as Meta and HF do)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# ---------------------------------------------------------------------------------- RoPE
def rope_inv_freq(config: LlamaConfig, device=None) -> torch.Tensor:
    """The E/2 rotation frequencies θ_i = base^(-2i/E), rescaled per Llama 3.1 when configured.

    Llama 3.1 scaling (HF `_compute_llama3_parameters`): wavelengths longer than
    original_len / low_freq_factor are slowed by `factor`, shorter than original_len /
    high_freq_factor are kept, and the band between is interpolated smoothly.
    """
    E = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, E, 2, dtype=torch.int64, device=device).float() / E)
    s = config.rope_scaling
    if s is None:
        return inv_freq  # (E/2,)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)  # 0 at the long end of the band, 1 at the short
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(in_band, smoothed, scaled)  # (E/2,)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos and sin of position · frequency, duplicated to E for the rotate-half layout: (B, T, E)."""
    angles = position_ids[..., None].float() * inv_freq.float()  # (B, T, E/2), fp32 for long positions
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, E)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+E/2}) pair of x (B, H, T, E) by its position's angle."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


# ----------------------------------------------------------------------------- KV cache
class KVCache(nn.Module):
    """Keys and values of every layer for B sequences of up to `max_len` tokens.

    `update` writes the new tokens' k/v at `length` and returns all keys so far; the model
    advances `length` once per forward, after the last layer.
    """

    def __init__(self, config: LlamaConfig, batch_size: int, max_len: int, dtype=torch.float32, device=None):
        super().__init__()
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.length = 0  # tokens already cached

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        T = k.shape[2]
        end = self.length + T
        if end > self.k.shape[3]:
            raise ValueError(f"KV cache holds {self.k.shape[3]} tokens; {end} requested")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, K, S, E) each


# ---------------------------------------------------------------------------- attention
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | Spans | None) -> torch.Tensor:
    """softmax(q kᵀ / √E + mask) v through SDPA: q (B, H, T, E), k and v (B, K, S, E) -> (B, H, T, E).

    Each group of H/K query heads shares one kv head (GQA); SDPA broadcasts it (`enable_gqa`).
    With no mask, plain causal attention (FlashAttention on CUDA, SDPA's flash kernel on CPU). With
    `Spans` (packed or prefix-shared rows), the same per sequence (`attend_spans`). With a boolean
    mask (padding; a prefix-shared branch; any mask a caller builds, `anita.model.masks`), the CPU flash
    kernel takes the mask as it is. On CUDA FlashAttention takes no mask, so the kernel to run is the
    memory-efficient one (any mask, forward and backward, O(T) memory), not the math fallback that
    keeps the (B, H, T, S) weights; some torch versions' efficient kernel refuses grouped kv heads,
    so there k and v are expanded to H heads first: a (B, H, S, E) copy, small beside those weights.
    """
    if isinstance(mask, Spans):
        return attend_spans(q, k, v, mask)
    gqa = k.shape[1] != q.shape[1]
    if mask is not None and gqa and q.is_cuda:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, S, E)
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)


def attend_spans(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: Spans) -> torch.Tensor:
    """Attention of packed or prefix-shared rows without a (T, T) mask (varlen attention), equal to
    `attend` with `spans.mask(T)` (tests/model/test_masks.py). Per sequence of `spans`:

    - the shared part and its first branch (a whole SFT example; a pair's prompt + chosen) run SDPA's
      unmasked causal kernel on their own;
    - each further branch (rejected) attends to the shared part's keys and causally to its own: its
      queries against [shared; branch] keys with a (L, P + L) mask;
    - padding gets 0 (never used).

    The scores cost Σ (P + C)² / 2 + R·(P + R) per row instead of the (P + C + R)² a masked kernel
    computes. q (B, H, T, E), k and v (B, K, T, E) -> (B, H, T, E).

    On CUDA in bf16/fp16 the same attention is one FlashAttention varlen call (`anita.model.varlen`).
    """
    if flash_applies(q):
        return attend_varlen(q, k, v, spans)
    B, H, T, E = q.shape
    rows = []
    for b, row in enumerate(spans.rows):
        qb, kb, vb, parts = q[b:b + 1], k[b:b + 1], v[b:b + 1], []  # (1, ., T, E)
        for start, shared_end, *ends in row:
            first = ends[0] if ends else shared_end
            parts.append(attend(qb[:, :, start:first], kb[:, :, start:first], vb[:, :, start:first], None))
            for lo, hi in zip(ends, ends[1:]):  # the other branches
                keys = torch.cat([kb[:, :, start:shared_end], kb[:, :, lo:hi]], dim=2)  # (1, K, P + L, E)
                values = torch.cat([vb[:, :, start:shared_end], vb[:, :, lo:hi]], dim=2)
                parts.append(attend(qb[:, :, lo:hi], keys, values, branch_mask(shared_end - start, hi - lo, q.device)))
        end = row[-1][-1] if row else 0
        if end < T:
            parts.append(q.new_zeros(1, H, T - end, E))  # padding
        rows.append(torch.cat(parts, dim=2))  # (1, H, T, E)
    return torch.cat(rows)  # (B, H, T, E)


def branch_mask(P: int, L: int, device) -> torch.Tensor:
    """(1, 1, L, P + L) boolean: a branch's L queries see all P shared keys and, causally, its own."""
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(P + L, device=device)[None, :]
    return ((j < P) | (j - P <= i))[None, None]


# ------------------------------------------------------------------------------- blocks
class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        D, H, K, E = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.layer, self.H, self.K, self.E = layer, H, K, E
        self.q_proj = nn.Linear(D, H * E, bias=False)
        self.k_proj = nn.Linear(D, K * E, bias=False)
        self.v_proj = nn.Linear(D, K * E, bias=False)
        self.o_proj = nn.Linear(H * E, D, bias=False)
        self.fused = False  # q/k/v as one frozen matmul (`anita.model.fused`); the plain path otherwise

    def project_qkv(self, x):
        """q (B, T, H·E), k and v (B, T, K·E): three projections, or one fused frozen matmul."""
        layers = (self.q_proj, self.k_proj, self.v_proj)
        if self.fused and can_fuse(layers):
            return fused_projections(x, layers)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(B, T, self.H, self.E).transpose(1, 2)  # (B, H, T, E)
        k = k.view(B, T, self.K, self.E).transpose(1, 2)  # (B, K, T, E)
        v = v.view(B, T, self.K, self.E).transpose(1, 2)  # (B, K, T, E)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, K, S, E)
        y = attend(q, k, v, mask)  # (B, H, T, E)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.E))  # (B, T, D)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        D, Fh = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(D, Fh, bias=False)
        self.up_proj = nn.Linear(D, Fh, bias=False)
        self.down_proj = nn.Linear(Fh, D, bias=False)
        self.fused = False  # gate/up as one frozen matmul (`anita.model.fused`); the plain path otherwise

    def forward(self, x):
        layers = (self.gate_proj, self.up_proj)
        if self.fused and can_fuse(layers):
            gate, up = fused_projections(x, layers)  # (B, T, F) each
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)  # (B, T, F) each
        return self.down_proj(F.silu(gate) * up)  # (B, T, F) -> (B, T, D)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


def attention_mask_4d(attention_mask, T: int, S: int, device) -> torch.Tensor | None:
    """The boolean (B, 1, T, S) "may attend" mask: causal, minus padded keys.

    `attention_mask` is None (plain causal, left to SDPA's fast path), a (B, S) 0/1 padding mask
    over cache + new tokens, or a (B, T, S) boolean mask the caller built (e.g. block-diagonal
    for packed sequences; causality is still applied). Every query may attend to itself, so a
    padded query row is never fully masked (SDPA would return NaN); its output is never used.
    """
    if attention_mask is None and T == S:
        return None
    q_pos = torch.arange(S - T, S, device=device)[:, None]  # (T, 1) cache index of each query
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = (k_pos <= q_pos)[None]  # (1, T, S) causal
    if attention_mask is not None:
        m = attention_mask.to(device=device, dtype=torch.bool)
        allowed = allowed & (m[:, None, :] if m.dim() == 2 else m)  # (B, T, S)
    allowed = allowed | (k_pos == q_pos)[None]
    return allowed[:, None]  # (B, 1, T, S)


# -------------------------------------------------------------------------------- model
class LlamaModel(nn.Module):
    """Embeddings, the stack of blocks and the final norm (HF's `model.` prefix)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama(nn.Module):
    """A causal language model: `Llama(config)(input_ids)` returns next-token logits (B, T, V)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Non-persistent: recomputed from the config, never read from a checkpoint.
        self.register_buffer("rope_inv_freq", rope_inv_freq(config), persistent=False)
        self.checkpointing = "off"  # off, full or selective: what backward recomputes (anita.model.activation_checkpointing)
        # dtype of the output head's matmuls when the losses score tokens (`anita.model.logprobs.token_logps`);
        # None = fp32. forward() itself always applies lm_head as stored.
        self.head_dtype: torch.dtype | None = None

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        """The final-norm hidden states (B, T, D); the output head is left to the caller.

        attention_mask: None (causal), a (B, S) 0/1 padding mask, a (B, T, S) boolean mask
        (`attention_mask_4d`), or `Spans` for packed or prefix-shared rows (no mask: `attend_spans`)."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = rope_cos_sin(self.rope_inv_freq, position_ids, x.dtype)  # (B, T, E) each
        if isinstance(attention_mask, Spans):  # packed or shared-prompt rows: no mask, each sequence on its own
            if cache is not None:
                raise AnitaError("packed rows (Spans) cannot be decoded with a KV cache")
            mask = attention_mask
        else:
            mask = attention_mask_4d(attention_mask, T, past + T, x.device)  # (B, 1, T, S) or None
        for block in self.model.layers:
            if self.checkpointing != "off" and torch.is_grad_enabled() and cache is None:
                x = checkpoint_block(block, self.checkpointing, x, cos, sin, mask)
            else:
                x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)  # (B, T, D)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, cache))  # (B, T, V)

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> "Llama":
        """Random init as HF does (normal(0, std) linears/embeddings, ones for norms) — for tests."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("layernorm.weight") or name == "model.norm.weight":
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def _apply(self, fn, recurse=True):
        """`.to()`, `.cuda()`, `.half()` move the RoPE frequencies but never cast them: in bf16 they
        would be off by ~0.4%, several radians of phase by position 8k. Recomputed in fp32."""
        super()._apply(fn, recurse)
        self.rope_inv_freq = rope_inv_freq(self.config, device=self.rope_inv_freq.device)
        return self

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype
