"""The tiny `anita sft` run that the run-directory tests (checkpoint, signals) kill, damage and
resume: the tiny Llama, 16 byte-tokenized chats, LoRA dropout and an 8-bit optimizer, 16 steps
across 4 epochs, so the data position, the RNG states and the optimizer state all have to come
back for a resumed run to end with the same adapter bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from safetensors.torch import load_file

STEPS = 16


def sft_args(model_dir, data, out, *extra) -> list[str]:
    return ["sft", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--lora-r", "2",
            "--lora-alpha", "4", "--lora-dropout", "0.1", "--batch-size", "2", "--grad-accum", "2",
            "--max-steps", str(STEPS), "--save-steps", "1", "--warmup-steps", "2", "--lr", "1e-2",
            "--max-length", "64", "--optimizer", "adamw_8bit", "--no-gradient-checkpointing", "--no-progress",
            *extra]


def adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def same_tensors(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def losses(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def start_anita(args: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
    """`anita ARGS` in a subprocess, one thread as the in-process tests (tests/conftest.py), with
    `env` added to this process's environment."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "anita.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)
