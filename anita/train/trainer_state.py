"""Optimizer, scheduler and RNG state on disk without pickle: tensors in safetensors, the rest in JSON.

`torch.save` writes a pickle, and reading a pickle can run code, so no user file is ever read that
way: a checkpoint holds

    optimizer.safetensors      every tensor of the optimizer's state (AdamW's moments and step;
                               bitsandbytes 8-bit AdamW's uint8 states, their absmax scales and
                               their quantization maps qmap1/qmap2)
    trainer_state.json         the optimizer's state_dict and the scheduler's, with each tensor
                               replaced by the name it has in optimizer.safetensors
    rng-rank{R}.safetensors    each process's RNG states, as the uint8 byte tensors torch returns

The JSON is a tree of tagged nodes, so that it comes back exactly as it went in: a JSON object is
always a one-key tag ({"dict": ...}, {"int_dict": ...} for the optimizer's parameter-index keys,
{"tuple": [...]} for betas, {"tensor": "name"}); numbers, strings, booleans, null and lists are
themselves. Python's JSON floats round-trip exactly, so a resumed run continues bit for bit.
A tensor shared by several entries (bitsandbytes shares one quantization map) is stored once and
shared again on load.
"""

from __future__ import annotations

import torch

from anita.errors import AnitaError

SCALARS = (bool, int, float, str, type(None))
# Optimizer state tensors that have their parameter's shape (torch AdamW; bitsandbytes' state1/2).
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "state1", "state2")


# ----------------------------------------------------------------- state_dict <-> (JSON tree, tensors)
def to_tree(obj, tensors: dict[str, torch.Tensor], path: str = "", _seen: dict | None = None):
    """`obj` (a state_dict) as a JSON-able tree; its tensors go into `tensors` under their path."""
    seen = {} if _seen is None else _seen
    if isinstance(obj, torch.Tensor):
        ident = (obj.data_ptr(), obj.dtype, tuple(obj.shape), tuple(obj.stride()), obj.device)
        if ident not in seen or obj.numel() == 0:  # empty tensors all have data_ptr 0
            seen[ident] = path
            tensors[path] = obj.detach().cpu().contiguous()
        return {"tensor": seen[ident]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"dict": {k: to_tree(v, tensors, f"{path}/{k}", seen) for k, v in obj.items()}}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
            return {"int_dict": {str(k): to_tree(v, tensors, f"{path}/{k}", seen) for k, v in obj.items()}}
        raise AnitaError(f"trainer state: {path or '/'} has keys of mixed types; cannot store it without pickle")
    if isinstance(obj, (list, tuple)):
        items = [to_tree(v, tensors, f"{path}/{i}", seen) for i, v in enumerate(obj)]
        return {"tuple": items} if isinstance(obj, tuple) else items
    if isinstance(obj, SCALARS):
        return obj
    raise AnitaError(f"trainer state: {path or '/'} is a {type(obj).__name__}; cannot store it without pickle")


def from_tree(node, tensors: dict[str, torch.Tensor], where: str):
    """The inverse of `to_tree`; `where` names the file in errors."""
    if isinstance(node, list):
        return [from_tree(v, tensors, where) for v in node]
    if not isinstance(node, dict):
        if isinstance(node, SCALARS):
            return node
        raise AnitaError(f"{where}: unexpected value {node!r:.60}")
    if len(node) != 1:
        raise AnitaError(f"{where}: expected a one-key tag (dict, int_dict, tuple, tensor), "
                         f"got keys {sorted(node)[:4]}")
    (tag, value), = node.items()
    if tag == "tensor":
        if not isinstance(value, str) or value not in tensors:
            raise AnitaError(f"{where}: names tensor {value!r}, which the safetensors file does not hold")
        return tensors[value]
    if tag == "tuple" and isinstance(value, list):
        return tuple(from_tree(v, tensors, where) for v in value)
    if tag in ("dict", "int_dict") and isinstance(value, dict):
        try:
            keys = [int(k) if tag == "int_dict" else k for k in value]
        except ValueError:
            raise AnitaError(f"{where}: an int_dict with a key that is not an integer") from None
        return {k: from_tree(v, tensors, where) for k, v in zip(keys, value.values())}
    raise AnitaError(f"{where}: unknown tag {tag!r} (or a value of the wrong type)")


# ------------------------------------------------------------------------------- checks
def check_optimizer_state(state: dict, optimizer: torch.optim.Optimizer, where: str) -> None:
    """The loaded state fits `optimizer`: as many groups and parameters, and every moment tensor
    of its parameter's shape (torch checks the counts too, but not the shapes: a wrong shape would
    only fail inside the next step)."""
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) or \
            not isinstance(state.get("param_groups"), list):
        raise AnitaError(f"{where}: the optimizer state lacks 'state' or 'param_groups'")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sizes = [len(g.get("params", [])) if isinstance(g, dict) else -1 for g in state["param_groups"]]
    if sizes != [len(g["params"]) for g in optimizer.param_groups]:
        raise AnitaError(f"{where}: optimizer state for parameter groups of sizes {sizes}, this run has "
                         f"{[len(g['params']) for g in optimizer.param_groups]}")
    for index, entry in state["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(entry, dict):
            raise AnitaError(f"{where}: optimizer state for parameter {index!r}, which this run does not have")
        for name, t in flat_tensors(entry):
            if name in MOMENTS and tuple(t.shape) != tuple(params[index].shape):
                raise AnitaError(f"{where}: optimizer state {name} of parameter {index} has shape {tuple(t.shape)}, "
                                 f"the parameter {tuple(params[index].shape)}")


def flat_tensors(entry: dict):
    """(name, tensor) of one parameter's state, looking inside bitsandbytes' nested quant-state dict."""
    for name, value in entry.items():
        if isinstance(value, dict):
            yield from flat_tensors(value)
        elif isinstance(value, torch.Tensor):
            yield name, value


# ---------------------------------------------------------------------------------- RNG
def rng_tensors() -> dict[str, torch.Tensor]:
    """This process's RNG states as uint8 tensors: "torch" (CPU), "cuda/<i>" per visible GPU."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state.update({f"cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def set_rng_tensors(state: dict[str, torch.Tensor], where: str) -> None:
    for name, t in state.items():
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise AnitaError(f"{where}: RNG state {name!r} must be a 1-D uint8 tensor, got {t.dtype} {tuple(t.shape)}")
    if "torch" not in state:
        raise AnitaError(f"{where}: holds no 'torch' RNG state")
    try:
        torch.set_rng_state(state["torch"])
        cuda = [state[k] for k in sorted((k for k in state if k.startswith("cuda/")), key=lambda k: int(k[5:]))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    except (RuntimeError, ValueError) as e:
        raise AnitaError(f"{where}: not a valid RNG state ({e})") from None
