"""`batch_size="auto"` for the harness model (anita.eval.harness): the largest batch that fits.

lm-evaluation-harness's `hf` model (`HFLM._detect_batch_size`) starts at `max_batch_size` (64) and
runs a forward pass of that many rows of the longest length, shrinking the batch on an out-of-memory
error; `auto:N` finds it anew N times over the loglikelihood requests, longest first, so the shorter
ones get bigger batches. anita does the same with two differences, both of speed only (a request's
score does not depend on the rows beside it, up to float32 rounding):

- the batch halves on each failure (64, 32, ..., 1), where accelerate's search takes 0.9 of it;
- on CUDA the probe is real: the scoring forward of B rows of T tokens plus a KV cache of that size
  (what generation and the shared-context path hold), retried smaller on `torch.cuda.OutOfMemoryError`.
  On the CPU running out of memory kills the process instead of raising, so the batch is the largest
  whose estimated activations fit in half of the memory available now (`MemAvailable`): per token
  6·D + 3·I (residual stream, attention projections, the SwiGLU MLP) + H·T (the attention scores)
  + 2·L·K·E (the KV cache) values of the model's dtype.

Shapes: B batch rows, T tokens per row, D model dim, I MLP dim, H heads, K kv heads, E head dim, L layers.
"""

from __future__ import annotations

import os
import re

import torch

from anita.errors import AnitaError
from anita.eval.scoring import score_pairs
from anita.model.llama import KVCache

DEFAULT_MAX_BATCH_SIZE = 64  # HFLM's


def parse_batch_size(value, name: str = "batch_size") -> tuple[int | None, int | None]:
    """(rows, None) for a number, (None, N) for "auto" (N = 1) or "auto:N": how many times the
    loglikelihood batch size is found anew. `name` is how the user gave it, for the error."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value, None
    text = str(value).strip()
    match = re.fullmatch(r"auto(?::(\d+))?", text)
    if match and int(match.group(1) or 1) >= 1:
        return None, int(match.group(1) or 1)
    if re.fullmatch(r"[-+]?\d+", text):
        if int(text) >= 1:
            return int(text), None
        raise AnitaError(f"{name} must be at least 1, got {text}")
    raise AnitaError(f"{name} must be a whole number >= 1, auto or auto:N (N >= 1 times the loglikelihood "
                     f"batch size is found anew), got {text!r}")


def largest_batch(fits, max_batch_size: int) -> int:
    """The first of max_batch_size, its half, its quarter, ... for which `fits(B)` holds; 1 if none."""
    batch = max_batch_size
    while batch > 1 and not fits(batch):
        batch //= 2
    return max(batch, 1)


def estimated_bytes(config, rows: int, length: int, dtype: torch.dtype) -> int:
    """The activation memory of a forward of `rows` × `length` tokens, as the module docstring counts it."""
    c = config
    per_token = (6 * c.hidden_size + 3 * c.intermediate_size + c.num_attention_heads * length
                 + 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim)
    return rows * length * per_token * torch.finfo(dtype).bits // 8


def available_memory() -> int:
    """Bytes of memory available now: /proc/meminfo's MemAvailable, else the free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def cuda_fits(model, rows: int, length: int) -> bool:
    """Whether the scoring forward of `rows` × `length` tokens, beside a KV cache as large, runs on the GPU."""
    cache = None
    try:
        cache = KVCache(model.config, rows, length, dtype=model.dtype, device=model.device)
        score_pairs(model, [([0] * length, [0])] * rows, greedy=True)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del cache  # before the allocator hands its memory back
        torch.cuda.empty_cache()


def auto_batch_size(model, length: int, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE) -> int:
    """The largest batch (a power-of-two fraction of `max_batch_size`) of rows of `length` tokens that fits."""
    if model.device.type == "cuda":
        return largest_batch(lambda rows: cuda_fits(model, rows, length), max_batch_size)
    budget = available_memory() // 2
    return largest_batch(lambda rows: estimated_bytes(model.config, rows, length, model.dtype) <= budget,
                         max_batch_size)
