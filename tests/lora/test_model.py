"""LoRA on a whole model: targets, freezing and the parameter report, disable_lora, activation
checkpointing, merge, and the adapter state dict. Tiny Llama (D=64, F=128, H=4, K=2, E=16, 2 layers)."""

import pytest
import torch
from torch import nn

from anita.errors import AnitaError
from anita.lora import (LoraConfig, LoraLinear, apply_lora, disable_lora, load_lora_state_dict, lora_layers,
                        lora_parameters, lora_state_dict, merge_lora)
from anita.lora.model import count_parameters
from tests.conftest import tiny_model

X = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])


def _randomize_adapters(model, seed=1):
    """A redrawn from a seeded generator (as its Kaiming init, ±1/√I), B (and DoRA's m) away from
    their init, so that the adapter changes the output the same way whatever ran before."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            bound = layer.in_features ** -0.5
            layer.lora_A.weight.copy_((torch.rand(layer.lora_A.weight.shape, generator=gen) * 2 - 1) * bound)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.05)
            if layer.lora_magnitude_vector is not None:
                layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(layer.out_features, generator=gen))


def test_default_targets_freeze_and_report():
    """Per layer the seven projections (in -> out) are q 64->64, k 64->32, v 64->32, o 64->64,
    gate/up 64->128, down 128->64: r·Σ(in+out) = 1024·r LoRA parameters, 8192 for r=4 and 2 layers.
    Base: embeddings and lm_head 2·256·64 = 32768, per layer 36864 linear + 128 norm, final norm
    64: 106816 in all (PEFT's print_trainable_parameters gives the same on this model)."""
    model = tiny_model("llama3")
    report = apply_lora(model, LoraConfig(r=4))
    assert len(report.wrapped) == 14 and "lm_head" not in report.wrapped
    assert report.wrapped[0] == "model.layers.0.self_attn.q_proj"
    assert (report.trainable, report.total) == (8192, 106816 + 8192)
    assert "trainable params 8,192 || all params 115,008" in str(report)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert len(lora_parameters(model)) == 28


def test_all_linear_skips_lm_head_and_dora_adds_magnitudes():
    """DoRA adds one magnitude per output row: 64+32+32+64+128+128+64 = 512 per layer."""
    model = tiny_model("llama3")
    report = apply_lora(model, LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    assert len(report.wrapped) == 14 and isinstance(model.lm_head, nn.Linear)
    assert report.trainable == 8192 + 2 * 512


def test_lm_head_can_be_targeted_by_name_unless_tied():
    model = tiny_model("llama3")
    assert apply_lora(model, LoraConfig(target_modules=["lm_head"])).wrapped == ["lm_head"]
    tied = tiny_model("llama3.2")
    with pytest.raises(AnitaError, match="tie_word_embeddings"):
        apply_lora(tied, LoraConfig(target_modules=["q_proj", "lm_head"]))
    assert not lora_layers(tied)


@pytest.mark.parametrize("targets, message", [
    (["q_proj", "qkv_proj"], "'qkv_proj' matches no module of this model; its linears are named"),
    (["mlp"], "'mlp' selects 'model.layers.0.mlp', a MLP, not a linear"),
])
def test_bad_targets_leave_the_model_untouched(targets, message):
    model = tiny_model("llama3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AnitaError, match=message):
        apply_lora(model, LoraConfig(target_modules=targets))
    assert not lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_second_apply_is_refused():
    model = tiny_model("llama3")
    apply_lora(model, LoraConfig())
    with pytest.raises(AnitaError, match="already has LoRA layers"):
        apply_lora(model, LoraConfig(target_modules=["lm_head"]))


@torch.no_grad()
def test_wrapped_model_starts_equal_and_disable_gives_exactly_the_base():
    """B = 0: the freshly wrapped model equals the base bit for bit (DPO's step-0 reference)."""
    model = tiny_model("llama3.1")
    base = model(X)
    apply_lora(model, LoraConfig(r=4, use_dora=True))
    assert torch.equal(model(X), base)
    _randomize_adapters(model)
    adapted = model(X)
    assert (adapted - base).abs().max() > 1e-3
    with disable_lora(model):
        assert torch.equal(model(X), base)
    assert torch.equal(model(X), adapted)


def test_disable_restores_each_layers_previous_flag_even_on_error():
    model = tiny_model("llama3")
    apply_lora(model, LoraConfig())
    q = model.model.layers[0].self_attn.q_proj
    q.disabled = True  # switched off by hand before: must stay off afterwards
    with pytest.raises(RuntimeError, match="boom"):
        with disable_lora(model):
            assert all(layer.disabled for layer in lora_layers(model).values())
            raise RuntimeError("boom")
    assert [layer.disabled for layer in lora_layers(model).values()] == [True] + [False] * 13


def _lora_grads(model, checkpointing):
    model.zero_grad()
    model.checkpointing = "full" if checkpointing else "off"
    logits = model(X)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), X[:, 1:].reshape(-1)).backward()
    return [p.grad.clone() for p in lora_parameters(model)]


@pytest.mark.parametrize("variant, config", [
    ("llama3", dict(r=4, alpha=8)),
    ("llama3.1", dict(r=4, alpha=8, use_rslora=True, dropout=0.1, target_modules="all-linear")),
    ("llama3.2", dict(r=2, alpha=4, use_dora=True)),
])
@torch.no_grad()
def test_merge_gives_plain_linears_with_the_same_logits(variant, config):
    model = tiny_model(variant)
    apply_lora(model, LoraConfig(**config))
    _randomize_adapters(model)
    expected = model(X)
    merge_lora(model)
    assert not lora_layers(model)
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    assert model.model.layers[1].mlp.down_proj.weight.dtype == torch.float32
    torch.testing.assert_close(model(X), expected, atol=1e-5, rtol=0)
    if variant == "llama3.2":
        assert model.lm_head.weight is model.model.embed_tokens.weight


@torch.no_grad()
def test_merge_into_a_bf16_base_casts_once():
    """A bf16 base: the update is added in fp32 and the sum rounded to bf16 once."""
    model = tiny_model("llama3").to(torch.bfloat16)
    apply_lora(model, LoraConfig(r=4))
    _randomize_adapters(model)
    layer = model.model.layers[0].self_attn.q_proj
    expected = (layer.base_layer.weight.float() + layer.delta_weight()).bfloat16()
    merge_lora(model)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, expected)


def test_lora_state_dict_round_trip_and_shape_check():
    model = tiny_model("llama3")
    apply_lora(model, LoraConfig(r=4, use_dora=True))
    _randomize_adapters(model)
    state = lora_state_dict(model)
    assert len(state) == 14 * 3
    assert "model.layers.1.mlp.up_proj.lora_magnitude_vector" in state
    other = tiny_model("llama3")
    apply_lora(other, LoraConfig(r=4, use_dora=True))
    load_lora_state_dict(other, state)
    for k, v in lora_state_dict(other).items():
        assert torch.equal(v, state[k]), k
    bad = dict(state) | {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(5, 64)}
    with pytest.raises(AnitaError, match=r"q_proj.lora_A.weight' has shape \(5, 64\), expected \(4, 64\)"):
        load_lora_state_dict(other, bad)
    with pytest.raises(AnitaError, match="missing"):
        load_lora_state_dict(other, {})


def test_lora_layer_is_a_drop_in_linear():
    model = tiny_model("llama3")
    apply_lora(model, LoraConfig(target_modules=["gate_proj"]))
    layer = model.model.layers[0].mlp.gate_proj
    assert isinstance(layer, LoraLinear) and (layer.in_features, layer.out_features) == (64, 128)
    assert not layer.training  # wrapped in the model's (eval) mode, so dropout stays off
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)


# --------------------------------------------------------------------------- NF4 base (QLoRA)
def _qlora(variant="llama3", double_quant=True, compute_dtype=torch.float32, **config):
    from anita.quant import quantize_model

    model = tiny_model(variant)
    quantize_model(model, double_quant=double_quant, compute_dtype=compute_dtype)
    apply_lora(model, LoraConfig(**({"r": 4, "alpha": 8} | config)))
    return model


@torch.no_grad()
def test_lora_over_nf4_is_the_dense_formula_on_the_dequantized_weight():
    """Over a 4-bit base, y = base(x) + s·B·A x with the adapter in its own dtype (bf16 here),
    and the report counts a 4-bit weight as its O·I elements (same total as the fp32 model)."""
    from anita.quant import Linear4bit

    model = _qlora(dtype="bfloat16", use_dora=False)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer.base_layer, Linear4bit) and layer.lora_A.weight.dtype == torch.bfloat16
    _randomize_adapters(model)
    x = torch.randn(2, 3, 128)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    expected = layer.base_layer(x) + (2.0 * ((x.bfloat16() @ A.T) @ B.T)).float()
    torch.testing.assert_close(layer(x), expected, atol=0, rtol=0)
    report = apply_lora(tiny_model("llama3"), LoraConfig(r=4))
    assert count_parameters(model) == report.total


@torch.no_grad()
def test_dora_over_nf4_starts_exactly_at_the_base():
    """m is initialised to the row norms of the dequantized weight, so m/||W|| = 1 exactly."""
    model = _qlora(use_dora=True)
    layer = model.model.layers[1].self_attn.k_proj
    torch.testing.assert_close(layer.lora_magnitude_vector, layer.base_layer.dequantize(torch.float32).norm(dim=1))
    x = torch.randn(2, 3, 64)
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("base", ["fp32", "nf4"])
def test_lora_gets_gradients_under_activation_checkpointing(base):
    """With every block checkpointed and the embeddings frozen (so no block input requires grad),
    the LoRA parameters still get the same gradients as without checkpointing — over a full
    precision base and over the recipe's NF4 base (QLoRA)."""
    model = (tiny_model("llama3.1") if base == "fp32" else _qlora("llama3.1", use_dora=True)).train()
    if base == "fp32":
        apply_lora(model, LoraConfig(r=4, use_dora=True))
    _randomize_adapters(model)
    plain = _lora_grads(model, False)
    checkpointed = _lora_grads(model, True)
    assert all(g.abs().sum() > 0 for g in checkpointed)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)


@pytest.mark.parametrize("double_quant", [False, True])
@torch.no_grad()
def test_nf4_merge_costs_one_nf4_rounding(double_quant):
    """Merging into NF4 re-quantizes W' = deq(W) + s·B·A. Per element, the error is at most half
    the widest gap of the NF4 code book (0.1519, between -1 and -0.6962) times the block's absmax a,
    plus |a' - a| where a' is the stored (8-bit, with double quantization) absmax: the value is
    rounded to code·a, then a is replaced by a'. On the logits this costs what quantizing the
    adapted model from full precision costs (the same adapter merged into the fp32 base, then
    quantized). Measured here: element error up to 0.152·a (0.155·a with double quantization),
    9.4% relative Frobenius error per weight, logits (up to 0.63) moved by 0.114 vs 0.112 for
    quantizing the adapted model (0.115 vs 0.112 with double quantization)."""
    from anita.quant import Linear4bit, nf4_code, quantize_model
    from anita.quant.nf4 import dequantize_absmax

    model = _qlora(double_quant=double_quant)
    _randomize_adapters(model)
    exact = {name: layer.merged_weight() for name, layer in lora_layers(model).items()}  # (O, I) fp32
    unmerged = model(X)
    merge_lora(model)
    half_gap = ((nf4_code()[1:] - nf4_code()[:-1]) / 2).max()
    assert half_gap == pytest.approx(0.1519, abs=1e-4)
    for name, w in exact.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, Linear4bit) and (layer.blocksize, layer.double_quant) == (64, double_quant)
        a = w.reshape(-1, 64).abs().amax(dim=1)  # (N1,) the absmax of each block before rounding
        stored = dequantize_absmax(layer.state)  # (N1,)
        error = (layer.dequantize(torch.float32) - w).abs().reshape(-1, 64)  # (N1, 64)
        assert (error <= (half_gap * a + (stored - a).abs())[:, None] + 1e-6).all(), name
        assert (error.amax(dim=1) / a).max() > 0.1  # the bound is nearly reached: it is a real rounding
    merge_error = (model(X) - unmerged).abs().max()
    reference = tiny_model("llama3")
    apply_lora(reference, LoraConfig(r=4, alpha=8))
    _randomize_adapters(reference)
    merge_lora(reference)
    exact_logits = reference(X)
    quantize_model(reference, double_quant=double_quant, compute_dtype=torch.float32)
    quantize_error = (reference(X) - exact_logits).abs().max()
    assert 0.01 < merge_error < 1.5 * quantize_error


@torch.no_grad()
def test_nf4_merge_of_a_zero_adapter_gives_back_the_same_codes():
    """Without double quantization re-quantizing deq(W) is exact: each block's largest |value| is
    ±absmax exactly (code ±1), so the block gets the same absmax and every value its own code."""
    model = _qlora(double_quant=False)
    before = {name: layer.base_layer.state for name, layer in lora_layers(model).items()}
    packed = {name: layer.base_layer.weight.clone() for name, layer in lora_layers(model).items()}
    merge_lora(model)
    for name, state in before.items():
        assert torch.equal(model.get_submodule(name).weight, packed[name])
        assert torch.equal(model.get_submodule(name).state.absmax, state.absmax)


@torch.no_grad()
def test_nf4_merge_with_dequantize_gives_a_full_precision_model():
    """dequantize=True: every 4-bit linear (adapted or not) becomes an nn.Linear in the compute dtype,
    with the update added exactly: the logits equal the unmerged QLoRA model's."""
    model = _qlora(target_modules=["q_proj", "down_proj"], use_dora=True)
    _randomize_adapters(model)
    expected = model(X)
    merge_lora(model, dequantize=True)
    assert all(type(m) is nn.Linear for name, m in model.named_modules() if name.endswith("_proj"))
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    torch.testing.assert_close(model(X), expected, atol=1e-5, rtol=0)
    bf16 = _qlora(compute_dtype=torch.bfloat16)
    merge_lora(bf16, dequantize=True)
    assert bf16.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
