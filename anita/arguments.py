"""Command-line flags that several commands share (`anita generate`, `anita eval`)."""

from __future__ import annotations

import argparse

from anita.dtypes import WEIGHT_DTYPE_NAMES


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --adapter, --dtype, --device and --quantize: what `anita.lora.load_for_inference` takes."""
    p.add_argument("--model", required=True, help="HF-layout model directory or Hub id")
    p.add_argument("--adapter", help="LoRA adapter directory (PEFT format), applied on top of the model")
    p.add_argument("--dtype", default="float32", choices=WEIGHT_DTYPE_NAMES,
                   help="dtype of the weights (the compute dtype with --quantize nf4) (default: float32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--quantize", choices=["nf4"], help="load the base linears in 4-bit NF4 (default: full precision)")
