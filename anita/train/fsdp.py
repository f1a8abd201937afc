"""Fully sharded data parallelism for QLoRA: `torchrun --nproc-per-node N -m anita.cli sft ... --fsdp`.

DDP (`anita.train.distributed`) keeps the whole frozen base on every process; FSDP2
(`torch.distributed.fsdp.fully_shard`; Zhao et al. 2023, *PyTorch FSDP*, arXiv 2304.11277) cuts
every parameter along dim 0 into N shards, one per process, and gathers a decoder block's
parameters just before its forward (and again before its backward), freeing them after. So each
process holds about 1/N of the base: the NF4 codes and block scales, held as frozen uint8
parameters for it (`Linear4bit.hold_as_parameters`), the norms, embeddings and output head. The
LoRA gradients are reduce-scattered (averaged over the processes, as DDP's all-reduce) onto the
shards, and each process's optimizer updates only its shard of A and B.

    for each decoder block:  fully_shard(block)       one all-gather per block per pass
    fully_shard(model)                                  the rest: embeddings, final norm, lm_head

The loss reads `lm_head.weight` itself (the chunked head, `anita.model.logprobs`) after
`model.hidden_states(...)`, which is registered as a forward method so that the root's parameters
are gathered for it and stay gathered until the backward is done (the root does not reshard after
forward).

Checkpoints of a sharded run go through torch.distributed.checkpoint: each process writes its
shards of the adapter and of the optimizer's moments into `dcp/`, which loads back in place; the
PEFT adapter beside them is gathered whole and written by rank 0 (`full_adapter`).
Backend: gloo on CPU, NCCL on CUDA (`anita.train.distributed.init_distributed`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from anita.errors import AnitaError
from anita.lora import lora_state_dict
from anita.quant import Linear4bit
from anita.train.distributed import DistInfo, all_reduce_sum

DCP_DIR = "dcp"  # a checkpoint's folder of sharded tensors (torch.distributed.checkpoint's files)


def check_fsdp(info: DistInfo) -> None:
    """--fsdp needs processes to shard over: refused (one line) in a single process."""
    if not info.enabled:
        raise AnitaError("--fsdp shards the model over the processes torchrun starts, but this is a single process: "
                         "launch it as `torchrun --nproc-per-node N -m anita.cli ...` (N >= 2), or drop --fsdp")


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of `t`: its shard of a DTensor, else `t` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (a collective: every process calls it), else `t` itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_model(model: nn.Module, info: DistInfo) -> dict:
    """Shard `model` (a Llama with LoRA applied) in place over the processes; returns what each
    holds of the frozen base (`base_bytes`)."""
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for m in quantized:
        m.hold_as_parameters()
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    register_fsdp_forward_method(model, "hidden_states")  # the loss calls it, not forward
    for m in quantized:  # fully_shard moved the parameters to the mesh's device; the code books follow
        m.state = m.state.to(info.device)
    return base_bytes(model, info)


def frozen_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The frozen base: parameters that take no gradient, and the NF4 states' small tensors."""
    held = [p for p in model.parameters() if not p.requires_grad]
    for m in model.modules():
        if isinstance(m, Linear4bit) and m.is_loaded:
            s = m.state
            held += [t for t in (s.absmax, s.code, s.absmax_scale, s.absmax_offset, s.absmax_code) if t is not None]
    return held


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()  # a DTensor's numel is the whole tensor's


def base_bytes(model: nn.Module, info: DistInfo) -> dict:
    """{"world_size", "base_bytes" (the whole base, as one process holds it without sharding),
    "base_bytes_per_rank" (what each process holds: its shards, plus the unsharded small tensors)}."""
    held = frozen_tensors(model)
    per_rank = torch.zeros(info.world_size, dtype=torch.float64)
    per_rank[info.rank] = sum(nbytes(local(t)) for t in held)
    per_rank = all_reduce_sum(per_rank, info)  # each process filled its own entry
    return {"world_size": info.world_size, "base_bytes": sum(nbytes(t) for t in held),
            "base_bytes_per_rank": [int(b) for b in per_rank.tolist()]}


# ---------------------------------------------------------------------------- checkpoints
def full_adapter(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors gathered whole (every process calls this; all get them), on the CPU."""
    return {k: whole(t).cpu() for k, t in lora_state_dict(model).items()}


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_sharded(folder: Path, model: nn.Module, optimizer) -> None:
    """Each process's shards of the adapter and the optimizer state into `folder` (every process calls this)."""
    state = {"model": trainable(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=folder)


@torch.no_grad()
def load_sharded(folder: Path, model: nn.Module, optimizer) -> None:
    """`save_sharded`'s tensors back, in place (every process calls this)."""
    state = {"model": trainable(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=folder)
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
