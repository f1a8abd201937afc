"""Tests for anita/quant/matmul.py, the CUDA path of `Linear4bit` (run here on CPU through the same
autograd function, with the weight copied into the workspace instead of bitsandbytes' CUDA kernel
writing it): x Ŵᵀ + c and its gradients against the dense formula, nothing of Ŵ saved for backward,
one buffer shared by layers of different shapes; on CUDA, against bitsandbytes' matmul_4bit."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anita.quant import Linear4bit
from anita.quant.linear import import_bitsandbytes
from anita.quant.matmul import nf4_matmul, workspace

needs_bnb = pytest.mark.skipif(import_bitsandbytes() is None, reason="bitsandbytes cannot be imported")


def layer(I=128, O=48, seed=0, dtype=torch.float32, backend="torch", device="cpu") -> Linear4bit:
    torch.manual_seed(seed)
    return Linear4bit.from_linear(nn.Linear(I, O, bias=False).to(device), compute_dtype=dtype, backend=backend)


@pytest.mark.parametrize("with_add", [False, True])
def test_nf4_matmul_is_the_dense_formula_forward_and_backward(with_add):
    """y = c + x Ŵᵀ, grad_x = grad_y Ŵ, grad_c = grad_y, with Ŵ = the layer's dequantized weight (fp32)."""
    lin = layer()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 128, generator=g, requires_grad=True)
    c = torch.randn(3, 5, 48, generator=g, requires_grad=True) if with_add else None
    grad = torch.randn(3, 5, 48, generator=g)
    w = lin.dequantize()  # (O, I)
    results = []
    for fn in (lambda: nf4_matmul(x, lin, c), lambda: F.linear(x, w) + (c if with_add else 0)):
        y = fn()
        inputs = (x, c) if with_add else (x,)
        results.append((y, *torch.autograd.grad(y, inputs, grad)))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_nothing_of_the_weight_is_kept_for_backward():
    """Autograd saves no tensor of W's size through the layer: backward dequantizes again."""
    lin, saved = layer(I=256, O=192), []
    x = torch.randn(2, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = nf4_matmul(x, lin, torch.zeros(2, 192, requires_grad=True))
    assert not [n for n in saved if n >= 256 * 192]
    held = [v for v in vars(y.grad_fn).values() if torch.is_tensor(v)]  # nor as an attribute of the node
    assert not [t for t in held if t.numel() >= 256 * 192]
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_layers_share_one_workspace_per_device_and_dtype():
    """A smaller weight is a view at the start of the same storage; a larger one grows it."""
    big = workspace(torch.device("cpu"), torch.float16, (64, 100))
    small = workspace(torch.device("cpu"), torch.float16, (10, 30))
    assert small.untyped_storage().data_ptr() == big.untyped_storage().data_ptr() and small.shape == (10, 30)
    assert workspace(torch.device("cpu"), torch.float32, (10, 30)).dtype == torch.float32  # its own buffer


@needs_bnb
@pytest.mark.parametrize("backend", ["bnb", "torch"])
def test_linear4bit_with_add_equals_the_plain_sum_on_cpu(backend):
    """`Linear4bit.forward(x, add=c)` is forward(x) + c (on CPU it adds after bitsandbytes' matmul_4bit)."""
    lin = layer(backend=backend, dtype=torch.bfloat16)
    x, c = torch.randn(4, 128), torch.randn(4, 48)
    assert torch.equal(lin(x, add=c), lin(x) + c)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@needs_bnb
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_nf4_matmul_against_bitsandbytes_matmul_4bit(dtype):
    """On CUDA `Linear4bit` (bnb backend) runs `nf4_matmul`: bitsandbytes' CUDA dequantization in place,
    cuBLAS GEMMs. Output and input gradient equal bitsandbytes' own matmul_4bit (the same dequantized
    weight, the same GEMM), and c + x Ŵᵀ through addmm equals the sum to rounding."""
    bnb = import_bitsandbytes()
    from anita.quant.linear import bnb_quant_state

    lin = layer(I=512, O=384, dtype=dtype, backend="bnb", device="cuda")
    x = torch.randn(64, 512, device="cuda", dtype=dtype, requires_grad=True)
    ours = lin(x)
    (g_ours,) = torch.autograd.grad(ours.float().square().sum(), x)
    theirs = bnb.matmul_4bit(x, lin.weight, quant_state=bnb_quant_state(lin.state, dtype))
    (g_theirs,) = torch.autograd.grad(theirs.float().square().sum(), x)
    assert torch.equal(ours, theirs)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-2, atol=1e-2)
    c = torch.randn(64, 384, device="cuda", dtype=dtype)
    torch.testing.assert_close(lin(x, add=c).float(), (ours + c).float(), rtol=2e-2, atol=2e-2)
