"""The model being trained: the base checkpoint (in 4-bit NF4 for QLoRA) with LoRA on its linears.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314): the base linears are frozen in NF4 with double
quantization and compute in the training dtype; only the LoRA matrices (fp32) are trained.
Shared by SFT and DPO.
"""

from __future__ import annotations

import torch

from anita.dtypes import PRECISIONS
from anita.lora import LoraConfig, apply_lora, load_adapter
from anita.model import from_pretrained
from anita.model.fused import set_fused_projections
from anita.train.config import TrainConfig, checkpoint_mode
from anita.train.distributed import DistInfo


def lora_config(cfg: TrainConfig) -> LoraConfig:
    targets = "all-linear" if cfg.targets == ["all-linear"] else tuple(cfg.targets)
    return LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=targets,
                      use_rslora=cfg.rslora)


def load_trainable_model(cfg: TrainConfig, info: DistInfo):
    """(model, LoraReport): the base loaded on this process's device, LoRA applied, the rest frozen.

    The LoRA init is seeded with --seed, so every process starts from the same adapter.
    With `cfg.adapter` (a PEFT adapter directory) that adapter is loaded and trained further instead
    of a fresh one.
    """
    dtype = PRECISIONS[cfg.precision]
    quant = {"quantize": "nf4", "quantize_kwargs": {"compute_dtype": dtype}} if cfg.qlora else {}
    model = from_pretrained(cfg.model, dtype=dtype, device=info.device, **quant)
    model.checkpointing = checkpoint_mode(cfg)
    model.head_dtype = None if cfg.head_dtype == "fp32" else PRECISIONS[cfg.head_dtype]
    torch.manual_seed(cfg.seed)
    report = load_adapter(model, cfg.adapter) if cfg.adapter else apply_lora(model, lora_config(cfg))
    set_fused_projections(model, cfg.fused_projections)
    return model, report
