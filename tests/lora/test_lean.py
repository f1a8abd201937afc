"""The lean LoRA update (anita/lora/lean.py) against the plain path beside it (`LoraLinear.add_adapter`
with `layer.lean = False`): outputs and gradients of x, A and B, on one layer (dense and NF4 bases,
fp32 and bf16 adapters, autocast) and through a whole QLoRA model with each checkpointing mode; and
what it keeps for backward.

With a power-of-two scale (the recipe's SFT adapter: 8/16 = 0.5) the two paths round alike, so they
are compared bit for bit; with rsLoRA's 6/√3 to fp32 rounding (the gradients of A and B sum over
tokens, so a last-bit difference in a term can show as ~1e-5 relative).
"""

import pytest
import torch
from torch import nn

from anita.lora import LoraConfig, LoraLinear, lora_layers, lora_parameters
from anita.quant import Linear4bit
from tests.conftest import tiny_lora_model


def _layer(nf4=False, **config):
    torch.manual_seed(0)
    base = nn.Linear(64, 48, bias=False).requires_grad_(False)
    if nf4:
        base = Linear4bit.from_linear(base, compute_dtype=torch.bfloat16)
    layer = LoraLinear(base, LoraConfig(**{"r": 4, "alpha": 2.0, **config}))
    with torch.no_grad():
        layer.lora_B.weight.normal_()  # B = 0 at init would hide an error in the update
    return layer


def _run(layer, x, g, lean):
    """Output and the gradients of x, A, B with the lean path on or off."""
    layer.lean = lean
    layer.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    (y.float() * g).sum().backward()
    return y.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad


def _uses_lean(layer, x) -> bool:
    """Whether layer(x)'s autograd graph holds the lean node."""
    seen, todo = set(), [layer(x.requires_grad_()).grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo += [next_node for next_node, _ in node.next_functions]
    return any(type(node).__name__ == "_LoraDeltaBackward" for node in seen)


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_outputs_and_gradients_equal_the_plain_path(nf4, dtype):
    layer = _layer(nf4, dtype=dtype)  # scale 2/4 = 0.5
    x_dtype = torch.bfloat16 if nf4 else torch.float32
    x, g = torch.randn(3, 5, 64).to(x_dtype), torch.randn(3, 5, 48)
    lean, plain = _run(layer, x, g, True), _run(layer, x, g, False)
    for got, expected in zip(lean, plain):
        assert got.dtype == expected.dtype
        assert torch.equal(got, expected)


def test_rslora_scale_agrees_to_rounding():
    layer = _layer(alpha=6.0, r=3, use_rslora=True)  # 6/√3: not a power of two
    x, g = torch.randn(2, 7, 64), torch.randn(2, 7, 48)
    for got, expected in zip(_run(layer, x, g, True), _run(layer, x, g, False)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=5e-5)  # sums of ~14 fp32 products


def test_autocast_bf16_agrees_with_the_plain_path():
    """`anita sft --precision bf16` runs the step under autocast: the lean node's backward runs under
    the same autocast, so its matmuls are bf16 like the plain path's and its gradients are fp32."""
    layer = _layer()
    x, g = torch.randn(2, 6, 64), torch.randn(2, 6, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean, plain = _run(layer, x, g, True), _run(layer, x, g, False)
    for got, expected in zip(lean, plain):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
    assert lean[2].dtype == lean[3].dtype == torch.float32


def test_plain_path_where_the_shortcut_does_not_apply():
    x = torch.randn(2, 3, 64)
    assert _uses_lean(_layer(), x)
    assert not _uses_lean(_layer(use_dora=True), x)  # DoRA's update needs the weight's norm
    dropped = _layer(dropout=0.1)
    assert not _uses_lean(dropped, x)  # dropout in training: the plain path draws the mask
    assert _uses_lean(dropped.eval(), x)  # no dropout in eval
    layer = _layer()
    layer.lean = False
    assert not _uses_lean(layer, x)


def _model_step(model, ids, lean):
    for layer in lora_layers(model).values():
        layer.lean = lean
    model.zero_grad()
    loss = model(ids).float().logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in lora_parameters(model)]


@pytest.mark.parametrize("mode", ["off", "full", "selective"])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_whole_qlora_model_equals_the_plain_path(mode, compute_dtype):
    """The loss bit for bit. The gradients to rounding: the lean layer runs its update before the
    base matmul, so in backward the six terms of a block input's gradient (q, k, v: base and
    update) arrive, and are summed, in another order."""
    model = tiny_lora_model(compute_dtype)  # scale 8/4 = 2, a power of two
    model.checkpointing = mode
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    (lean_loss, lean_grads), (loss, grads) = _model_step(model, ids, True), _model_step(model, ids, False)
    assert torch.equal(lean_loss, loss)
    tol = 1e-5 if compute_dtype == torch.float32 else 1e-3  # measured: 4e-7 and 3e-7 of the largest
    for got, expected in zip(lean_grads, grads):
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol * expected.abs().max().item())


def _saved_bytes(fn, modules) -> int:
    """Bytes of the distinct storages autograd keeps for backward while `fn` runs, not counting the
    modules' own parameters and buffers (kept by every path alike)."""
    own = {t.untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_keeps_the_shared_input_once_and_not_in_fp32():
    """q, k and v read one bf16 x (N = 128 tokens): the plain path keeps an fp32 copy of it per
    projection, the lean one keeps x itself, once for all three, and the three (N, R) fp32 products."""
    layers = [_layer(nf4=True) for _ in range(3)]
    x = torch.randn(4, 32, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = {}
    for lean in (True, False):
        for layer in layers:
            layer.lean = lean
        saved[lean] = _saved_bytes(lambda: [layer(x) for layer in layers], layers)
    x_bytes, products = x.numel() * 2, 3 * 128 * 4 * 4
    assert saved[True] == x_bytes + products
    assert saved[False] == 3 * 2 * x_bytes + products


def test_full_checkpointing_does_not_recompute_down_proj():
    """The update before the base matmul: full checkpointing's recomputation of a block stops before
    down_proj's NF4 GEMM (6 of 7 per block rerun); in the plain order it reruns all 7."""
    from tests.model.test_fast_paths import _backward_ops

    model = tiny_lora_model(torch.float32)
    reruns = {}
    for lean in (True, False):
        for layer in lora_layers(model).values():
            layer.lean = lean
        reruns[lean] = sum(op.startswith("gemm_4bit") for op in _backward_ops(model, "full"))
    assert reruns == {True: 12, False: 14}  # 2 blocks


def test_the_class_switch_turns_every_layer_to_the_textbook_line(monkeypatch):
    """`LoraLinear.lean = False` is the one switch: every layer then runs forward's plain line,
    base(x) + scale · B(A(x)), here checked against that sum computed by hand."""
    layers = [_layer(), _layer(alpha=6.0, r=3, use_rslora=True)]
    x = torch.randn(2, 5, 64)
    assert all(_uses_lean(layer, x) for layer in layers)
    monkeypatch.setattr(LoraLinear, "lean", False)
    for layer in layers:
        assert not _uses_lean(layer, x)
        by_hand = x @ layer.base_layer.weight.T + layer.scale * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
        torch.testing.assert_close(layer(x), by_hand)
