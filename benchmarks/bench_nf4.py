"""NF4 side by side: `python benchmarks/bench_nf4.py [--device cpu|cuda] [--shape 2048x8192] [--tokens 1,128]`.

Times, on one weight of shape (O, I) (default 8192 x 2048, Llama-3.2-1B's gate/up projection):
- quantize:   anita `quantize_nf4` vs bitsandbytes `quantize_4bit(quant_type="nf4")`;
- dequantize: anita `dequantize_nf4` (plain PyTorch) vs bitsandbytes `dequantize_4bit`;
- 4-bit matmul for T tokens: anita `Linear4bit` with backend "torch" (dequantize + F.linear) and
  backend "bnb" (bitsandbytes `matmul_4bit`), raw `bitsandbytes.matmul_4bit`, and a dense
  `F.linear` with the bf16 weight as the yardstick.
All with double quantization, blocksize 64, bf16 compute (the QLoRA recipe). Each number is the
median of `--repeats` timed calls after warm-up; on CUDA every call is synchronised.
Reference: QLoRA (Dettmers et al. 2023) §3; bitsandbytes is the implementation compared against.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from anita.quant import Linear4bit, dequantize_nf4, quantize_nf4  # noqa: E402
from anita.quant.linear import import_bitsandbytes  # noqa: E402


def timed(fn, device: str, repeats: int, warmup: int = 2) -> float:
    """Median seconds of `fn()` over `repeats` calls, after `warmup` untimed ones."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rows_for(O: int, I: int, tokens: list[int], device: str, repeats: int) -> list[tuple[str, str, float]]:
    """(operation, implementation, seconds) for every measurement."""
    bnb = import_bitsandbytes()
    gen = torch.Generator(device=device).manual_seed(0)
    w = (torch.randn(O, I, generator=gen, device=device) * 0.02).bfloat16()  # (O, I)
    rows = [("quantize", "anita quantize_nf4", timed(lambda: quantize_nf4(w), device, repeats))]
    packed, state = quantize_nf4(w)
    rows.append(("dequantize", "anita dequantize_nf4", timed(lambda: dequantize_nf4(packed, state), device, repeats)))
    layers = {b: Linear4bit.from_linear(_linear(w), backend=b) for b in ("torch", "bnb") if b == "torch" or bnb}
    if bnb:
        P, qs = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        rows.append(("quantize", "bitsandbytes quantize_4bit", timed(
            lambda: bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"),
            device, repeats)))
        rows.append(("dequantize", "bitsandbytes dequantize_4bit",
                     timed(lambda: bnb.functional.dequantize_4bit(P, qs), device, repeats)))
    with torch.no_grad():
        for T in tokens:
            x = torch.randn(1, T, I, generator=gen, device=device).bfloat16()  # (1, T, I)
            op = f"matmul T={T}"
            rows.append((op, "dense bf16 F.linear", timed(lambda: F.linear(x, w), device, repeats)))
            for backend, layer in layers.items():
                rows.append((op, f"anita Linear4bit({backend})", timed(lambda: layer(x), device, repeats)))
            if bnb:
                rows.append((op, "bitsandbytes matmul_4bit",
                             timed(lambda: bnb.matmul_4bit(x, P, quant_state=qs), device, repeats)))
    return rows


def _linear(w: torch.Tensor) -> torch.nn.Linear:
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    linear.weight = torch.nn.Parameter(w, requires_grad=False)
    return linear


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shape", default="8192x2048", help="O x I of the weight")
    p.add_argument("--tokens", default="1,128", help="comma-separated token counts for the matmul")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.threads:
        torch.set_num_threads(args.threads)
    O, I = (int(n) for n in args.shape.lower().split("x"))
    rows = rows_for(O, I, [int(t) for t in args.tokens.split(",")], args.device, args.repeats)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'CPU'}, " \
        f"{torch.get_num_threads()} torch threads"
    bnb = import_bitsandbytes()
    print(f"$ python benchmarks/bench_nf4.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"weight {O} x {I} bf16, blocksize 64, double quant; {where}; torch {torch.__version__}, "
          f"bitsandbytes {bnb.__version__ if bnb else 'absent'}; median of {args.repeats}\n")
    print("| operation | implementation | ms | vs first row |")
    print("|---|---|---|---|")
    first: dict[str, float] = {}
    for op, impl, s in sorted(rows, key=lambda r: [r[0] for r in rows].index(r[0])):  # group by operation
        first.setdefault(op, s)
        print(f"| {op} | {impl} | {1e3 * s:.2f} | {s / first[op]:.2f}x |")


if __name__ == "__main__":
    main()
