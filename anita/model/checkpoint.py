"""Reading and writing Hugging Face-layout checkpoints: config.json + safetensors (one file, or
shards listed by `model.safetensors.index.json`), from a directory or a Hub repo id.

Loading follows gpt-fast: build the model on the `meta` device (no memory), then read the
checkpoint tensor by tensor, cast and move each one, and assign it in place — so peak memory is
about one copy of the weights (with `quantize="nf4"`, the 4-bit model plus one tensor: anita's
4-bit linear quantizes each weight as it arrives, `Linear4bit.load_checkpoint_tensor`).

`from_pretrained` and `save_pretrained` are exported from `anita.model`; the model file itself
knows nothing about files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from anita.dtypes import parse_dtype
from anita.errors import AnitaError
from anita.files import save_safetensors
from anita.hub import resolve_model_dir
from anita.model.config import LlamaConfig
from anita.model.llama import Llama, rope_inv_freq
from anita.quant import Linear4bit, quantize_model
from anita.runtime import parse_device

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in shard order."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise AnitaError(f"{index}: not a valid safetensors index ({e})") from None
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise AnitaError(f"{index}: lists shard(s) that do not exist: {', '.join(missing)}")
        return files
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    raise AnitaError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} found")


def iter_checkpoint(files: list[Path]) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """Yield (file, key, tensor) one tensor at a time; corrupt files raise `AnitaError`.

    safetensors reads through a memory map, and every page read stays resident while the map
    is open. So each tensor is read under its own short-lived map and copied out: the pages are
    released before the next tensor is read, and peak memory stays at the model plus one tensor.
    """
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                keys = list(f.keys())
            for key in keys:
                with safe_open(str(file), framework="pt") as f:
                    tensor = f.get_tensor(key).clone()  # a private copy; the map closes here
                yield file, key, tensor
        except (SafetensorError, OSError, RuntimeError) as e:
            raise AnitaError(f"{file}: cannot read safetensors file (truncated or corrupt?): {e}") from None


def assign_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put `tensor` where parameter or buffer `key` lives, replacing the meta placeholder."""
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, Linear4bit):
        module.load_checkpoint_tensor(attr, tensor)
    elif attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=module._parameters[attr].requires_grad)
    else:
        module._buffers[attr] = tensor


def model_skeleton(model_dir) -> Llama:
    """The model that `model_dir`/config.json describes, on the meta device: every module's name and
    shape, no memory and no weights read. Settings are checked against it before a model loads."""
    config = LlamaConfig.from_json(Path(model_dir) / "config.json")
    with torch.device("meta"):
        return Llama(config)


def check_finite(model: nn.Module, what: str) -> None:
    """Refuse a model with a NaN or inf weight, naming the first such tensor; `what` says where the
    weights come from ("merging ADAPTER into MODEL"). Checked in blocks, to stay within memory."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            bad = sum(int((~torch.isfinite(block)).sum()) for block in tensor.detach().reshape(-1).split(1 << 24))
            if bad:
                raise AnitaError(f"{what}: tensor {name!r} holds {bad} non-finite value(s) (NaN or inf) of "
                                 f"{tensor.numel()}; nothing written")


def from_pretrained(path, dtype=torch.float32, device="cpu", quantize: str | None = None,
                    quantize_kwargs: dict | None = None) -> Llama:
    """Build `Llama` from an HF-layout directory or Hub id, one tensor at a time.

    Every expected tensor must be present exactly once with the expected shape; any missing,
    extra or mis-shaped tensor is an error naming the file and the tensor.
    `quantize="nf4"` puts anita's 4-bit linears in place first (see `anita.quant.quantize_model`).
    """
    dtype, device = parse_dtype(dtype), parse_device(device)
    model_dir = resolve_model_dir(path)
    model = model_skeleton(model_dir)
    config = model.config
    if quantize is not None:
        if quantize != "nf4":
            raise AnitaError(f"quantize={quantize!r} is not supported; expected 'nf4' or None")
        quantize_model(model, **(quantize_kwargs or {}))
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    seen: set[str] = set()
    for file, key, tensor in iter_checkpoint(checkpoint_files(model_dir)):
        if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and config.tie_word_embeddings):
            continue  # derived from the config / shared with the embeddings
        if key not in expected:
            raise AnitaError(f"{file}: unexpected tensor {key!r} (not part of a {config.num_hidden_layers}-layer Llama)")
        if key in seen:
            raise AnitaError(f"{file}: tensor {key!r} appears twice in the checkpoint")
        if tuple(tensor.shape) != tuple(expected[key]):
            raise AnitaError(f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(expected[key])} from config.json")
        seen.add(key)
        assign_tensor(model, key, tensor.to(device=device, dtype=dtype))
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise AnitaError(f"{model_dir}: checkpoint is missing tensor(s) {', '.join(missing[:3])}{more}")
    model.tie_weights()
    model.rope_inv_freq = rope_inv_freq(config, device=device)
    return model.eval()


def _shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split a state dict into consecutive shards of at most `max_shard_bytes` (one tensor may exceed)."""
    shards, current, size = [], {}, 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += nbytes
    return shards + [current] if current else shards


def save_pretrained(model: Llama, out_dir, max_shard_size: int = 5 * 2**30, dtype=None) -> None:
    """Write `config.json` and safetensors (sharded with an index above `max_shard_size` bytes).

    The files are written to a temporary directory beside `out_dir` and moved in at the end, one
    rename each, so a failure while writing (disk full, a bad tensor) never leaves a half-written
    file and leaves `out_dir` as it was. Other files in `out_dir` (a tokenizer) are kept; weight
    files of an earlier save are removed just before the new ones move in.
    """
    if any(isinstance(m, Linear4bit) for m in model.modules()):
        raise AnitaError("save_pretrained: the model holds quantized linears; merge adapters into a "
                         "full-precision model (anita merge) or save the adapter instead")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(parse_dtype(dtype) if dtype else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    config = model.config.to_dict() | {"torch_dtype": str(next(iter(state.values())).dtype).split(".")[-1]}
    shards = _shards(state, max_shard_size)
    tmp = Path(tempfile.mkdtemp(prefix=".anita-save-", dir=out_dir.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if len(shards) == 1:
            save_safetensors(shards[0], tmp / SINGLE_FILE)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_safetensors(shard, tmp / name)
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        out_dir.mkdir(exist_ok=True)
        for stale in [out_dir / SINGLE_FILE, out_dir / INDEX_FILE, *out_dir.glob("model-*-of-*.safetensors")]:
            stale.unlink(missing_ok=True)  # a previous save, perhaps with the other layout
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
