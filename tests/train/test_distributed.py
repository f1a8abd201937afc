"""Tests for anita/train/distributed.py: `torchrun --nproc-per-node 2` on CPU (gloo) gives the
same adapter as one process accumulating twice as many micro-batches.

Both runs see the same micro-batches in each optimizer step (process r takes every 2nd one from
the r-th on; the single process takes all of them), and both divide the summed gradients by the
same total token count, so the updates agree up to the order of floating-point sums in the
all-reduce. Dropout is off (each process draws its own masks) and the optimizer is fp32 AdamW.
"""

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from anita.cli import main
from tests.train.conftest import chat_rows, write_jsonl


def args(model_dir, data, out, grad_accum: int) -> list[str]:
    return ["sft", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--lora-r", "2",
            "--lora-alpha", "4", "--batch-size", "2", "--grad-accum", str(grad_accum), "--max-steps", "4",
            "--save-steps", "4", "--warmup-steps", "1", "--lr", "1e-2", "--max-length", "64", "--optimizer", "adamw",
            "--packing", "--no-progress"]


def test_two_gloo_processes_equal_one_process_with_twice_the_accumulation(tmp_path, tiny_run_model):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(24))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "anita.cli", *args(tiny_run_model, data, tmp_path / "ddp", grad_accum=1)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(args(tiny_run_model, data, tmp_path / "single", grad_accum=2)) == 0
    ddp = load_file(str(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors"))
    single = load_file(str(tmp_path / "single" / "adapter" / "adapter_model.safetensors"))
    assert ddp.keys() == single.keys()
    moved = 0.0
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], atol=2e-6, rtol=1e-5)
        if "lora_B" in k:
            moved = max(moved, single[k].abs().max().item())
    assert moved > 1e-3  # B started at zero: the runs really trained
