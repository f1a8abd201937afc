"""Varlen attention of packed and prefix-shared rows on CUDA: FlashAttention's variable-length kernel
(`torch.nn.attention.varlen.varlen_attn`, no Triton) over the rows' real tokens, with no mask.

`anita.model.llama.attend_spans` computes the attention `Spans` describe one sequence at a time
through SDPA (the CPU path, and CUDA in fp32, which FlashAttention does not take). Here the same
attention is one kernel call. Every query token and the keys it sees are gathered into flat lists
of sequences, `cu_seqlens` marking where each starts (Dao 2023, FlashAttention-2, "variable length"):

    per sequence of a row (start, shared_end, end_1, end_2, ...)
      queries [start, end_1)                  keys [start, end_1)                    shared + first branch
      queries [end_1, end_2)                  keys [start, shared_end) + [end_1, end_2)   a further branch
      ...

and attention is causal, aligned at the bottom right when a sequence has more keys than queries
(query i of L sees keys j <= i + P of P + L), which is exactly "the branch sees the whole shared part
and itself causally" (`anita.model.llama.branch_mask`). Padding is not gathered; its output is 0.

`varlen_reference` is the plain-PyTorch definition of the kernel's semantics; the tests hold
`attend_varlen` with it equal to the mask path on CPU (tests/model/test_varlen.py) and with the
kernel equal on CUDA (tests/test_cuda.py).

Shapes: B rows, T tokens per row, H query heads, K kv heads, E head dim, N gathered query tokens,
M gathered key tokens, S sequences.
"""

from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

import torch
import torch.nn.functional as F

from anita.model.masks import Spans

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # older torch: attend_spans' per-sequence SDPA everywhere
    varlen_attn = None

FLASH_DTYPES = (torch.float16, torch.bfloat16)  # what FlashAttention computes in
FLASH_MAX_HEAD_DIM = 256


class VarlenLayout(NamedTuple):
    """Where the gathered sequences come from: indices into the flattened (B·T) tokens."""

    q_index: torch.Tensor  # (N,) each real token once, in order
    k_index: torch.Tensor  # (M,) each sequence's keys: [shared; branch] for a further branch
    cu_q: torch.Tensor  # (S + 1,) int32, sequence starts in the query list
    cu_k: torch.Tensor  # (S + 1,) int32, sequence starts in the key list
    max_q: int
    max_k: int


@functools.lru_cache(maxsize=16)  # one layout per batch, read by every layer (and again in backward)
def varlen_layout(spans: Spans, T: int, device: torch.device) -> VarlenLayout:
    """The gathered query and key sequences of `spans` (rows of T tokens): see the module docstring."""
    q_parts, k_parts, q_lens, k_lens = [], [], [], []
    for b, row in enumerate(spans.rows):
        for start, shared_end, *ends in row:
            first = ends[0] if ends else shared_end
            pieces = [(start, first, [(start, first)])]  # (query lo, hi, key ranges)
            pieces += [(lo, hi, [(start, shared_end), (lo, hi)])
                       for lo, hi in zip(ends, ends[1:]) if hi > lo]  # an empty branch has no queries
            for lo, hi, key_ranges in pieces:
                q_parts.append(torch.arange(b * T + lo, b * T + hi))
                k_parts += [torch.arange(b * T + k0, b * T + k1) for k0, k1 in key_ranges]
                q_lens.append(hi - lo)
                k_lens.append(sum(k1 - k0 for k0, k1 in key_ranges))
    return VarlenLayout(torch.cat(q_parts).to(device), torch.cat(k_parts).to(device), _cu_seqlens(q_lens, device),
                        _cu_seqlens(k_lens, device), max(q_lens), max(k_lens))


def _cu_seqlens(lengths: list[int], device) -> torch.Tensor:
    """[0, l0, l0 + l1, ...] as the kernel takes it: int32 on the device. (S,) -> (S + 1,)"""
    return F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(device, torch.int32)


def varlen_reference(q, k, v, cu_q, cu_k, max_q: int, max_k: int) -> torch.Tensor:
    """What `varlen_attn` computes with causal attention, in plain PyTorch: sequence by sequence,
    softmax(q kᵀ / √E) v where query i of Lq sees key j of Lk when j <= i + Lk - Lq (bottom-right
    causal alignment); each group of H/K query heads shares a kv head. q (N, H, E), k and v (M, K, E)
    -> (N, H, E). max_q and max_k are only the kernel's bounds."""
    groups, dtype = q.shape[1] // k.shape[1], torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64
    out = []
    for n in range(len(cu_q) - 1):
        qs = q[cu_q[n]:cu_q[n + 1]].transpose(0, 1)  # (H, Lq, E)
        ks = k[cu_k[n]:cu_k[n + 1]].transpose(0, 1).repeat_interleave(groups, dim=0)  # (H, Lk, E)
        vs = v[cu_k[n]:cu_k[n + 1]].transpose(0, 1).repeat_interleave(groups, dim=0)
        Lq, Lk = qs.shape[1], ks.shape[1]
        sees = torch.arange(Lk, device=q.device)[None, :] <= torch.arange(Lq, device=q.device)[:, None] + Lk - Lq
        scores = (qs.to(dtype) @ ks.to(dtype).transpose(1, 2)) / q.shape[-1] ** 0.5  # (H, Lq, Lk)
        weights = scores.masked_fill(~sees, float("-inf")).softmax(-1)
        out.append((weights @ vs.to(dtype)).to(q.dtype).transpose(0, 1))  # (Lq, H, E)
    return torch.cat(out)  # (N, H, E)


def flash_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int) -> torch.Tensor:
    """`varlen_attn`, causal, across torch versions: 2.10 takes `is_causal`, 2.11 `window_size=(-1, 0)`;
    grouped kv heads are passed as they are where it takes `enable_gqa` (2.13), expanded otherwise."""
    params = _varlen_params()
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (M, H, E)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


@functools.cache
def _varlen_params() -> frozenset[str]:
    return frozenset(inspect.signature(varlen_attn).parameters)


def flash_applies(q: torch.Tensor) -> bool:
    """True where `attend_spans` runs FlashAttention's varlen kernel: CUDA, fp16/bf16, head dim <= 256."""
    return varlen_attn is not None and q.is_cuda and q.dtype in FLASH_DTYPES and q.shape[-1] <= FLASH_MAX_HEAD_DIM


def attend_varlen(q, k, v, spans: Spans, kernel=None) -> torch.Tensor:
    """The attention `Spans` describe as one varlen call of `kernel` (default `flash_varlen`; the tests
    pass `varlen_reference`): q (B, H, T, E), k and v (B, K, T, E) -> (B, H, T, E)."""
    kernel = kernel or flash_varlen
    B, H, T, E = q.shape
    layout = varlen_layout(spans, T, q.device)
    qf, kf, vf = (t.transpose(1, 2).reshape(B * T, t.shape[1], E) for t in (q, k, v))  # (B·T, ., E)
    y = kernel(qf[layout.q_index], kf[layout.k_index], vf[layout.k_index],
               layout.cu_q, layout.cu_k, layout.max_q, layout.max_k)  # (N, H, E)
    out = q.new_zeros(B * T, H, E).index_copy(0, layout.q_index, y)  # padding stays 0
    return out.view(B, T, H, E).transpose(1, 2)  # (B, H, T, E)
