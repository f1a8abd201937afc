"""The LoRA layer against its dense formulas: y = (W + s·B·A) x, s = alpha/r or alpha/√r (rsLoRA),
and DoRA's y = m/||W + s·B·A||_row · (W + s·B·A) x; gradients by autograd on the dense form.

Sizes: I = 6 inputs, O = 5 outputs, R = 3, inputs (B=2, T=4, I).
"""

import math

import pytest
import torch
from torch import nn

from anita.errors import AnitaError
from anita.lora import LoraConfig, LoraLinear


def _layer(seed=0, I=6, O=5, **config):
    """A LoRA layer over a random linear, with B random so that the update is not zero."""
    torch.manual_seed(seed)
    base = nn.Linear(I, O, bias=False).requires_grad_(False)
    layer = LoraLinear(base, LoraConfig(**{"r": 3, "alpha": 6.0, **config}))
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return layer


def _dense(layer):
    """Leaf copies of W, A, B (and m) for the dense formulation."""
    W = layer.base_layer.weight.detach().clone()
    A = layer.lora_A.weight.detach().clone().requires_grad_()
    B = layer.lora_B.weight.detach().clone().requires_grad_()
    return W, A, B


@pytest.mark.parametrize("use_rslora", [False, True])
def test_output_and_gradients_equal_the_dense_formulation(use_rslora):
    """s = 6/3 = 2 (plain) or 6/√3 (rsLoRA); grads of A and B from autograd on x (W + s·B·A)ᵀ."""
    layer = _layer(use_rslora=use_rslora)
    s = 6 / math.sqrt(3) if use_rslora else 2.0
    assert layer.scale == pytest.approx(s)
    x, g = torch.randn(2, 4, 6), torch.randn(2, 4, 5)
    y = layer(x)
    (y * g).sum().backward()
    W, A, B = _dense(layer)
    y_dense = x @ (W + s * B @ A).T  # (2, 4, 5)
    (y_dense * g).sum().backward()
    torch.testing.assert_close(y, y_dense, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.lora_A.weight.grad, A.grad, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(layer.lora_B.weight.grad, B.grad, atol=1e-5, rtol=1e-6)
    assert layer.base_layer.weight.grad is None


def test_rslora_scale_for_the_recipe_dpo_settings():
    """The recipe's DPO adapter, r=64 alpha=16: rsLoRA 16/√64 = 2, plain LoRA 16/64 = 0.25."""
    assert LoraConfig(r=64, alpha=16, use_rslora=True).scale == 2.0
    assert LoraConfig(r=64, alpha=16).scale == 0.25
    assert LoraConfig(r=16, alpha=8).scale == 0.5  # the SFT adapter


def test_kaiming_init_bounds_and_zero_b_make_the_layer_equal_the_base():
    """Kaiming-uniform with a=√5: gain √(2/(1+5)), bound gain·√(3/I) = 1/√I (= nn.Linear's init)."""
    torch.manual_seed(0)
    base = nn.Linear(400, 7, bias=False)
    layer = LoraLinear(base, LoraConfig(r=8))
    A = layer.lora_A.weight
    assert A.abs().max() <= 1 / math.sqrt(400)
    assert A.abs().max() > 0.95 / math.sqrt(400)  # uniform over the whole range, not narrower
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    x = torch.randn(3, 400)
    assert torch.equal(layer(x), base(x))


def test_gaussian_init_has_std_one_over_r():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(4000, 3, bias=False), LoraConfig(r=4, init="gaussian"))
    assert layer.lora_A.weight.std().item() == pytest.approx(1 / 4, rel=0.03)
    assert layer.lora_A.weight.mean().abs() < 0.01
    assert torch.count_nonzero(layer.lora_B.weight) == 0


def test_bf16_adapter_over_fp32_base():
    """Adapter weights in bf16, base in fp32: the output stays fp32, the update computed in bf16."""
    layer = _layer(dtype="bfloat16")
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.bfloat16
    x = torch.randn(2, 4, 6)
    y = layer(x)
    assert y.dtype == torch.float32
    A, B = layer.lora_A.weight, layer.lora_B.weight
    expected = layer.base_layer(x) + (2.0 * ((x.bfloat16() @ A.T) @ B.T)).float()
    torch.testing.assert_close(y, expected, atol=0, rtol=0)


def test_disabled_layer_is_exactly_the_base():
    layer = _layer()
    x = torch.randn(2, 4, 6)
    assert not torch.equal(layer(x), layer.base_layer(x))
    layer.disabled = True
    assert torch.equal(layer(x), layer.base_layer(x))


def test_dropout_only_touches_the_adapter_path():
    """In training, y = W x + s·B·A·drop(x): with the same mask drawn, it equals the dense form."""
    layer = _layer(dropout=0.5).train()
    x = torch.randn(2, 4, 6)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    W, A, B = _dense(layer)
    torch.testing.assert_close(y, x @ W.T + 2.0 * dropped @ (B @ A).T, atol=1e-6, rtol=1e-6)
    layer.eval()
    torch.testing.assert_close(layer(x), x @ (W + 2.0 * B @ A).T, atol=1e-6, rtol=1e-6)


def test_dora_starts_at_the_base_and_follows_eq5():
    """DoRA (Liu et al. Eq. 5): m initialised to ||W||_row (B=0), then y = m/||W'||_row · W' x with
    W' = W + s·B·A; the norm is detached (§4.3), so grads match the dense form with a constant norm."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5, bias=False).requires_grad_(False)
    layer = LoraLinear(base, LoraConfig(r=3, alpha=6.0, use_dora=True))
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(), base.weight.norm(dim=1))
    x, g = torch.randn(2, 4, 6), torch.randn(2, 4, 5)
    torch.testing.assert_close(layer(x), base(x), atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 5))
    y = layer(x)
    (y * g).sum().backward()
    W, A, B = _dense(layer)
    m = layer.lora_magnitude_vector.detach().clone().requires_grad_()
    Wp = W + 2.0 * B @ A  # (O, I)
    y_dense = x @ ((m / Wp.norm(dim=1).detach())[:, None] * Wp).T
    (y_dense * g).sum().backward()
    torch.testing.assert_close(y, y_dense, atol=1e-5, rtol=1e-5)
    for got, want in [(layer.lora_A.weight.grad, A.grad), (layer.lora_B.weight.grad, B.grad),
                      (layer.lora_magnitude_vector.grad, m.grad)]:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_merged_weight_is_the_function_the_layer_computes():
    for config in [dict(), dict(use_dora=True, use_rslora=True)]:
        layer = _layer(**config)
        x = torch.randn(2, 4, 6)
        torch.testing.assert_close(x @ layer.merged_weight().T, layer(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("r", 0, "r must be a positive integer"),
    ("r", 2.5, "r must be a positive integer"),
    ("alpha", -1, "alpha must be a finite number > 0"),
    ("alpha", float("nan"), "alpha must be a finite number > 0, got nan"),  # passed `alpha <= 0` (issue 18)
    ("alpha", float("inf"), "alpha must be a finite number > 0, got inf"),
    ("alpha", True, "alpha must be a finite number"),
    ("dropout", 1.0, r"dropout must be a finite number in \[0, 1\)"),
    ("dropout", float("nan"), r"dropout must be a finite number in \[0, 1\)"),
    ("init", "pissa", "init must be one of"),
    ("dtype", torch.float16, "float32 or bfloat16"),
    ("dtype", "int8", "float32 or bfloat16"),
    ("target_modules", "q_proj", "expected a list of module names or 'all-linear'"),
    ("target_modules", [], "non-empty list"),
])
def test_bad_config_values_are_named(field, value, message):
    with pytest.raises(AnitaError, match=message) as error:
        LoraConfig(**{field: value})
    assert f"LoraConfig.{field}" in str(error.value)


def test_only_linears_can_be_wrapped():
    with pytest.raises(AnitaError, match="got Embedding"):
        LoraLinear(nn.Embedding(4, 4), LoraConfig())
