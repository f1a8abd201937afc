"""Fused frozen projections: q/k/v (and gate/up) of a block as ONE matmul over their concatenated
frozen base weights, with each projection's LoRA update added to its slice of the output.

The plain path (`Attention.forward`, `MLP.forward` in `anita.model.llama`) calls each projection on
the same input; this is the shortcut beside it, switched on with `set_fused_projections(model)`.
Nothing is stored fused: parameter names, state_dict keys and adapter files stay Hugging Face's and
PEFT's. At each call the frozen weights are concatenated (NF4 bases are dequantized one by one with
bitsandbytes' kernel, into exactly the bits their own `forward` uses) into W (O1+O2+.., I), one GEMM
runs, and W is rebuilt again in backward for the input gradient instead of being kept: the memory of
the unfused NF4 path. Quantizing the fused weight instead would change double quantization's
second-level statistics (one mean over all three absmax vectors), so it would not equal the
per-projection checkpoint bit for bit.

What it saves: one read of x and one GEMM launch instead of three (k/v's narrow GEMMs, O = K·E, run
far below peak on CPU), and in backward one input-gradient GEMM instead of three GEMMs and two adds.

Exactness: each output element is the same dot product over the same I inputs as in the unfused
GEMM, but a BLAS library may split I differently for a different O, so outputs agree to rounding
(bit-equal on this CPU's oneDNN in the tests); the input gradient sums the three projections' terms
inside one GEMM instead of adding three rounded results, so it agrees to rounding of the compute
dtype. Tests: tests/model/test_fast_paths.py.

Shapes: B batch, T time, I in features (D), O out features of one projection, ΣO of all of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anita.quant import Linear4bit


def base_of(layer: nn.Module) -> nn.Module:
    """The frozen base of a projection: the layer itself, or a LoRA wrapper's `base_layer`."""
    return getattr(layer, "base_layer", layer)


def can_fuse(layers) -> bool:
    """True when every projection is a frozen, bias-free base of one kind and dtype (all NF4 with the
    same compute dtype, or all dense with the same dtype), bare or wrapped by a LoRA layer that can add
    its update to a given base output (`add_adapter`)."""
    bases = [base_of(layer) for layer in layers]
    wrapped_ok = all(layer is base or hasattr(layer, "add_adapter") for layer, base in zip(layers, bases))
    if not wrapped_ok or len({b.in_features for b in bases}) != 1:
        return False
    if all(isinstance(b, Linear4bit) and b.is_loaded for b in bases):
        return len({(b.compute_dtype, b.weight.device) for b in bases}) == 1
    if all(type(b) is nn.Linear and b.bias is None and not b.weight.requires_grad for b in bases):
        return len({(b.weight.dtype, b.weight.device) for b in bases}) == 1
    return False


def frozen_weight(bases) -> torch.Tensor:
    """The concatenated base weights (ΣO, I) in the dtype the bases compute in; no gradient."""
    with torch.no_grad():
        parts = [b.dequantize_for_matmul() if isinstance(b, Linear4bit) else b.weight for b in bases]
        return torch.cat(parts)  # (ΣO, I)


class _FrozenMatmul(torch.autograd.Function):
    """y = x Wᵀ for the frozen concatenated W, rebuilt in backward rather than saved."""

    @staticmethod
    def forward(ctx, x, bases):
        ctx.bases = bases
        return F.linear(x, frozen_weight(bases))  # (B, T, I) -> (B, T, ΣO)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        return grad_y @ frozen_weight(ctx.bases), None  # (B, T, ΣO) @ (ΣO, I) -> (B, T, I)


def fused_projections(x: torch.Tensor, layers) -> tuple[torch.Tensor, ...]:
    """(layer(x) for layer in layers), computed with one frozen GEMM; x (B, T, I) -> (B, T, O) each."""
    bases = [base_of(layer) for layer in layers]
    first = bases[0]
    dtype = first.compute_dtype if isinstance(first, Linear4bit) else first.weight.dtype
    y = _FrozenMatmul.apply(x.to(dtype), bases).to(x.dtype)  # (B, T, ΣO)
    outs = y.split([b.out_features for b in bases], dim=-1)  # (B, T, O) each
    return tuple(out if layer is base else layer.add_adapter(x, out)
                 for layer, base, out in zip(layers, bases, outs))


def set_fused_projections(model: nn.Module, on: bool = True) -> int:
    """Ask every block of `model` for the fused q/k/v and gate/up path (or the plain one); returns how
    many blocks fuse now. Checked again at each forward (`can_fuse`), so LoRA may be applied before
    or after; projections that cannot fuse (e.g. a trainable dense base) keep the plain path."""
    fused = 0
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        attn.fused = mlp.fused = on
        fused += on and can_fuse((attn.q_proj, attn.k_proj, attn.v_proj)) and can_fuse((mlp.gate_proj, mlp.up_proj))
    return fused
