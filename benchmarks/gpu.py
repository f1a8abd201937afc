"""The one prepared GPU command: `python -m benchmarks.gpu [--json OUT]`, and its CPU rehearsal
`python -m benchmarks.gpu --smoke --json OUT`.

On a CUDA machine (under 8 minutes on one H100) it runs

1. the CUDA tests: tests/test_cuda.py, tests/model/test_varlen.py (FlashAttention's varlen kernel
   against the mask path), tests/quant/test_matmul.py (the NF4 matmul against bitsandbytes');
2. the NF4 linear alone: anita's `nf4_matmul` (bitsandbytes' CUDA dequantization into a reused
   buffer, cuBLAS forward and backward) against bitsandbytes' `matmul_4bit`, on an 8B MLP shape;
3. on a Llama-3.1-8B-shaped random model built on the GPU, with what a bare `anita sft` / `anita dpo`
   does on a bf16 GPU (bf16 compute, bf16 head matmuls, bf16 adapters, full checkpointing):
   - sft: QLoRA SFT on one row packed to T=2048, anita against transformers + PEFT (SDPA attention,
     TRL's fused LM head, gradient checkpointing, adapters cast to bf16 as SFTTrainer does);
   - dpo: the DPO recipe's shape (prompts ~400 tokens, answers 70-150), anita's shared-prompt rows
     (FlashAttention varlen) against TRL's two rows per pair,
   printing tokens/s, peak GiB and MFU (against a measured bf16 matmul peak) for each side.

`--smoke` runs the same code on the CPU with a tiny random model (`random:tiny`, short rows) in a few
minutes: the CPU-side tests of those files, the two workloads for both systems. `--json OUT` writes
one row per (workload, system): {workload, system, tokens_per_s, peak_mib, device, ...} (MFU only on
the GPU, where the bf16 peak probe takes seconds); RESULTS.md
takes its numbers from there. Every (workload, system) runs in its own process (`benchmarks/run.py`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TEST_FILES = ("tests/test_cuda.py", "tests/model/test_varlen.py", "tests/quant/test_matmul.py")
# workload name -> (benchmarks/run.py job, Workload overrides): the GPU shapes, then the smoke ones
WORKLOADS = {"sft": ("sft", {"batch": 1, "seq_len": 2048}), "dpo": ("dpo-recipe", {"batch": 4})}
SMOKE = {"sft": {"batch": 1, "seq_len": 256},
         "dpo": {"batch": 2, "recipe_prompt": (35, 45), "recipe_answer": (7, 15), "recipe_max_length": 128}}


def workload(name: str, smoke: bool):
    """The benchmarks/run.py Workload of one named workload: a bare command's dtypes on a bf16 device."""
    from benchmarks.common import Workload, default_workload

    base = Workload(device="cpu", model="random:tiny", repeats=2, warmup=1) if smoke else default_workload("cuda", False)
    job, shape = WORKLOADS[name]
    w = replace(base, head_dtype="bf16", adapter_dtype="bfloat16", train_dtype="bfloat16", checkpointing="full",
                **(SMOKE[name] if smoke else shape))
    return job, w


def run_tests(smoke: bool) -> dict:
    """pytest over the CUDA test files (on CPU their CUDA tests skip); the summary line and the exit code."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_FILES],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    print(f"tests ({'CPU' if smoke else 'CUDA'}): {summary}", flush=True)
    return {"workload": "tests", "system": "anita", "device": "cpu" if smoke else "cuda", "returncode": proc.returncode,
            "summary": summary}


def nf4_matmul_rows(device: str, smoke: bool) -> list[dict]:
    """x Ŵᵀ forward + backward (to x) for the 8B MLP's up projection (4096 -> 14336, 2048 tokens; tiny on
    CPU): anita's `nf4_matmul` path through `Linear4bit` against bitsandbytes' `matmul_4bit`."""
    import bitsandbytes as bnb

    from anita.quant import Linear4bit
    from anita.quant.linear import bnb_quant_state
    from benchmarks.common import peak_memory_mib, reset_peak_memory, sync

    I, O, N = (256, 512, 128) if smoke else (4096, 14336, 2048)
    dtype = torch.bfloat16
    layer = Linear4bit.from_linear(torch.nn.Linear(I, O, bias=False, device=device), compute_dtype=dtype,
                                   backend="bnb")
    x = torch.randn(N, I, device=device, dtype=dtype, requires_grad=True)
    state = bnb_quant_state(layer.state, dtype)
    sides = {"anita": lambda: layer(x), "bnb": lambda: bnb.matmul_4bit(x, layer.weight, quant_state=state)}
    rows = []
    for system, fn in sides.items():
        for _ in range(3):
            fn().sum().backward()
        sync(device)
        reset_peak_memory(device)
        start, repeats = time.perf_counter(), 5 if smoke else 20
        for _ in range(repeats):
            fn().sum().backward()
        sync(device)
        seconds = (time.perf_counter() - start) / repeats
        rows.append({"workload": "nf4-linear", "system": system, "device": device, "tokens_per_s": N / seconds,
                     "peak_mib": peak_memory_mib(device), "shape": [N, I, O]})
    return rows


def benchmark_rows(name: str, smoke: bool, log) -> list[dict]:
    """One workload, both systems, each in a fresh process; MFU against the measured bf16 peak."""
    from benchmarks.run import run_setting

    job, w = workload(name, smoke)
    # no MFU in the smoke run: a CPU without native bf16 takes minutes over the peak probe's bf16 GEMMs
    results, _, peak = run_setting(w, [job], ["anita", "hf"], log, probe=not smoke)
    rows = []
    for system in ("anita", "hf"):
        r = results[system, job]
        rows.append({"workload": name, "system": system, "device": w.device, "tokens_per_s": r.get("tok_s"),
                     "peak_mib": r.get("peak_mib"), "mfu": r.get("mfu"), "error": r.get("error"),
                     "job": job, "settings": json.loads(w.to_json()), "peak_tflops": peak.get("tflops"),
                     "loss": r.get("info", {}).get("loss")})
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| workload | system | tokens/s | peak GiB | MFU % |\n|---|---|---:|---:|---:|")
    for r in rows:
        if r["workload"] == "tests":
            continue
        tps = "error" if r.get("error") else f"{r['tokens_per_s']:,.0f}"
        mfu = f"{100 * r['mfu']:.1f}" if r.get("mfu") else "—"
        peak = f"{r['peak_mib'] / 1024:.2f}" if r.get("peak_mib") is not None else "—"
        print(f"| {r['workload']} | {r['system']} | {tps} | {peak} | {mfu} |")
    by = {(r["workload"], r["system"]): r for r in rows}
    for name, other in (("sft", "hf"), ("dpo", "hf"), ("nf4-linear", "bnb")):
        a, b = by.get((name, "anita")), by.get((name, other))
        if a and b and a.get("tokens_per_s") and b.get("tokens_per_s"):
            print(f"- {name}: anita / {other} = {a['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s, "
                  f"{a['peak_mib'] / b['peak_mib']:.2f}x peak memory")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="the same code on the CPU with a tiny random model")
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--only", default="tests,nf4,sft,dpo", help="comma-separated subset of tests,nf4,sft,dpo")
    args = p.parse_args(argv)
    parts = [s for s in args.only.split(",") if s]
    unknown = sorted(set(parts) - {"tests", "nf4", "sft", "dpo"})
    if unknown:
        print(f"benchmarks.gpu: --only: unknown part(s) {', '.join(unknown)}; expected some of tests,nf4,sft,dpo",
              file=sys.stderr)
        return 2
    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA device here; `python -m benchmarks.gpu --smoke` runs the same code on the CPU",
              file=sys.stderr)
        return 2
    device, start, rows = ("cpu" if args.smoke else "cuda"), time.time(), []
    if torch.cuda.is_available() and not args.smoke:
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    if "tests" in parts:
        rows.append(run_tests(args.smoke))
    if "nf4" in parts:
        rows += nf4_matmul_rows(device, args.smoke)
    for name in ("sft", "dpo"):
        if name in parts:
            rows += benchmark_rows(name, args.smoke, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print_table(rows)
    print(f"\ntotal {time.time() - start:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    failed = any(r.get("returncode") or r.get("error") for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
