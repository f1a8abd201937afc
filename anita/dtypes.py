"""The dtype policy, in one place.

- Weights (a model's, the NF4 code's input and output, a 4-bit layer's compute) are fp32, bf16
  or fp16; LoRA matrices are fp32 or bf16 (fp16 adapters overflow in training).
- The numerically sensitive steps (RMSNorm, softmax, log-softmax, the losses) run in fp32 whatever
  their inputs are, or in fp64 when an input is fp64 (for gradcheck).
- A training run's `--precision` is fp32, or bf16 autocast over fp32 master weights. A bare command
  takes bf16 where the device computes it natively (`bf16_native`), as TRL trains, with the output
  head's matmuls in bf16 and, over an NF4 base, bf16 adapters (`training_dtypes`); `--precision fp32`
  is the exact reference mode: everything in fp32. `$ANITA_PRECISION` sets a bare command's precision
  on a machine (the test suite pins fp32).
Anything else raises `AnitaError`; nothing is guessed.
"""

from __future__ import annotations

import os

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
PRECISION_ENV = "ANITA_PRECISION"  # a bare command's --precision, where set (else from the device)


def bf16_native(device) -> bool:
    """Whether `device` computes bf16 natively: a CUDA GPU of compute capability 8.0 or later (Ampere:
    A100, RTX 30xx, H100, ...; not through emulation), or a CPU with AVX512-BF16 or AMX instructions.
    Elsewhere torch still runs bf16, emulated and slower than fp32 (AVX2 or plain AVX-512, a V100, a T4)."""
    device = _device(device)
    if device is not None and device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return device is not None and device.type == "cpu" and \
        (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def training_dtypes(device, qlora: bool, precision: str | None = None, head_dtype: str | None = None,
                    adapter_dtype: str | None = None) -> tuple[str, str, str]:
    """(precision, head_dtype, adapter_dtype) of a training run, each "fp32" or "bf16": the ones given,
    and for those left None what a TRL user gets. precision: $ANITA_PRECISION when set (a site's own
    default; the test suite sets fp32), else bf16 where `device` computes it natively, else fp32.
    head_dtype: the precision's (HF runs lm_head under autocast; the log-softmax stays fp32).
    adapter_dtype: bf16 over an NF4 base in bf16 (TRL casts a quantized model's LoRA weights to bf16,
    as the QLoRA paper does), else fp32. So `--precision fp32` alone makes every one fp32."""
    if precision is None and os.environ.get(PRECISION_ENV):
        precision = os.environ[PRECISION_ENV]
        if precision not in PRECISIONS:
            raise AnitaError(f"${PRECISION_ENV}: expected {' or '.join(PRECISIONS)}, got {precision!r}")
    precision = precision or ("bf16" if bf16_native(device) else "fp32")
    head_dtype = head_dtype or precision
    adapter_dtype = adapter_dtype or ("bf16" if qlora and precision == "bf16" else "fp32")
    return precision, head_dtype, adapter_dtype


def check_bf16_device(device, what: str) -> None:
    """AnitaError for bf16 on a GPU that has none (compute capability below 8.0, e.g. V100, T4), where
    torch would emulate it many times slower. CPUs run it everywhere (natively with AVX512-BF16/AMX); a
    bad device name or an unavailable GPU is left to `anita.runtime.parse_device`'s error."""
    device = _device(device)
    if device is not None and device.type == "cuda" and torch.cuda.is_available() and not bf16_native(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise AnitaError(f"{what}: {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no "
                         "bf16 (it needs 8.0 or later); train in fp32: --precision fp32, with no bf16 --head-dtype "
                         "or --adapter-dtype")


def _device(device) -> torch.device | None:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):  # not a device: `anita.runtime.parse_device` says so
        return None


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
