"""LoRA adapters on disk in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

The format is PEFT's (`PeftModel.save_pretrained` / `from_pretrained`, `peft/utils/save_and_load.py`):
tensor keys are the model's own keys under `base_model.model.`, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (R, I), `...lora_B.weight` (O, R),
and DoRA's magnitude `...lora_magnitude_vector` (O,). anita's LoRA layers use PEFT's attribute
names, so the only mapping is that prefix. Files are written to a temporary name and renamed.

Loading validates everything (config fields and numbers, every key, every shape, finite values,
`target_modules`) before touching the model: on an error the model is unchanged. `read_adapter`
does the part that needs no model, and `check_adapter_fits` the rest against a model or its
meta-device skeleton, so a bad adapter is refused before a base model's weights are read.

Shapes: I input features, O output features, R LoRA rank.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from anita.errors import AnitaError
from anita.files import save_safetensors, write_json
from anita.lora.layer import LoraConfig, is_base_linear
from anita.lora.model import (LoraReport, check_wrappable, find_targets, freeze_all_but_lora, linear_kinds,
                              load_lora_state_dict, lora_layers, lora_state_dict, wrap_modules)

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
def save_adapter(model: nn.Module, out_dir, base_model_name_or_path: str | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write the model's LoRA adapter as PEFT does, loadable by `peft.PeftModel.from_pretrained`.
    `tensors`: the adapter's tensors as `lora_state_dict` names them, when the model's own are not
    whole (a sharded model's, gathered by `anita.train.fsdp.full_adapter`)."""
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
    tensors = {PREFIX + k: v.detach().contiguous() for k, v in (tensors or lora_state_dict(model)).items()}
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
@dataclass
class AdapterFiles:
    """An adapter directory read and checked on its own, before any model is involved."""

    path: Path
    config: LoraConfig
    tensors: dict[str, torch.Tensor]  # PEFT's keys, every value finite
    targets: list[str]  # the module names the tensors adapt, sorted
    target_modules: list[str] | str | None  # as adapter_config.json gives them (None: not given)


def read_adapter(adapter_dir, dtype=torch.float32) -> AdapterFiles:
    """Read an adapter directory and check all it can be checked without a model: config fields
    and numbers, tensor names, finite values. The weights are kept in `dtype`."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AnitaError(f"{adapter_dir}: no such adapter directory")
    if not (adapter_dir / CONFIG_FILE).exists() and (adapter_dir / "adapter" / CONFIG_FILE).is_file():
        raise AnitaError(f"{adapter_dir}: a training run's directory, not an adapter; its final adapter is "
                         f"{adapter_dir / 'adapter'}")
    tensors = read_adapter_weights(adapter_dir / WEIGHTS_FILE)
    targets = adapter_targets(adapter_dir / WEIGHTS_FILE, tensors)
    config, target_modules = read_adapter_config(adapter_dir / CONFIG_FILE, dtype, targets)
    return AdapterFiles(adapter_dir, config, tensors, targets, target_modules)


def load_adapter(model: nn.Module, adapter, dtype=torch.float32) -> LoraReport:
    """Wrap `model`'s linears as a PEFT adapter directory (or the `AdapterFiles` read from one) says
    and load its weights (LoRA, rsLoRA, DoRA).

    The adapter weights are kept in `dtype` (float32 or bfloat16). Returns the `LoraReport`.
    """
    files = adapter if isinstance(adapter, AdapterFiles) else read_adapter(adapter, dtype)
    names = check_adapter_fits(model, files)
    wrap_modules(model, names, files.config)
    load_lora_state_dict(model, _model_keys(files.tensors))
    return freeze_all_but_lora(model)


def load_adapter_weights(model: nn.Module, adapter_dir) -> None:
    """Copy the weights of an adapter directory into the LoRA layers `model` already has (a resumed
    run reads its checkpoint's adapter this way); every key and shape must match."""
    load_lora_state_dict(model, _model_keys(read_adapter_weights(Path(adapter_dir) / WEIGHTS_FILE)))


def _model_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's keys without their `base_model.model.` prefix: the model's own keys."""
    return {k.removeprefix(PREFIX): t for k, t in tensors.items()}


def read_adapter_config(path: Path, dtype, targets: list[str]) -> tuple[LoraConfig, list[str] | str | None]:
    """PEFT's `adapter_config.json` as a `LoraConfig` and its `target_modules`; anything anita cannot
    reproduce is an error, and so is a number that is not finite (`lora_alpha: NaN` merges to NaN)."""
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
        config = LoraConfig(r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0) or 0.0,
                            target_modules=tuple(targets), use_rslora=bool(raw.get("use_rslora")),
                            use_dora=bool(raw.get("use_dora")), init=init, dtype=dtype)
    except AnitaError as e:
        message = str(e).replace("LoraConfig.alpha", "lora_alpha").replace("LoraConfig.dropout", "lora_dropout")
        raise AnitaError(f"{path}: {message.replace('LoraConfig.', '')}") from None  # the file's field names
    return config, config_target_modules(path, raw.get("target_modules"))


def config_target_modules(path: Path, value) -> list[str] | str | None:
    """PEFT's `target_modules`: a list of names (each matches a module's name or its last parts),
    "all-linear", or any other string: a regular expression the whole module name must match."""
    if value is None:
        return None
    if isinstance(value, str):
        if value != "all-linear":
            try:
                re.compile(value)
            except re.error as e:
                raise AnitaError(f"{path}: target_modules {value!r} is not a valid regular expression ({e})") from None
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return value
    raise AnitaError(f"{path}: target_modules must be a non-empty list of module names or a string, got {value!r}")


def read_adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        other = " (only safetensors adapters are read; adapter_model.bin is not)" if \
            (path.parent / "adapter_model.bin").exists() else ""
        raise AnitaError(f"{path}: adapter weights not found{other}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise AnitaError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise AnitaError(f"{path}: tensor {key!r} has dtype {str(t.dtype).removeprefix('torch.')}, "
                             "expected floating point")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise AnitaError(f"{path}: tensor {key!r} holds {bad} non-finite value(s) (NaN or inf) of {t.numel()}; "
                             "a damaged adapter (a diverged run?), refused")
    return tensors


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


def check_adapter_fits(model: nn.Module, files: AdapterFiles) -> list[str]:
    """The module names to wrap, in model order, once checked: `target_modules` selects modules of
    `model` and every adapted one, each target is a linear, and every tensor it needs is there with
    the right shape. `model` may be a skeleton on the meta device (`anita.model.model_skeleton`)."""
    config, path = files.config, files.path / WEIGHTS_FILE
    check_wrappable(model, files.targets)
    selected = selected_modules(model, files)
    modules = dict(model.named_modules())
    for name in files.targets:
        module = modules.get(name)
        if module is None or not is_base_linear(module):
            what = "no such module" if module is None else f"a {type(module).__name__}, not a linear"
            raise AnitaError(f"{path}: targets {name!r}: {what} in this model (adapter for another architecture?)")
        if selected is not None and name not in selected:
            raise AnitaError(f"{path}: has tensors for {name!r}, which target_modules={files.target_modules!r} "
                             f"in {CONFIG_FILE} does not select (PEFT would leave them unused)")
        expected = {"lora_A.weight": (config.r, module.in_features), "lora_B.weight": (module.out_features, config.r)}
        if config.use_dora:
            expected["lora_magnitude_vector"] = (module.out_features,)
        for suffix, shape in expected.items():
            key = f"{PREFIX}{name}.{suffix}"
            if key not in files.tensors:
                raise AnitaError(f"{path}: missing tensor {key!r}")
            if tuple(files.tensors[key].shape) != shape:
                raise AnitaError(f"{path}: tensor {key!r} has shape {tuple(files.tensors[key].shape)}, expected "
                                 f"{shape} (r={config.r} from {CONFIG_FILE}; the model's {name} is "
                                 f"{module.in_features} -> {module.out_features})")
        if not config.use_dora and f"{PREFIX}{name}.lora_magnitude_vector" in files.tensors:
            raise AnitaError(f"{path}: has DoRA magnitudes for {name!r} but {CONFIG_FILE} says use_dora=false")
    return [n for n in modules if n in set(files.targets)]  # model order


def selected_modules(model: nn.Module, files: AdapterFiles) -> set[str] | None:
    """The modules of `model` that the config's `target_modules` selects (None when it gives none);
    a name or a pattern that selects nothing is an error naming it and the model's linears."""
    target_modules, path = files.target_modules, files.path / CONFIG_FILE
    if target_modules is None:
        return None
    if isinstance(target_modules, list) or target_modules == "all-linear":
        try:
            return set(find_targets(model, target_modules))
        except AnitaError as e:
            raise AnitaError(f"{path}: {str(e).replace('LoraConfig.target_modules', 'target_modules')}") from None
    hits = {n for n, m in model.named_modules() if re.fullmatch(target_modules, n) and is_base_linear(m)}
    if not hits:
        raise AnitaError(f"{path}: target_modules {target_modules!r} (a regular expression) matches no linear of "
                         f"this model; its linears are named {', '.join(linear_kinds(model))}")
    return hits
