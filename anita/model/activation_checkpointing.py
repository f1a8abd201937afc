"""Activation checkpointing: what a Llama block recomputes in backward instead of keeping.

`Llama.checkpointing` names the mode and `Llama.hidden_states` runs each block through
`checkpoint_block` when it is not "off" (and gradients are on, with no KV cache):
  off        every activation is kept (the most memory, no recomputation)
  full       each block keeps only its input and reruns its whole forward in backward
  selective  the outputs of the projection GEMMs and of attention are kept (`keep_projections`); the
             cheap element-wise work is recomputed
All three give bit-equal losses and gradients (tests/model/test_fast_paths.py), so a run may change
mode on --resume. Built on `torch.utils.checkpoint` (non-reentrant) and its selective policies
(`create_selective_checkpoint_contexts`, PyTorch 2.4+); Chen et al. 2016, "Training Deep Nets with
Sublinear Memory Cost" (arXiv 1604.06174). Not to be confused with `anita.model.checkpoint`, which
reads and writes checkpoint files.

Shapes: B batch, T time, D model dim.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

CHECKPOINTING = ("off", "full", "selective")
# Ops whose outputs selective checkpointing keeps: the matmuls (the frozen NF4 projections: dequantize
# + GEMM) and attention (the FLOPs that grow with T²), on CPU and CUDA.
_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
_ATTENTION = {getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    if hasattr(torch.ops.aten, name)}
# Ops kept, matched by name (no import): bitsandbytes' fused dequantize + GEMM (its CPU path for 4-bit
# weights; on CUDA `anita.quant.matmul` runs dequantize + mm instead) and FlashAttention's varlen op
# (CUDA, `anita.model.varlen`).
_KEPT_BY_NAME = {"bitsandbytes::gemm_4bit", "bitsandbytes::gemv_4bit", "torch_attn::_varlen_attn"}


def keep_projections(min_inner: int):
    """The selective policy: keep an attention output, and a matmul output whose inner dimension is
    at least `min_inner` (the projections: D, H·E or F); recompute everything else in backward, the
    cheap element-wise work (RMSNorm, RoPE, SiLU·up, casts, residual adds, the NF4 dequantization)
    and LoRA's rank-R second matmul (R ≪ D: 2·R FLOPs per element, cheaper than keeping it)."""
    def policy(ctx, op, *args, **kwargs):
        if op in _ATTENTION or op.name() in _KEPT_BY_NAME:
            return CheckpointPolicy.MUST_SAVE
        if op in _MATMULS and (args[1] if op is torch.ops.aten.addmm.default else args[0]).shape[-1] >= min_inner:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE
    return policy


def checkpoint_block(block: nn.Module, mode: str, x, cos, sin, mask) -> torch.Tensor:
    """block(x) whose activations are recomputed in backward: all of them ("full": only x is kept),
    or only the cheap ones ("selective", `keep_projections`: the GEMM and attention outputs are kept)."""
    if mode == "full":
        return checkpoint(block, x, cos, sin, mask, use_reentrant=False)
    if mode != "selective":
        raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {mode!r}")
    policy = keep_projections(min_inner=max(1, x.shape[-1] // 4))  # D/4: above any LoRA rank in use
    return checkpoint(block, x, cos, sin, mask, use_reentrant=False,
                      context_fn=lambda: create_selective_checkpoint_contexts(policy))
