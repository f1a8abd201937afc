"""Command-line flags that several commands share (`anita generate`, `anita eval`), and the argparse
types of numeric flags: a finite float or an integer within bounds, checked as the flag is parsed."""

from __future__ import annotations

import argparse

from anita.dtypes import WEIGHT_DTYPE_NAMES
from anita.errors import AnitaError, check_number


def finite_float(low=None, high=None, *, low_open: bool = False, high_open: bool = False):
    """An argparse `type`: a finite float within the bounds. `nan`, `inf` and `1e400` (inf once
    parsed) are refused as the flag is parsed (exit 2, one line naming the flag), so a run never
    starts with them: torch's AdamW raises on an `lr` of nan, and a NaN `lora_alpha` trains nothing."""
    return _number_type(float, dict(low=low, high=high, low_open=low_open, high_open=high_open))


def int_range(low=None, high=None):
    """An argparse `type`: an integer in [low, high] (either bound optional)."""
    return _number_type(int, dict(low=low, high=high))


def _number_type(kind, bounds: dict):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        try:
            return check_number("", value, integer=kind is int, shown=repr(text), **bounds)
        except AnitaError as e:
            raise argparse.ArgumentTypeError(str(e).strip()) from None

    parse.__name__ = "finite float" if kind is float else "integer"  # argparse names the type in some errors
    return parse


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --adapter, --dtype, --device and --quantize: what `anita.lora.load_for_inference` takes."""
    p.add_argument("--model", required=True, help="HF-layout model directory or Hub id")
    p.add_argument("--adapter", help="LoRA adapter directory (PEFT format), applied on top of the model")
    p.add_argument("--dtype", default="float32", choices=WEIGHT_DTYPE_NAMES,
                   help="dtype of the weights (the compute dtype with --quantize nf4) (default: float32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--quantize", choices=["nf4"], help="load the base linears in 4-bit NF4 (default: full precision)")
