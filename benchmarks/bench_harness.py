"""Wall time of lm-evaluation-harness tasks: anita's `AnitaLM` vs the harness's own `hf` model.

    python benchmarks/bench_harness.py [--threads 2] [--batch-size 8] [--repeats 3]

Runs the local test tasks (tests/eval/tasks/: multiple choice with 1 shot, loglikelihood_rolling,
generate_until with up to 12 new tokens, a loglikelihood cloze task; all documents) on the real
SmolLM2-135M-Instruct in fp32 on CPU, through `lm_eval.simple_evaluate` with a model built once
(load time reported apart), in the same process, alternating the two models `--repeats` times and
reporting the median wall time of each. Both must give the same numbers (tests/eval/test_harness.py);
the run prints the largest relative difference of the metrics as a sanity check.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = ["anita_mc_it", "anita_ppl_it", "anita_gen_it", "anita_cloze_it"]


def build(kind: str, model_dir: str, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    from anita.eval.harness import AnitaLM

    start = time.perf_counter()
    if kind == "anita":
        lm = AnitaLM(pretrained=model_dir, dtype="float32", device="cpu", batch_size=batch_size)
    else:
        lm = HFLM(pretrained=model_dir, dtype="float32", device="cpu", batch_size=batch_size)
    return lm, time.perf_counter() - start


def evaluate(lm, manager) -> tuple[dict, float]:
    import lm_eval

    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=manager, num_fewshot=1, log_samples=False)
    return results["results"], time.perf_counter() - start


def max_rel_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for task, row in a.items():
        for key, value in row.items():
            if isinstance(value, float) and value:
                worst = max(worst, abs(value - b[task][key]) / abs(value))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import logging

    import torch
    from lm_eval.tasks import TaskManager

    from anita.assets import smollm2_dir

    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    manager = TaskManager(include_path=str(ROOT / "tests" / "eval" / "tasks"), include_defaults=False)
    model_dir = str(smollm2_dir())
    models = {kind: build(kind, model_dir, args.batch_size) for kind in ("anita", "hf")}
    times, results = {"anita": [], "hf": []}, {}
    for _ in range(args.repeats):
        for kind, (lm, _) in models.items():
            results[kind], seconds = evaluate(lm, manager)
            times[kind].append(seconds)
    a, h = statistics.median(times["anita"]), statistics.median(times["hf"])
    print(f"| model | load s | tasks s (median of {args.repeats}) |\n|---|---:|---:|")
    print(f"| anita (AnitaLM) | {models['anita'][1]:.2f} | {a:.2f} |")
    print(f"| hf (HFLM) | {models['hf'][1]:.2f} | {h:.2f} |")
    print(f"anita / hf task time: {a / h:.2f}; largest relative metric difference: "
          f"{max_rel_diff(results['hf'], results['anita']):.1e}")


if __name__ == "__main__":
    main()
