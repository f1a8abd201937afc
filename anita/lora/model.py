"""LoRA on a whole model: choose and wrap the target linears, freeze the rest, switch the adapters
off (DPO's reference model), fold them into the weights, and hand their parameters to the optimizer.

References: Hu et al. 2021 (LoRA, §4.2: adapt the attention projections, freeze everything else);
Dettmers et al. 2023 (QLoRA, §3: adapters over every linear of a frozen 4-bit model); torchtune's
`disable_adapter` context manager; PEFT's target matching ("all-linear" skips the output layer).
The layer itself is `anita.lora.layer.LoraLinear`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from anita.errors import AnitaError
from anita.lora.layer import LoraConfig, LoraLinear, is_base_linear
from anita.quant import Linear4bit

OUTPUT_LAYER = "lm_head"  # never wrapped by "all-linear", as in PEFT


@dataclass
class LoraReport:
    """What `apply_lora` did: the wrapped module names and the trainable / total parameter counts."""

    wrapped: list[str]
    trainable: int
    total: int  # a 4-bit weight counts as its O·I elements, not its packed bytes

    def __str__(self) -> str:
        return (f"LoRA on {len(self.wrapped)} linears: trainable params {self.trainable:,} || "
                f"all params {self.total:,} || trainable {100 * self.trainable / self.total:.4f}%")


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every LoRA layer of `model` by its dotted module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def find_targets(model: nn.Module, target_modules) -> list[str]:
    """The dotted names of the linears that `target_modules` selects (see `LoraConfig`).

    A name selects every module whose dotted name equals it or ends with "." + it (PEFT's rule).
    Each name must select at least one module, and only linears.
    """
    linears = [name for name, m in model.named_modules() if is_base_linear(m)]
    if target_modules == "all-linear":
        return [n for n in linears if n.rpartition(".")[2] != OUTPUT_LAYER]
    modules = dict(model.named_modules())
    chosen: set[str] = set()
    for target in target_modules:
        hits = [n for n in modules if n == target or n.endswith("." + target)]
        if not hits:
            raise AnitaError(f"LoraConfig.target_modules: {target!r} matches no module of this model; "
                             f"its linears are named {', '.join(linear_kinds(model))}")
        for n in hits:
            if not is_base_linear(modules[n]):
                raise AnitaError(f"LoraConfig.target_modules: {target!r} selects {n!r}, a "
                                 f"{type(modules[n]).__name__}, not a linear LoRA can wrap")
        chosen.update(hits)
    return [n for n in linears if n in chosen]  # in model order


def linear_kinds(model: nn.Module) -> list[str]:
    """The last parts of the names of the linears LoRA can wrap ("down_proj", ..., "v_proj"), sorted."""
    return sorted({n.rpartition(".")[2] for n, m in model.named_modules() if is_base_linear(m)})


def wrap_modules(model: nn.Module, names: list[str], config: LoraConfig) -> None:
    """Replace each named linear by a `LoraLinear` over it (names already validated)."""
    for name in names:
        _set_module(model, name, LoraLinear(model.get_submodule(name), config))


def check_wrappable(model: nn.Module, names: list[str]) -> None:
    """Refuse a model that already holds LoRA layers, or LoRA on an lm_head tied to the embeddings."""
    if lora_layers(model):
        raise AnitaError("the model already has LoRA layers (one adapter per layer); merge_lora or "
                         "start from the base model")
    config = getattr(model, "config", None)
    if OUTPUT_LAYER in names and getattr(config, "tie_word_embeddings", False):
        # The tied lm_head shares its weight with the embeddings: merging would change both.
        raise AnitaError("LoRA on lm_head is not supported when tie_word_embeddings is true")


def apply_lora(model: nn.Module, config: LoraConfig | None = None) -> LoraReport:
    """Wrap the target linears of `model` in LoRA layers (in place) and freeze everything else.

    All targets are validated before anything changes: on an error the model is untouched.
    Returns a `LoraReport`; `print(report)` gives PEFT's trainable-parameters line.
    """
    config = config or LoraConfig()
    names = find_targets(model, config.target_modules)
    check_wrappable(model, names)
    wrap_modules(model, names, config)
    return freeze_all_but_lora(model)


def freeze_all_but_lora(model: nn.Module) -> LoraReport:
    """requires_grad only on LoRA parameters; count trainable and total parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    trainable = sum(p.numel() for p in lora_parameters(model))
    return LoraReport(list(lora_layers(model)), trainable, count_parameters(model))


def count_parameters(model: nn.Module) -> int:
    """All parameters, tied ones once; a 4-bit linear counts O·I (+bias), not its packed bytes."""
    seen: set[int] = set()
    total = 0
    for m in model.modules():
        own = list(m.parameters(recurse=False))
        new = [p for p in own if id(p) not in seen]
        seen.update(id(p) for p in own)
        if isinstance(m, Linear4bit):
            bias = getattr(m, "bias", None)
            total += m.in_features * m.out_features + (bias.numel() if bias is not None else 0)
        else:
            total += sum(p.numel() for p in new)
    return total


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters (A, B, and DoRA's magnitudes), in model order: for the optimizer."""
    return [p for layer in lora_layers(model).values() for p in _own_parameters(layer)]


def _own_parameters(layer: LoraLinear) -> list[nn.Parameter]:
    params = [layer.lora_A.weight, layer.lora_B.weight]
    return params + ([layer.lora_magnitude_vector] if layer.lora_magnitude_vector is not None else [])


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under their model keys, e.g. `model.layers.0.self_attn.q_proj.lora_A.weight`.

    These keys are PEFT's without its `base_model.model.` prefix (see `anita.lora.peft_format`).
    """
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        state[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach()
        if layer.lora_magnitude_vector is not None:
            state[f"{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach()
    return state


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors (as `lora_state_dict` returns them) into a model that has LoRA layers.

    Every key must be present with its shape, and no other: checked before anything is copied.
    """
    own = lora_state_dict(model)
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise AnitaError(f"LoRA state dict does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, t in state.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise AnitaError(f"LoRA state dict: tensor {k!r} has shape {tuple(t.shape)}, expected {tuple(own[k].shape)}")
    with torch.no_grad():
        for k, t in state.items():
            own[k].copy_(t)


@contextmanager
def disable_lora(model: nn.Module):
    """Inside the `with`, every LoRA layer computes exactly its base layer (DPO's reference model).

    Each layer's previous `disabled` flag is restored on exit, even if the body raises.
    """
    layers = list(lora_layers(model).values())
    before = [layer.disabled for layer in layers]
    try:
        for layer in layers:
            layer.disabled = True
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was


# ---------------------------------------------------------------------------------- merge
def merge_lora(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Fold every adapter into its base weight and put plain layers back (in place; returns `model`).

    A full-precision base gets W + scale·B·A (times m/||·||_row with DoRA), computed in fp32 and
    cast to the base's dtype: the same function up to that rounding. A 4-bit base is dequantized,
    the update added in fp32 and the sum quantized again with the base's settings, which costs one
    more NF4 rounding (up to half a code-book gap times the block's absmax per weight; see
    docs/lora.md for measured sizes). With `dequantize=True` every 4-bit linear, adapted or not,
    becomes an `nn.Linear` in its compute dtype instead: a full-precision model to export.
    The merged weights stay frozen, as the base weights were.
    """
    for name, layer in lora_layers(model).items():
        _set_module(model, name, merged_linear(layer, dequantize))
    if dequantize:
        for name, m in list(model.named_modules()):
            if isinstance(m, Linear4bit):
                _set_module(model, name, plain_linear(m.dequantize(), m.bias, m.compute_dtype))
    return model


def merged_linear(layer: LoraLinear, dequantize: bool) -> nn.Module:
    """The plain (or 4-bit) linear that computes what `layer` computes, adapter folded in."""
    base, w = layer.base_layer, layer.merged_weight()  # w (O, I) fp32
    if not isinstance(base, Linear4bit):
        return plain_linear(w, base.bias, base.weight.dtype)
    if dequantize:
        return plain_linear(w, base.bias, base.compute_dtype)
    return Linear4bit.from_linear(plain_linear(w, base.bias, torch.float32), blocksize=base.blocksize,
                                  double_quant=base.double_quant, compute_dtype=base.compute_dtype,
                                  backend=base.backend)


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """An `nn.Linear` holding `weight` (O, I) and `bias` cast to `dtype`, frozen, without a random init."""
    O, I = weight.shape
    with torch.device("meta"):
        linear = nn.Linear(I, O, bias=bias is not None)
    linear.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return linear


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)
