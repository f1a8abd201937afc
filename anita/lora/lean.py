"""LoRA's update as one autograd node: the shortcut beside `LoraLinear.update`, the plain path.

The plain path writes the update the way the paper (and PEFT) does,

    y + (scale · B(A(x.to(adapter dtype)))).to(y.dtype)

and autograd records five nodes for it: the cast of x, A, B, the multiplication by the scale and the
cast back. Three of them touch a tensor as large as the layer's output (N, O) in fp32 — B's output,
its scaled copy, and in backward the scaled gradient — and A's node keeps its own fp32 copy of x
(N, I) for backward, once per projection, although q, k and v (and gate and up) read the same x.

`lora_delta` computes the same numbers with less of that work:

    forward   h = scale · (x Aᵀ)                              (N, R): the scale multiplies R columns, not O
              delta = (h Bᵀ).to(y's dtype)                    (N, O)
    backward  g = grad.to(compute dtype)                      (N, O), the one (N, O) cast
              grad_B = gᵀ h                                   (O, R)
              gh = scale · (g B)                              (N, R)
              grad_A = ghᵀ x                                  (R, I), x cast again, not kept in fp32
              grad_x = (gh A).to(x.dtype)                     (N, I)

with every matmul in the compute dtype: the adapter's (fp32), or autocast's (bf16 under `anita sft
--precision bf16`, as autocast runs the plain path's nn.Linear calls).

It keeps only x as it came (bf16 in the recipe, one tensor for every projection that reads it) and
h (N, R). Exactness: (scale·h)Bᵀ and scale·(hBᵀ) are the same product; they round alike when the
scale is a power of two (the recipe's 8/16 = 0.5) and differ in the last fp32 bit otherwise, before
the rounding to y's dtype that both paths do. tests/lora/test_lean.py holds outputs and gradients of
both paths equal, through a whole model and every checkpointing mode.

`forward` (what `LoraLinear.forward` runs here) computes the update *before* the base matmul (the plain path, like PEFT, runs
the base first). Nothing in backward needs a base projection's output (a frozen weight's input
gradient needs only the weight), and non-reentrant checkpointing stops recomputing a block as soon
as the last tensor backward needs is back. The last thing a Llama block saves is then down_proj's
LoRA input, so with full checkpointing the recomputation ends before down_proj's base GEMM: a
quarter of a block's projection FLOPs (per token 2·D·F of 2·D·(2·H·E + 2·K·E + 3·F); 1.8 M of 7.1 M
in SmolLM2), which the plain order recomputes for nothing.

It applies to plain LoRA (and rsLoRA: only the scale differs) without active dropout; DoRA and
dropout in training take the plain path (`applies`).

Shapes: N tokens (any leading dims), I in features, O out features, R rank.
"""

from __future__ import annotations

import torch
from torch import nn

from anita.quant import Linear4bit


def applies(layer) -> bool:
    """True when `layer.lean` is on and its update is plain LoRA: no DoRA magnitude, no dropout active."""
    dropout = layer.training and isinstance(layer.lora_dropout, nn.Dropout)
    return layer.lean and layer.lora_magnitude_vector is None and not dropout


def forward(layer, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` = base(x) + scale · B A x with the update first (see above), x (.., I) -> (.., O)."""
    delta = lora_delta(x, layer, x.dtype)  # (.., O)
    if isinstance(layer.base_layer, Linear4bit):
        return layer.base_layer(x, add=delta)  # on CUDA its GEMM adds the update in (anita.quant.matmul)
    y = layer.base_layer(x)
    return y + delta.to(y.dtype)  # a cast only under autocast, where a dense base computes in bf16


def lora_delta(x: torch.Tensor, layer, dtype: torch.dtype) -> torch.Tensor:
    """layer.scale · B A x in `dtype` (the base output's), as `LoraLinear.update` computes it. x (.., I)."""
    return _LoraDelta.apply(x, layer.lora_A.weight, layer.lora_B.weight, layer.scale, dtype)  # (.., O)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])  # (.., C) -> (N, C)


class _LoraDelta(torch.autograd.Function):
    """scale · (x Aᵀ) Bᵀ; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, x, a, b, scale, dtype):
        # x (.., I); a (R, I) and b (O, R) in the adapter's dtype; the matmuls in the adapter's dtype,
        # or in autocast's (bf16 under `anita sft --precision bf16`), as autocast runs nn.Linear
        device = x.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else a.dtype
        h = (x.to(compute) @ a.to(compute).T) * scale  # (.., R); not in place: selective checkpointing may keep it
        ctx.save_for_backward(x, a, b, h)
        ctx.scale = scale
        return (h @ b.to(compute).T).to(dtype)  # (.., O)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, a, b, h = ctx.saved_tensors
        compute = h.dtype  # the forward's matmul dtype
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        g = _rows(grad.to(compute))  # (N, O)
        grad_b = (g.T @ _rows(h)).to(b.dtype) if need_b else None  # (O, R)
        grad_x = grad_a = None
        if need_x or need_a:
            gh = (g @ b.to(compute)).mul_(ctx.scale)  # (N, R)
            if need_a:
                grad_a = (gh.T @ _rows(x).to(compute)).to(a.dtype)  # (R, I)
            if need_x:
                grad_x = (gh @ a.to(compute)).to(x.dtype).view(x.shape)  # (.., I)
        return grad_x, grad_a, grad_b, None, None
