"""Linear4bit: y = x Ŵᵀ where Ŵ is the NF4 round trip of W (anita.quant.nf4, itself checked
against bitsandbytes in test_nf4.py). Both backends against that dense formula, gradients to
the input only, state_dict round trips, the empty meta layer filled by the loader hook, and
the error paths. Sizes: I = 128 inputs, O = 48 outputs, inputs (B=3, T=5, I).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anita.errors import AnitaError
from anita.quant import Linear4bit, NF4State, dequantize_nf4, quantize_nf4
from anita.quant.linear import import_bitsandbytes

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
needs_bnb = pytest.mark.skipif(import_bitsandbytes() is None, reason="bitsandbytes cannot be imported")


def _linear(I=128, O=48, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(I, O, bias=False).to(dtype)


def _x(I=128, seed=1):
    return torch.randn(3, 5, I, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("compute_dtype", DTYPES, ids=str)
def test_torch_backend_is_the_dense_formula(compute_dtype):
    """Ŵ = dequantize_nf4(quantize_nf4(W)) in compute dtype; y = F.linear(x, Ŵ) cast back to x's dtype."""
    linear = _linear()
    layer = Linear4bit.from_linear(linear, compute_dtype=compute_dtype, backend="torch")
    W_hat = dequantize_nf4(*quantize_nf4(linear.weight), dtype=compute_dtype)  # (O, I)
    assert torch.equal(layer.dequantize(), W_hat)
    x = _x()
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (3, 5, 48)
    assert torch.equal(y, F.linear(x.to(compute_dtype), W_hat).float())


@needs_bnb
@pytest.mark.parametrize("compute_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bnb_backend_equals_torch_backend_bit_for_bit(compute_dtype, weight_dtype):
    """bitsandbytes' matmul_4bit on CPU dequantizes to the compute dtype and calls F.linear:
    the same arithmetic as the torch backend, for a batch and for a single token (its gemv)."""
    linear = _linear(dtype=weight_dtype)
    a = Linear4bit.from_linear(linear, compute_dtype=compute_dtype, backend="torch")
    b = Linear4bit.from_linear(linear, compute_dtype=compute_dtype, backend="bnb")
    for x in (_x(), _x()[:1, :1]):
        assert torch.equal(a(x), b(x))


@needs_bnb
@pytest.mark.parametrize("backend", ["torch", "bnb"])
def test_gradients_flow_to_the_input_only(backend):
    """dL/dx = g Ŵ (the dense formula's gradient); the layer has no parameters to train."""
    layer = Linear4bit.from_linear(_linear(), compute_dtype=torch.float32, backend=backend)
    assert list(layer.parameters()) == []
    assert all(not b.requires_grad for b in layer.buffers())
    x, g = _x().requires_grad_(), torch.randn(3, 5, 48)
    (layer(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ layer.dequantize(), rtol=1e-6, atol=1e-6)


@needs_bnb
def test_bnb_backward_uses_the_weight_in_its_original_dtype():
    """bitsandbytes dequantizes to the weight's original dtype in backward (bf16 here) while the
    torch backend differentiates its own fp32 forward: the two gradients differ by bf16 rounding."""
    linear = _linear(dtype=torch.bfloat16)
    grads = []
    for backend in ("torch", "bnb"):
        layer = Linear4bit.from_linear(linear, compute_dtype=torch.float32, backend=backend)
        x = _x().requires_grad_()
        layer(x).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-2, atol=1e-2)


def test_output_follows_the_input_dtype():
    layer = Linear4bit.from_linear(_linear(), compute_dtype=torch.bfloat16, backend="torch")
    assert layer(_x().half()).dtype == torch.float16
    assert layer(_x().bfloat16()).dtype == torch.bfloat16


# ------------------------------------------------------------------- empty layer and loading
def test_empty_meta_layer_filled_by_the_loader_hook():
    """An empty layer's state_dict is what a checkpoint holds: `weight` (O, I) on meta. Filling it
    quantizes on the tensor's device and gives the same layer as from_linear."""
    linear = _linear()
    layer = Linear4bit(128, 48, compute_dtype=torch.float32, backend="torch", device="meta")
    sd = layer.state_dict()
    assert list(sd) == ["weight"] and sd["weight"].shape == (48, 128) and sd["weight"].is_meta
    assert not layer.is_loaded
    layer.load_checkpoint_tensor("weight", linear.weight.detach())
    assert layer.is_loaded and layer.weight.device.type == "cpu" and layer.weight.dtype == torch.uint8
    ref = Linear4bit.from_linear(linear, compute_dtype=torch.float32, backend="torch")
    assert torch.equal(layer(_x()), ref(_x()))


def test_the_nf4_state_is_one_object_beside_the_packed_weight():
    """A layer holds the packed codes (its one buffer), the NF4State that dequantizes them, and an
    explicit `is_loaded` flag. `.to(dtype)` moves the layer but never casts the state's fp32 scales;
    `nbytes` counts the codes and the state's tensors (the state_dict adds only the 4-int `meta`)."""
    layer = Linear4bit(128, 48, backend="torch")
    assert layer.is_loaded is False and layer.state is None
    with pytest.raises(AnitaError, match="no weight loaded yet"):
        layer.dequantize()
    layer.load_checkpoint_tensor("weight", _linear().weight.detach())
    assert layer.is_loaded is True and isinstance(layer.state, NF4State)
    assert [name for name, _ in layer.named_buffers()] == ["weight"]
    scales = layer.state.absmax_scale.clone()
    layer.to(torch.float16)
    assert layer.state.absmax_scale.dtype == torch.float32 and torch.equal(layer.state.absmax_scale, scales)
    assert layer.weight.dtype == torch.uint8
    saved = sum(t.numel() * t.element_size() for k, t in layer.state_dict().items() if k != "weight_meta")
    assert layer.nbytes() == saved == 48 * 128 // 2 + 96 + 16 * 4 + 4 + 4 + 256 * 4  # codes, absmax, code books, dq


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("assign", [False, True])
def test_state_dict_round_trip(double_quant, assign):
    """Saved buffers: packed weight + the NF4State fields; loading into an empty meta layer (or a
    filled one) reproduces the layer exactly."""
    src = Linear4bit.from_linear(_linear(), blocksize=128, double_quant=double_quant, backend="torch")
    sd = src.state_dict()
    expect = {"weight", "weight_absmax", "weight_code", "weight_meta"}
    expect |= {"weight_absmax_scale", "weight_absmax_offset", "weight_absmax_code"} if double_quant else set()
    assert set(sd) == expect
    for dst in (Linear4bit(128, 48, blocksize=128, double_quant=double_quant, backend="torch"),
                Linear4bit.from_linear(_linear(seed=5), blocksize=128, double_quant=double_quant, backend="torch")):
        dst.load_state_dict(sd, assign=assign)
        assert torch.equal(dst(_x()), src(_x()))
        assert (dst.weight.data_ptr() == src.weight.data_ptr()) == assign  # copied unless assign=True


def test_load_state_dict_with_a_full_precision_weight_quantizes_it():
    linear = _linear()
    layer = Linear4bit(128, 48, backend="torch")
    layer.load_state_dict({"weight": linear.weight.detach()})
    assert torch.equal(layer.weight, quantize_nf4(linear.weight)[0])


def test_load_state_dict_reports_missing_and_unexpected_keys():
    sd = Linear4bit.from_linear(_linear(), backend="torch").state_dict()
    layer = Linear4bit(128, 48, backend="torch")
    result = layer.load_state_dict(sd | {"extra": torch.zeros(1)}, strict=False)
    assert result.unexpected_keys == ["extra"] and result.missing_keys == []
    with pytest.raises(RuntimeError, match="Missing key"):
        Linear4bit(128, 48, backend="torch").load_state_dict({})


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("weight_absmax_scale"), "must all be present"),
    (lambda sd: sd.update(weight_absmax=sd["weight_absmax"][:-1]), "weight.absmax: expected 96"),
    (lambda sd: sd.update(weight=sd["weight"][:-1]), "weight: packed weight must hold 3072"),
    (lambda sd: sd.update(weight_meta=torch.tensor([64, 0, 48, 64])), "weight.absmax: expected 48"),
    (lambda sd: sd.update(Linear4bit.from_linear(_linear(I=64), backend="torch").state_dict()),
     "saved as shape (48, 64), blocksize 64, double_quant True; this layer expects (48, 128)"),
    (lambda sd: sd.update(weight_meta=torch.tensor([32, 0, 48, 128])), "blocksize 32"),
])
def test_corrupted_state_dict_names_the_field(change, message):
    sd = Linear4bit.from_linear(_linear(), backend="torch").state_dict()
    change(sd)
    with pytest.raises(AnitaError) as e:
        Linear4bit(128, 48, backend="torch").load_state_dict(sd)
    assert message in str(e.value)


def test_module_to_dtype_moves_but_never_casts_the_state():
    """`model.to(torch.bfloat16)` casts floating tensors; the NF4 scales must stay fp32."""
    layer = Linear4bit.from_linear(_linear(), compute_dtype=torch.float32, backend="torch")
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.to(torch.bfloat16).half().float()
    after = layer.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


# ----------------------------------------------------------------------------- backends
@needs_bnb
def test_backend_choice():
    """None picks bnb where bitsandbytes imports and its CPU kernel is exact (I a multiple of the
    blocksize); 64 inputs with blocksize 128 straddle rows, so None picks torch and bnb refuses."""
    assert Linear4bit(128, 48).backend == "bnb"
    assert Linear4bit(64, 48, blocksize=128).backend == "torch"
    layer = Linear4bit.from_linear(_linear(I=64), blocksize=128, backend="bnb")
    with pytest.raises(AnitaError, match="in_features \\(64\\) to be a multiple of blocksize \\(128\\)"):
        layer(_x(I=64))


# ------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("make, message", [
    (lambda: Linear4bit(0, 4), "positive ints"),
    (lambda: Linear4bit(64, 4, blocksize=100), "blocksize 100"),
    (lambda: Linear4bit(64, 4, compute_dtype=torch.float64), "compute_dtype: dtype torch.float64 is not supported"),
    (lambda: Linear4bit(64, 4, backend="cuda"), "backend 'cuda'"),
    (lambda: Linear4bit(64, 4, device="cpu"), "meta device"),
    (lambda: Linear4bit.from_linear(nn.Linear(64, 4)), "has a bias"),
    (lambda: Linear4bit.from_linear(nn.Conv1d(2, 2, 1)), "expected nn.Linear, got Conv1d"),
    (lambda: Linear4bit(64, 4, backend="torch").load_checkpoint_tensor("weight", torch.zeros(64, 4)),
     "weight has shape (64, 4), expected (4, 64)"),
    (lambda: Linear4bit(64, 4, backend="torch").load_checkpoint_tensor("bias", torch.zeros(4)), "no tensor 'bias'"),
    (lambda: Linear4bit(64, 4, backend="torch")(torch.zeros(1, 64)), "no weight loaded yet"),
    (lambda: Linear4bit(64, 4, backend="torch").dequantize(), "no weight loaded yet"),
    (lambda: Linear4bit.from_linear(_linear(I=64, O=4), backend="torch")(torch.zeros(1, 32)), "32 features"),
])
def test_bad_use_raises(make, message):
    with pytest.raises(AnitaError) as e:
        make()
    assert message in str(e.value)


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32])
def test_dequantize_for_matmul_is_bit_equal_to_dequantize(compute_dtype):
    """The fast dequantization (bitsandbytes' kernel, used by the fused projections) returns the same
    bits as anita's plain `dequantize` (value = code · absmax in fp32, rounded once)."""
    pytest.importorskip("bitsandbytes")
    linear = torch.nn.Linear(128, 96, bias=False)
    layer = Linear4bit.from_linear(linear, compute_dtype=compute_dtype, backend="bnb")
    assert torch.equal(layer.dequantize_for_matmul(), layer.dequantize())
    assert layer.dequantize_for_matmul().dtype == compute_dtype


@pytest.mark.parametrize("backend", ["torch", pytest.param("bnb", marks=needs_bnb)])
def test_held_as_parameters_the_layer_computes_and_saves_the_same(backend):
    """`hold_as_parameters` (for FSDP2, which shards parameters only): the packed codes and the block
    scales become frozen uint8 parameters, held once; forward, dequantize and the state_dict are
    those of the layer with buffers, bit for bit, and no gradient reaches them."""
    layer = Linear4bit.from_linear(_linear(), backend=backend)
    before, x = layer.state_dict(), _x().requires_grad_()
    y = layer(x)
    layer.hold_as_parameters()
    params = dict(layer.named_parameters())
    assert set(params) == {"weight", "absmax"} and not any(p.requires_grad for p in params.values())
    assert params["weight"].dtype == params["absmax"].dtype == torch.uint8 and layer.state.absmax is None
    assert list(layer.buffers()) == []
    after = layer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
    layer(x).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in params.values())
