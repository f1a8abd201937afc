"""anita vs. the Hugging Face stack, side by side: `python benchmarks/run.py [--device cpu|cuda] [--quick]`.

Measures forward/prefill and greedy-decode throughput, a QLoRA SFT step and a DPO step, each also
in its recipe's data shape (`sft-recipe`, `dpo-recipe`): tokens/s and peak memory for both systems
on the same model, batch and settings, and prints one Markdown table with both and their ratio
(anita / HF). Every (system, benchmark) runs in its own fresh Python process (this file re-invoked
with `--worker`), so peaks never mix; each reports the median of `repeats` timed steps after
`warmup` untimed ones. What each side runs is in
`anita_side.py` and `hf_side.py`; workloads, timing and memory probes in `common.py`.
Targets are those of issue 8 (CPU, anita / HF in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from anita.model.logprobs import DEFAULT_CHUNK_SIZE  # noqa: E402
from benchmarks.common import (BENCHES, SYSTEMS, Workload, default_workload, step_flops_per_token)  # noqa: E402

# (benchmark, metric) -> (target ratio anita/HF, "min" = at least, "max" = at most)
TARGETS = {("forward", "tok/s"): (1.3, "min"), ("decode", "tok/s"): (2.0, "min"),
           ("sft", "tok/s"): (2.0, "min"), ("sft", "peak MiB"): (0.5, "max"),
           ("sft-recipe", "tok/s"): (2.0, "min"), ("sft-recipe", "peak MiB"): (0.5, "max"),
           ("dpo", "tok/s"): (2.5, "min"), ("dpo", "peak MiB"): (0.5, "max"),
           ("dpo-recipe", "tok/s"): (2.5, "min"), ("dpo-recipe", "peak MiB"): (0.5, "max")}


# --------------------------------------------------------------------------------- worker
def tokens_per_step(bench: str, w: Workload, info: dict) -> int:
    """Real tokens a step processes (padding not counted: the recipe-shaped and DPO steps report their own count)."""
    if "num_tokens" in info:
        return info["num_tokens"]
    return {"forward": w.batch * w.seq_len, "decode": w.decode_batch * w.decode_new, "sft": w.batch * w.seq_len}[bench]


def run_worker(system: str, job: str, w: Workload) -> dict:
    """Set up one system's step for one benchmark, time it, and return the measurements."""
    import torch

    from benchmarks.common import model_dir, time_steps

    torch.set_num_threads(w.threads)
    torch.manual_seed(w.seed)
    side = __import__(f"benchmarks.{system}_side", fromlist=["_"])
    bench, _, dtype = job.partition(":")
    path = model_dir(w)
    make = getattr(side, f"{bench.replace('-', '_')}_step")
    step, info = make(path, w, dtype) if dtype else make(path, w)
    result = time_steps(step, w)
    config = json.loads((Path(path) / "config.json").read_text())
    tps = tokens_per_step(bench, w, info) / result["median_s"]
    result |= {"system": system, "job": job, "tok_s": tps, "info": info,
               "step_mib": result["peak_mib"] - result["start_mib"]}
    if bench != "decode":  # MFU against the measured peak is filled in by the parent
        result["flops_per_token"] = step_flops_per_token(bench, config, round(info.get("mean_len", w.seq_len)))
    return result


def run_probe(w: Workload) -> dict:
    """The machine's measured bf16 matmul peak, with the workers' thread count."""
    import torch

    from benchmarks.common import measured_peak_tflops

    torch.set_num_threads(w.threads)
    return measured_peak_tflops(w.device, w.clock)


# --------------------------------------------------------------------------------- parent
def jobs_for(benches: list[str], w: Workload) -> list[str]:
    jobs = []
    for bench in benches:
        jobs += [f"forward:{d}" for d in w.forward_dtypes] if bench == "forward" else [bench]
    return jobs


def spawn(system: str, job: str, w: Workload, log) -> dict:
    """Run one worker in a fresh interpreter; return its result, or {"error": ...}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system, job, "--workload", w.to_json()]
    if system == "probe":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", "--workload", w.to_json()]
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(w.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    log(f"  {system} {job} failed: {tail}")
    return {"system": system, "job": job, "error": tail}


def fmt(x: float | None, digits: int = 0) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def job_label(job: str, w: Workload) -> str:
    bench, _, dtype = job.partition(":")
    if bench == "forward":
        return f"forward/prefill {dtype}, B={w.batch} T={w.seq_len}"
    if bench == "decode":
        return f"greedy decode {w.decode_dtype}, B={w.decode_batch} P={w.decode_prompt} N={w.decode_new}"
    what = {"sft": "QLoRA SFT step", "sft-recipe": "QLoRA SFT step, recipe shape", "dpo": "DPO step (B pairs)",
            "dpo-recipe": "DPO step, recipe shape"}[bench]
    if bench == "sft-recipe":
        what += f" (answers trained, anita {w.sft_layout} rows, tok/s counts real tokens)"
    if bench.startswith("dpo"):
        what += f" (anita {w.dpo_layout} rows)"
    shape = {"dpo-recipe": f"P~{w.recipe_prompt[0]}-{w.recipe_prompt[1]} A~{w.recipe_answer[0]}-{w.recipe_answer[1]}",
             "sft-recipe": f"P~{w.sft_prompt[0]}-{w.sft_prompt[1]} A~{w.sft_answer[0]}-{w.sft_answer[1]}"
             }.get(bench, f"T={w.seq_len}")
    extra = "".join([", head bf16" if w.head_dtype != "fp32" else "", ", fused" if w.fused else "",
                     f", chunk {w.chunk_size}" if w.chunk_size != DEFAULT_CHUNK_SIZE else "",
                     ", adapters bf16" if w.adapter_dtype == "bfloat16" else ""])
    return (f"{what} {w.train_dtype}, B={w.batch} {shape}, r={w.lora_r}, ckpt={w.checkpointing}, "
            f"{w.threads} thr{extra}")


def table(results: dict, jobs: list[str], w: Workload) -> str:
    """One Markdown table: every job's metrics for anita and HF, their ratio, and the target."""
    rows = ["| benchmark | metric | anita | HF | anita / HF | target | met |", "|---|---|---:|---:|---:|---:|:-:|"]
    for job in jobs:
        a, h = results.get(("anita", job), {}), results.get(("hf", job), {})
        bench = job.partition(":")[0]
        metrics = [("tok/s", "tok_s", 1)]
        if bench != "decode":
            metrics.append(("MFU %", "mfu", 1 if w.device == "cuda" else 2))
        if bench != "decode":
            metrics += [("peak MiB", "peak_mib", 0), ("step MiB", "step_mib", 0)]
        for i, (name, key, digits) in enumerate(metrics):
            av, hv = a.get(key), h.get(key)
            if key == "mfu":
                av, hv = (None if av is None else 100 * av), (None if hv is None else 100 * hv)
            ratio = av / hv if av is not None and hv else None
            target = TARGETS.get((bench, name)) if w.device == "cpu" and job != "forward:bfloat16" else None
            met = "" if target is None or ratio is None else (
                "yes" if (ratio >= target[0] if target[1] == "min" else ratio <= target[0]) else "no")
            tgt = "" if target is None else ("≥ " if target[1] == "min" else "≤ ") + f"{target[0]}×"
            err = "error" if "error" in a or "error" in h else ""
            rows.append(f"| {job_label(job, w) if i == 0 else ''} | {name} | {fmt(av, digits) if 'error' not in a else 'error'} "
                        f"| {fmt(hv, digits) if 'error' not in h else 'error'} | {fmt(ratio, 2) if not err else '—'} "
                        f"| {tgt} | {met} |")
    return "\n".join(rows)


def checks(results: dict, jobs: list[str]) -> list[str]:
    """Sanity lines: both sides computed the same thing (decode tokens, step losses)."""
    lines = []
    for job in jobs:
        a, h = results.get(("anita", job), {}).get("info", {}), results.get(("hf", job), {}).get("info", {})
        if "tokens" in a and "tokens" in h:
            same = sum(x == y for x, y in zip(a["tokens"], h["tokens"]))
            lines.append(f"- {job}: {same}/{len(a['tokens'])} greedy tokens identical (anita vs HF)")
        if "loss" in a and "loss" in h:
            lines.append(f"- {job}: loss at the first step anita {a['first_loss']:.5f}, HF {h['first_loss']:.5f}; "
                         f"at the last step anita {a['loss']:.5f}, HF {h['loss']:.5f}")
    return lines


def run_setting(w: Workload, benches: list[str], systems: list[str], log, probe: bool = True
                ) -> tuple[dict, list[str], dict]:
    """One setting (checkpointing, threads): the peak probe (unless not `probe`: then no MFU), then every
    (job, system) in its own process."""
    jobs = jobs_for(benches, w)
    results, start, peak = {}, time.time(), {}
    if probe:
        log(f"[{0:6.0f}s] probe bf16 matmul peak ({w.threads} threads)")
        peak = spawn("probe", "peak", w, log)
    for job in jobs:
        for system in systems:
            log(f"[{time.time() - start:6.0f}s] {system:5s} {job} (ckpt={w.checkpointing}, {w.threads} threads)")
            r = spawn(system, job, w, log)
            if "flops_per_token" in r and peak.get("tflops"):
                r["mfu"] = r["tok_s"] * r["flops_per_token"] / (peak["tflops"] * 1e12)
            results[system, job] = r
    return results, jobs, peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="smaller batch / shorter sequences: a few minutes on CPU")
    p.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {','.join(BENCHES)}")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of anita,hf")
    p.add_argument("--repeats", type=int, help="timed steps per measurement (median reported)")
    p.add_argument("--threads", help="torch threads per worker, or a list (e.g. 1,2: one table each; default 1 on CPU)")
    p.add_argument("--checkpointing", help="off, full or selective (anita; HF runs full for selective), or a list "
                                           "(e.g. full,off: one table each); default full")
    p.add_argument("--head-dtype", dest="head_dtype", choices=("fp32", "bf16"), help="anita's loss head matmuls")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, help="anita: fused q/k/v and gate/up matmuls")
    p.add_argument("--clock", choices=("cpu", "wall"), help="time steps by process CPU time or wall time (default: "
                                                          "CPU time with 1 thread on CPU, else wall time)")
    p.add_argument("--model", help="'smollm2' or 'random:<anita preset>' (e.g. random:llama-3.1-8b)")
    p.add_argument("--batch", type=int, help="B (rows, or pairs for DPO)")
    p.add_argument("--seq-len", dest="seq_len", type=int, help="T of forward, SFT and the short DPO workload")
    p.add_argument("--train-dtype", dest="train_dtype", choices=("float32", "bfloat16"),
                   help="dtype of the SFT/DPO steps (activations, NF4 compute, unquantized weights)")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--dpo-layout", dest="dpo_layout", choices=("shared", "packed", "two-row"),
                   help="anita's DPO batch layout (default shared, as `anita dpo`; two-row is TRL's)")
    p.add_argument("--sft-layout", dest="sft_layout", choices=("packed", "padded"),
                   help="anita's sft-recipe batch layout (default packed: one padding-free row; padded is TRL's)")
    p.add_argument("--adapter-dtype", dest="adapter_dtype", choices=("float32", "bfloat16"),
                   help="LoRA weights on both sides (default float32; bfloat16 is TRL's trainers' for QLoRA)")
    p.add_argument("--chunk-size", dest="chunk_size", type=int, help="anita's output head: tokens per chunk (default 256)")
    p.add_argument("--worker", nargs=2, metavar=("SYSTEM", "JOB"), help=argparse.SUPPRESS)
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker or args.probe:
        w = Workload.from_json(args.workload)
        result = run_probe(w) if args.probe else run_worker(*args.worker, w)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    w = default_workload(args.device, args.quick)
    for name in ("repeats", "model", "train_dtype", "head_dtype", "fused", "batch", "seq_len", "dpo_layout",
                 "sft_layout", "chunk_size", "adapter_dtype"):
        if getattr(args, name) is not None:
            setattr(w, name, getattr(args, name))
    benches = [b for b in args.only.split(",") if b]
    bad = [b for b in benches if b not in BENCHES]
    if bad:
        p.error(f"--only: unknown benchmark(s) {bad}; expected some of {BENCHES}")
    modes = (args.checkpointing or w.checkpointing).split(",")
    if any(m not in ("off", "full", "selective") for m in modes):
        p.error(f"--checkpointing: expected off, full or selective (comma-separated), got {args.checkpointing!r}")
    try:
        threads = [int(t) for t in (args.threads or str(w.threads)).split(",")]
    except ValueError:
        p.error(f"--threads: expected integers (comma-separated), got {args.threads!r}")
    systems = [s for s in args.systems.split(",") if s]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    raw, start = [], time.time()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    for n in threads:
        for mode in modes:
            w.threads, w.checkpointing = n, mode
            # CPU time is what a step costs on one idle core; with more threads only wall time says it
            w.clock = args.clock or ("cpu" if n == 1 and w.device == "cpu" else "wall")
            results, jobs, peak = run_setting(w, benches, systems, log)
            print(f"\n### checkpointing {mode}, {n} thread(s); measured bf16 matmul peak "
                  f"{peak.get('tflops', float('nan')):.3f} TFLOP/s ({peak.get('how', peak.get('error'))})\n")
            print(f"workload: {w.to_json()}\n")
            print(table(results, jobs, w))
            print("\n" + "\n".join(checks(results, jobs)), flush=True)
            raw.append({"workload": json.loads(w.to_json()), "peak": peak, "results": list(results.values())})
    print(f"\ntotal {time.time() - start:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
