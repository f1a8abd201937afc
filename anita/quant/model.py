"""Quantizing a model in place (QLoRA's recipe: the attention and MLP projections in NF4, the
embeddings, norms and output head in full precision) and accounting for the memory it holds.

Reference: Dettmers et al. 2023 (QLoRA), §3 and §4 — the QLoRA models quantize every linear
layer of the transformer blocks; the bits-per-parameter arithmetic of double quantization
(4 + 8/64 + 32/(64·256) ≈ 4.127 bits instead of 4 + 32/64 = 4.5) is from §3.
"""

from __future__ import annotations

import torch
from torch import nn

from anita.errors import AnitaError
from anita.quant.linear import Linear4bit

OUTPUT_LAYER = "lm_head"  # kept in full precision by default, as QLoRA does


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _target_linears(model: nn.Module, targets: tuple[str, ...] | None) -> list[str]:
    """Names of the nn.Linear modules whose name ends with a target (None: every one but the output
    layer); unknown targets raise."""
    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if type(m) is nn.Linear]
    if targets is None:
        return [n for n in linears if not _matches(n, OUTPUT_LAYER)]
    for t in targets:
        if any(_matches(n, t) for n in linears):
            continue
        others = [f"{n} ({type(m).__name__})" for n, m in modules.items() if n and _matches(n, t)]
        if others:
            raise AnitaError(f"quantize_model: target {t!r} names {others[0]}, not an nn.Linear; "
                             "only linear layers can be quantized")
        known = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise AnitaError(f"quantize_model: target {t!r} matches no nn.Linear in the model; "
                         f"linear names end with: {', '.join(known)}")
    return [n for n in linears if any(_matches(n, t) for t in targets)]


def quantize_model(model: nn.Module, targets=None, blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype = torch.bfloat16, backend: str | None = None) -> nn.Module:
    """Replace, in place, every nn.Linear whose name ends with one of `targets` by a `Linear4bit`;
    by default every nn.Linear but `lm_head` (for Llama: the seven projections of each block).

    On a model whose weights are real tensors each linear is quantized on its device; on a
    model built on the meta device empty 4-bit layers are inserted, to be filled tensor by
    tensor by the checkpoint loader (`anita.model.from_pretrained(path, quantize="nf4")`).
    Embeddings and `lm_head` stay in full precision unless named; a linear whose weight is
    shared with another module (a tied `lm_head`) cannot be quantized.
    """
    targets = (targets,) if isinstance(targets, str) else None if targets is None else tuple(targets)
    if targets == ():
        raise AnitaError("quantize_model: targets is empty; name at least one linear layer")
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    for name in _target_linears(model, targets):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if uses.get(id(linear.weight), 0) > 1:
            raise AnitaError(f"quantize_model: {name}.weight is shared with another module "
                             "(tied embeddings); leave it out of targets")
        kwargs = dict(blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype, backend=backend)
        if linear.weight.is_meta:
            if linear.bias is not None:
                raise AnitaError(f"quantize_model: {name} has a bias; Linear4bit holds bias-free linears only")
            new = Linear4bit(linear.in_features, linear.out_features, device="meta", **kwargs)
        else:
            new = Linear4bit.from_linear(linear, **kwargs)
        setattr(parent, child, new.train(linear.training))
    return model


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def memory_report(model: nn.Module) -> dict:
    """Bytes the model's tensors hold, split into 4-bit linears and everything else.

    "quantized": the Linear4bit layers — params = O·I weights they stand for, bytes = packed
    codes + all their state (absmax codes, scales, code books); "full_precision": all other
    parameters (tied ones once) and buffers. bits_per_param = 8 · bytes / params.
    """
    seen: set[int] = set()
    q = {"modules": 0, "params": 0, "bytes": 0}
    fp = {"params": 0, "bytes": 0}
    for module in model.modules():
        if isinstance(module, Linear4bit):
            q["modules"] += 1
            q["params"] += module.in_features * module.out_features
            q["bytes"] += module.nbytes()
            seen.update(id(b) for b in module.buffers(recurse=False))
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                fp["params"] += p.numel()
                fp["bytes"] += _nbytes(p)
        for b in module.buffers(recurse=False):
            if id(b) not in seen:
                seen.add(id(b))
                fp["bytes"] += _nbytes(b)
    q["bits_per_param"] = 8 * q["bytes"] / q["params"] if q["params"] else 0.0
    params, nbytes = q["params"] + fp["params"], q["bytes"] + fp["bytes"]
    total = {"params": params, "bytes": nbytes, "bytes_per_param": nbytes / params if params else 0.0,
             "bf16_bytes": 2 * params}
    return {"quantized": q, "full_precision": fp, "total": total}


def format_memory_report(report: dict) -> str:
    """A small table of `memory_report(model)`, in MiB."""
    q, fp, t = report["quantized"], report["full_precision"], report["total"]
    mib = lambda n: f"{n / 2**20:10.2f} MiB"  # noqa: E731
    rows = [
        f"{'':16}{'params':>14}{'memory':>15}{'bits/param':>12}",
        f"{'4-bit linears':16}{q['params']:>14,}{mib(q['bytes']):>15}{q['bits_per_param']:>12.3f}",
        f"{'full precision':16}{fp['params']:>14,}{mib(fp['bytes']):>15}"
        f"{8 * fp['bytes'] / max(fp['params'], 1):>12.3f}",
        f"{'total':16}{t['params']:>14,}{mib(t['bytes']):>15}{8 * t['bytes_per_param']:>12.3f}",
        f"(the same parameters in bf16: {t['bf16_bytes'] / 2**20:.2f} MiB; {q['modules']} 4-bit linears)",
    ]
    return "\n".join(rows)
