"""The frozen 4-bit linear's matmul on CUDA: y = x Wᵀ (+ c), W dequantized into a reused buffer.

bitsandbytes' `matmul_4bit` (what `Linear4bit` runs on CPU) dequantizes W (O, I) into a fresh tensor
at every call, forward and backward. On CUDA `Linear4bit` runs `nf4_matmul` instead:

    forward   W = dequantize(codes) into the workspace     (O, I), bitsandbytes' CUDA kernel
              y = x Wᵀ, or addmm(c, x, Wᵀ) = c + x Wᵀ       (N, O), cuBLAS
    backward  W = dequantize(codes) into the workspace again
              grad_x = grad_y W                              (N, I), cuBLAS; grad_c = grad_y

Nothing of W is kept between forward and backward (the weight is frozen: only x and c get gradients,
and x Wᵀ needs no x for those), so a model holds only its 4-bit codes whatever its depth. The
workspace is one flat buffer per (device, dtype), as large as the largest weight, that every layer
dequantizes into in turn: kernels on one CUDA stream run in order, so a layer's GEMM has read the
buffer before the next layer's dequantization writes it. `c` is where LoRA's update, computed first
(`anita.lora.lean`), is added into the base output by the GEMM itself instead of a second (N, O)
tensor and an add.

Shapes: N tokens (any leading dims), I in features, O out features.
"""

from __future__ import annotations

import torch

_WORKSPACES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def workspace(device: torch.device, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
    """A (O, I) view of the shared buffer of `device` and `dtype`, grown when a larger weight asks."""
    key, numel = (torch.device(device), dtype), shape[0] * shape[1]
    buffer = _WORKSPACES.get(key)
    if buffer is None or buffer.numel() < numel:
        _WORKSPACES[key] = buffer = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


def nf4_matmul(x: torch.Tensor, layer, add: torch.Tensor | None = None) -> torch.Tensor:
    """x Wᵀ (+ add) for a loaded `Linear4bit` `layer`, x (.., I) and add (.., O) in its compute dtype."""
    return _NF4Matmul.apply(x, add, layer)


class _NF4Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, add, layer):
        w = layer.dequantize_into(workspace(x.device, x.dtype, (layer.out_features, layer.in_features)))  # (O, I)
        rows = x.reshape(-1, layer.in_features)  # (N, I)
        y = rows @ w.T if add is None else torch.addmm(add.reshape(-1, layer.out_features), rows, w.T)  # (N, O)
        ctx.layer, ctx.x_shape = layer, x.shape
        return y.view(*x.shape[:-1], layer.out_features)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        layer = ctx.layer
        grad_x = grad_add = None
        if ctx.needs_input_grad[0]:
            w = layer.dequantize_into(workspace(grad.device, grad.dtype, (layer.out_features, layer.in_features)))
            grad_x = (grad.reshape(-1, layer.out_features) @ w).view(ctx.x_shape)  # (N, I)
        if ctx.needs_input_grad[1]:
            grad_add = grad
        return grad_x, grad_add, None
