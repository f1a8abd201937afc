"""Where a model runs and in which mode: the device check every command shares, and `eval_mode`."""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import nn

from anita.errors import AnitaError


def parse_device(device) -> torch.device:
    """cpu, cuda or cuda:N, checked: an unavailable GPU is a clear error, not a traceback from torch."""
    name = str(device)
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise AnitaError(f"device must be cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AnitaError(f"device {name}: no CUDA device is available")
    return torch.device(name)


@contextmanager
def eval_mode(model: nn.Module):
    """Inside the `with`, the model is in eval mode (no dropout, LoRA's included); its mode is
    restored on exit, even if the body raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
