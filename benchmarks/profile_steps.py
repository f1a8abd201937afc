"""Where anita's time and memory go: torch.profiler over one step of each benchmark.

    python benchmarks/profile_steps.py [--only forward,decode,sft,sft-recipe,dpo,dpo-recipe] [--quick] [--rows 15] [--head-dtype bf16] [--trace DIR]

Builds exactly the step `run.py` times (`anita_side.py`, same workload), runs it once to warm up,
then once under `torch.profiler` with memory profiling, and prints the operators sorted by self
CPU time (and self CUDA time on GPU) with their self memory. `--trace` also writes Chrome traces.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from benchmarks import anita_side  # noqa: E402
from benchmarks.common import BENCHES, default_workload, model_dir  # noqa: E402


def profile_one(bench: str, w, rows: int, trace: Path | None, shapes: bool = False) -> str:
    path = model_dir(w)
    args = (path, w, w.forward_dtypes[0]) if bench == "forward" else (path, w)
    step, _ = getattr(anita_side, f"{bench.replace('-', '_')}_step")(*args)
    step()  # warm-up: first-call allocations and lazy inits stay out of the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if w.device == "cuda" else [])
    with profile(activities=activities, profile_memory=True, record_shapes=shapes) as prof:
        with record_function(f"anita {bench} step"):
            step()
    if trace is not None:
        trace.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace / f"anita-{bench}.json"))
    sort = "self_cuda_time_total" if w.device == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages(group_by_input_shape=shapes)
    return averages.table(sort_by=sort, row_limit=rows, max_name_column_width=48,
                          max_shapes_column_width=60 if shapes else None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default=",".join(BENCHES))
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--threads", type=int)
    p.add_argument("--shapes", action="store_true", help="group the operators by input shapes too")
    p.add_argument("--checkpointing", choices=("full", "selective", "off"))
    p.add_argument("--head-dtype", dest="head_dtype", choices=("fp32", "bf16"), help="anita's loss head matmuls")
    p.add_argument("--trace", type=Path, help="write Chrome traces (anita-<bench>.json) here")
    args = p.parse_args(argv)
    w = default_workload(args.device, args.quick)
    if args.threads:
        w.threads = args.threads
    if args.checkpointing:
        w.checkpointing = args.checkpointing
    if args.head_dtype:
        w.head_dtype = args.head_dtype
    torch.set_num_threads(w.threads)
    for bench in args.only.split(","):
        print(f"\n=== anita {bench} ({w.device}, B={w.batch}, T={w.seq_len}) ===")
        print(profile_one(bench, w, args.rows, args.trace, args.shapes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
