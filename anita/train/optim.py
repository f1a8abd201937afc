"""Optimizers and learning-rate schedules of the recipe.

- AdamW (Loshchilov & Hutter 2019, decoupled weight decay) from torch;
- 8-bit AdamW and paged 8-bit AdamW from bitsandbytes (Dettmers et al. 2022, *8-bit Optimizers
  via Block-wise Quantization*, arXiv 2110.02861; paging from QLoRA, arXiv 2305.14314 §3).
  The recipe's SFT uses paged 8-bit AdamW, its DPO plain 8-bit AdamW. bitsandbytes keeps the
  state of tensors under 4096 elements in 32 bits, and pages only on CUDA (on CPU it warns and
  runs the non-paged optimizer);
- warm-up then linear, cosine or constant learning rate, exactly the multipliers of Hugging Face's
  `get_{linear,cosine,constant}_schedule_with_warmup`, which the authors' TRL scripts use. As
  there, the multiplier at step 0 is 0 when warm-up is on: the first update uses lr = 0.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from anita.errors import AnitaError
from anita.quant.linear import import_bitsandbytes

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
SCHEDULES = ("linear", "cosine", "constant")


def build_optimizer(params, name: str, lr: float, weight_decay: float = 0.0,
                    betas=(0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW over `params` (every trainable parameter is decayed: they are all LoRA matrices)."""
    params = list(params)
    if not params:
        raise AnitaError("optimizer: no trainable parameters (apply LoRA to the model first)")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        bnb = import_bitsandbytes()
        if bnb is None:
            raise AnitaError(f"optimizer {name!r} needs bitsandbytes, which cannot be imported; use 'adamw'")
        cls = bnb.optim.AdamW8bit if name == "adamw_8bit" else bnb.optim.PagedAdamW8bit
        return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise AnitaError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


def optimizer_for(name: str, device: torch.device) -> str:
    """The optimizer a run builds on `device`: bitsandbytes pages optimizer state between GPU and CPU
    memory only on CUDA (on CPU it warns and runs the plain 8-bit AdamW), so paged_adamw_8bit is
    adamw_8bit there."""
    return "adamw_8bit" if name == "paged_adamw_8bit" and device.type != "cuda" else name


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float | None) -> int:
    """Warm-up length: `ceil(ratio · total)` when a ratio is given (as HF), else `warmup_steps`."""
    return math.ceil(warmup_ratio * total_steps) if warmup_ratio is not None else warmup_steps


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """The factor applied to the peak lr at optimizer step `step` (0-based)."""
    if schedule not in SCHEDULES:
        raise AnitaError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return step / max(1, warmup_steps)  # 0, 1/w, 2/w, ...
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)  # 0 -> 1 over the decay
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # half a cosine, 1 -> 0
    return 1.0  # constant


def build_scheduler(optimizer, warmup_steps: int, total_steps: int, schedule: str) -> LambdaLR:
    lr_multiplier(0, warmup_steps, total_steps, schedule)  # raise now for an unknown schedule
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, warmup_steps, total_steps, schedule))
