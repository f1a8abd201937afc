"""Data parallelism on torch.distributed: one process per device, launched by `torchrun`.

`torchrun --nproc-per-node N -m anita.cli sft ...` sets RANK, WORLD_SIZE and LOCAL_RANK; every
process loads the same model and data, takes every N-th micro-batch of each optimizer step, and
DistributedDataParallel (Li et al. 2020, *PyTorch Distributed*, arXiv 2006.15704) averages the
gradients of the trainable (LoRA) parameters across processes in the last backward pass of the
step. The frozen (4-bit) base is never communicated. Backend: gloo on CPU, NCCL on CUDA.
Without torchrun's variables everything here is a no-op for a single process.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from anita.runtime import parse_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "cpu") -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    parse_device(device)
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}" if world_size > 1 or device == "cuda" else device
        torch.cuda.set_device(device)
    info = DistInfo(rank, world_size, local_rank, torch.device(device))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if info.device.type == "cuda" else "gloo")
    return info


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum of `t` over all processes (a copy; `t` itself is unchanged)."""
    t = t.detach().clone()
    if info.enabled:  # NCCL reduces only tensors on the GPU
        on_device = t.to(info.device)
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
        t = on_device.to(t.device)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def wrap_ddp(module: nn.Module, info: DistInfo) -> nn.Module:
    """DDP around `module` when running under torchrun, else the module itself.

    broadcast_buffers=False: the buffers are the frozen base (packed 4-bit weights, RoPE
    frequencies), identical everywhere; re-sending them every forward would only cost time.
    """
    if not info.enabled:
        return module
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def maybe_no_sync(module: nn.Module, skip_sync: bool):
    """Accumulate locally, communicate on the step's last micro-batch: DDP's `no_sync()`, or for an
    FSDP2-sharded model (`--fsdp`) no reduce-scatter of its gradients until sync is on again."""
    if not skip_sync:
        return contextlib.nullcontext()
    if isinstance(module, DistributedDataParallel):
        return module.no_sync()
    sharded = next((m for m in module.modules() if isinstance(m, FSDPModule)), None)  # the root comes first
    return _no_gradient_sync(sharded) if sharded is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _no_gradient_sync(model):
    model.set_requires_gradient_sync(False)  # every sharded submodule too
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
