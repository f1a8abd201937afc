"""LoRA adapters on disk in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

The format is PEFT's (`PeftModel.save_pretrained` / `from_pretrained`, `peft/utils/save_and_load.py`):
tensor keys are the model's own keys under `base_model.model.`, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (R, I), `...lora_B.weight` (O, R),
and DoRA's magnitude `...lora_magnitude_vector` (O,). anita's LoRA layers use PEFT's attribute
names, so the only mapping is that prefix. Files are written to a temporary name and renamed.

Loading validates everything (config fields, every key, every shape) before touching the model:
on an error the model is unchanged.

Shapes: I input features, O output features, R LoRA rank.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from anita.errors import AnitaError
from anita.files import save_safetensors, write_json
from anita.lora.layer import LoraConfig, is_base_linear
from anita.lora.model import (LoraReport, check_wrappable, freeze_all_but_lora, load_lora_state_dict, lora_layers,
                              lora_state_dict, wrap_modules)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
KEY = re.compile(r"base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)")
# PEFT init_lora_weights values that only initialise A and B (base weights untouched).
INIT_ONLY = (True, False, "gaussian", "eva", "orthogonal")
# PEFT options that change what a layer computes and that anita does not implement.
UNSUPPORTED = ("rank_pattern", "alpha_pattern", "modules_to_save", "lora_bias", "fan_in_fan_out",
               "layer_replication", "trainable_token_indices", "target_parameters", "use_bdlora",
               "alora_invocation_tokens", "arrow_config", "velora_config", "monteclora_config", "kasa_config",
               "use_qalora")


# ----------------------------------------------------------------------------------- save
def save_adapter(model: nn.Module, out_dir, base_model_name_or_path: str | None = None) -> None:
    """Write the model's LoRA adapter as PEFT does, loadable by `peft.PeftModel.from_pretrained`."""
    layers = lora_layers(model)
    if not layers:
        raise AnitaError("save_adapter: the model has no LoRA layers (apply_lora or load_adapter first)")
    configs = {(c.r, c.alpha, c.dropout, c.use_rslora, c.use_dora, c.init)
               for c in (layer.config for layer in layers.values())}
    if len(configs) > 1:
        raise AnitaError("save_adapter: the LoRA layers have different settings; PEFT's format needs one")
    config = next(iter(layers.values())).config
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": target_module_names(model, list(layers)), "use_rslora": config.use_rslora,
        "use_dora": config.use_dora, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True if config.init == "kaiming" else "gaussian", "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False, "layers_to_transform": None,
        "layers_pattern": None, "revision": None,
    }
    tensors = {PREFIX + k: v.detach().contiguous() for k, v in lora_state_dict(model).items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, out_dir / WEIGHTS_FILE)
    write_json(out_dir / CONFIG_FILE, peft_config)


def target_module_names(model: nn.Module, wrapped: list[str]) -> list[str]:
    """The short names ("q_proj", ...) if they select exactly the wrapped modules, else the full names."""
    short = sorted({n.rpartition(".")[2] for n in wrapped})
    selected = {n for n, _ in model.named_modules() if n.rpartition(".")[2] in short}
    return short if selected == set(wrapped) else sorted(wrapped)


# ----------------------------------------------------------------------------------- load
def load_adapter(model: nn.Module, adapter_dir, dtype=torch.float32) -> LoraReport:
    """Wrap `model`'s linears as a PEFT adapter directory says and load its weights (LoRA, rsLoRA, DoRA).

    The adapter weights are kept in `dtype` (float32 or bfloat16). Returns the `LoraReport`.
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AnitaError(f"{adapter_dir}: no such adapter directory")
    if not (adapter_dir / CONFIG_FILE).exists() and (adapter_dir / "adapter" / CONFIG_FILE).is_file():
        raise AnitaError(f"{adapter_dir}: a training run's directory, not an adapter; its final adapter is "
                         f"{adapter_dir / 'adapter'}")
    tensors = read_adapter_weights(adapter_dir / WEIGHTS_FILE)
    targets = adapter_targets(adapter_dir / WEIGHTS_FILE, tensors)
    config = read_adapter_config(adapter_dir / CONFIG_FILE, dtype, targets)
    names = [n for n, m in model.named_modules() if n in targets]  # model order
    check_wrappable(model, names)
    check_adapter_fits(model, adapter_dir / WEIGHTS_FILE, tensors, targets, config)
    wrap_modules(model, names, config)
    load_lora_state_dict(model, _model_keys(tensors))
    return freeze_all_but_lora(model)


def load_adapter_weights(model: nn.Module, adapter_dir) -> None:
    """Copy the weights of an adapter directory into the LoRA layers `model` already has (a resumed
    run reads its checkpoint's adapter this way); every key and shape must match."""
    load_lora_state_dict(model, _model_keys(read_adapter_weights(Path(adapter_dir) / WEIGHTS_FILE)))


def _model_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's keys without their `base_model.model.` prefix: the model's own keys."""
    return {k.removeprefix(PREFIX): t for k, t in tensors.items()}


def read_adapter_config(path: Path, dtype, targets: list[str]) -> LoraConfig:
    """PEFT's `adapter_config.json` as a `LoraConfig`; anything anita cannot reproduce is an error."""
    if not path.is_file():
        raise AnitaError(f"{path}: adapter config not found")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnitaError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        found = raw.get("peft_type") if isinstance(raw, dict) else raw
        raise AnitaError(f"{path}: peft_type is {found!r}, expected 'LORA'")
    for field in ("r", "lora_alpha"):
        if field not in raw:
            raise AnitaError(f"{path}: missing field {field!r}")
    if raw.get("bias", "none") != "none":
        raise AnitaError(f"{path}: bias={raw['bias']!r} is not supported (expected 'none')")
    for field in UNSUPPORTED:
        if raw.get(field):
            raise AnitaError(f"{path}: {field}={raw[field]!r} is not supported by anita's LoRA")
    init = raw.get("init_lora_weights", True)
    if init not in INIT_ONLY:
        raise AnitaError(f"{path}: init_lora_weights={init!r} is not supported: that scheme also changes the base "
                         "weights (PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA, ...), so the adapter does not compute base + "
                         f"B·A over the checkpoint's weights; anita loads {', '.join(map(repr, INIT_ONLY))}")
    # These only choose where a new adapter starts; the loaded weights replace that start.
    init = "gaussian" if init == "gaussian" else "kaiming"
    try:
        return LoraConfig(r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0) or 0.0,
                          target_modules=tuple(targets), use_rslora=bool(raw.get("use_rslora")),
                          use_dora=bool(raw.get("use_dora")), init=init, dtype=dtype)
    except AnitaError as e:
        raise AnitaError(f"{path}: {e}") from None


def read_adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        other = " (only safetensors adapters are read; adapter_model.bin is not)" if \
            (path.parent / "adapter_model.bin").exists() else ""
        raise AnitaError(f"{path}: adapter weights not found{other}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise AnitaError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from None


def adapter_targets(path: Path, tensors: dict[str, torch.Tensor]) -> list[str]:
    """The module names the adapter's tensors belong to; any key that is not LoRA is an error."""
    targets = set()
    for key in tensors:
        match = KEY.fullmatch(key)
        if match is None:
            raise AnitaError(f"{path}: tensor {key!r} is not a LoRA tensor anita can load "
                             f"(expected {PREFIX}<module>.lora_A.weight / lora_B.weight / lora_magnitude_vector)")
        targets.add(match.group(1))
    if not targets:
        raise AnitaError(f"{path}: holds no tensors")
    return sorted(targets)


def check_adapter_fits(model, path: Path, tensors, targets: list[str], config: LoraConfig) -> None:
    """Every target is a linear of `model`, and every tensor it needs is there with the right shape."""
    modules = dict(model.named_modules())
    for name in targets:
        module = modules.get(name)
        if module is None or not is_base_linear(module):
            what = "no such module" if module is None else f"a {type(module).__name__}, not a linear"
            raise AnitaError(f"{path}: targets {name!r}: {what} in this model (adapter for another architecture?)")
        expected = {"lora_A.weight": (config.r, module.in_features), "lora_B.weight": (module.out_features, config.r)}
        if config.use_dora:
            expected["lora_magnitude_vector"] = (module.out_features,)
        for suffix, shape in expected.items():
            key = f"{PREFIX}{name}.{suffix}"
            if key not in tensors:
                raise AnitaError(f"{path}: missing tensor {key!r}")
            if tuple(tensors[key].shape) != shape:
                raise AnitaError(f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, expected {shape} "
                                 f"(r={config.r} from {CONFIG_FILE}; the model's {name} is "
                                 f"{module.in_features} -> {module.out_features})")
        if not config.use_dora and f"{PREFIX}{name}.lora_magnitude_vector" in tensors:
            raise AnitaError(f"{path}: has DoRA magnitudes for {name!r} but {CONFIG_FILE} says use_dora=false")
