"""The dtype policy, in one place.

- Weights (a model's, the NF4 code's input and output, a 4-bit layer's compute) are fp32, bf16
  or fp16; LoRA matrices are fp32 or bf16 (fp16 adapters overflow in training).
- The numerically sensitive steps (RMSNorm, softmax, log-softmax, the losses) run in fp32 whatever
  their inputs are, or in fp64 when an input is fp64 (for gradcheck).
- A training run's `--precision` is fp32, or bf16 autocast over fp32 master weights.
Anything else raises `AnitaError`; nothing is guessed.
"""

from __future__ import annotations

import torch

from anita.errors import AnitaError

# Names a user may write, for every dtype anita accepts anywhere.
NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
         "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # order = NF4's saved dtype ids: never reorder
ADAPTER_DTYPES = (torch.float32, torch.bfloat16)
MATH_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what the losses accept
WEIGHT_DTYPE_NAMES = ("float32", "bfloat16", "float16")  # the CLI's --dtype choices
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}  # a training run's --precision


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(value, allowed: tuple[torch.dtype, ...] = WEIGHT_DTYPES, what: str = "dtype") -> torch.dtype:
    """A torch dtype or its name ("bf16", "bfloat16", ...) -> the dtype, if it is one of `allowed`."""
    dtype = NAMES.get(value) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or dtype not in allowed:
        raise AnitaError(f"{what}: dtype {value!r} is not supported; expected {_one_of(allowed)}")
    return dtype


def _one_of(dtypes) -> str:
    names = [dtype_name(d) for d in dtypes]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def math_dtype(*tensors: torch.Tensor, what: str = "input") -> torch.dtype:
    """The dtype the losses compute in: fp32, or fp64 when any input is fp64. Other dtypes raise."""
    for t in tensors:
        if t.dtype not in MATH_INPUT_DTYPES:
            raise AnitaError(f"{what}: dtype {t.dtype} is not supported; expected {_one_of(MATH_INPUT_DTYPES)}")
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
