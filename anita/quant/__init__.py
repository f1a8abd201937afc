"""NF4 4-bit quantization (QLoRA, Dettmers et al. 2023): a plain-PyTorch NF4 bit-exact with
bitsandbytes (`nf4`), a frozen 4-bit linear (`linear`), in-place model quantization and memory
accounting (`model`). See docs/nf4.md."""

from anita.quant.linear import Linear4bit
from anita.quant.model import format_memory_report, memory_report, quantize_model
from anita.quant.nf4 import NF4State, dequantize_nf4, dynamic_code, nf4_code, quantize_nf4

__all__ = ["NF4State", "quantize_nf4", "dequantize_nf4", "nf4_code", "dynamic_code", "Linear4bit",
           "quantize_model", "memory_report", "format_memory_report"]
