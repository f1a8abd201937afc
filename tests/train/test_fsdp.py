"""Tests for anita/train/fsdp.py: `torchrun --nproc-per-node 2 -m anita.cli sft|dpo ... --fsdp` on
CPU (gloo), against one process accumulating twice as many micro-batches (the oracle: the same
micro-batches per optimizer step, the same mean loss, fp32 throughout, dropout off).

Each process holds its shards of the NF4 base: about half of it, plus the small code books every
process keeps whole; the expected split is counted here from the single-process model. A sharded
run killed with SIGKILL (both processes and torchrun, at once) and resumed ends with the adapter
and the losses of the uninterrupted sharded run, bit for bit (with LoRA dropout, so every
process's RNG comes back too). The CUDA (NCCL) run needs two GPUs and is skipped without them.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from anita.cli import main
from anita.lora import load_adapter
from anita.model import from_pretrained
from anita.quant import Linear4bit
from anita.train.checkpoint import latest_checkpoint
from anita.train.config import TrainConfig
from anita.train.distributed import DistInfo
from anita.train.model import load_trainable_model
from tests.dpo.test_trainer import toy_rows
from tests.train.conftest import chat_rows, write_jsonl
from tests.train.runs import adapter, losses, same_tensors


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def torchrun(args: list[str], nproc: int = 2, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "anita.cli", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def run_torchrun(args: list[str], nproc: int = 2) -> str:
    proc = torchrun(args, nproc)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (torchrun's workers, each in a session of its own)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # not a process, or gone
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def sft_args(model_dir, data, out, grad_accum: int, *extra) -> list[str]:
    return ["sft", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--lora-r", "2",
            "--lora-alpha", "4", "--batch-size", "2", "--grad-accum", str(grad_accum), "--max-steps", "4",
            "--save-steps", "4", "--warmup-steps", "1", "--lr", "1e-2", "--max-length", "64", "--optimizer", "adamw",
            "--packing", "--no-progress", *extra]


def close_runs(a, b, tol: float = 1e-4) -> None:
    """The two runs' losses per step within `tol`, their adapters within rounding, and trained."""
    (steps_a, loss_a), (steps_b, loss_b) = zip(*losses(a)), zip(*losses(b))
    assert steps_a == steps_b and max(abs(x - y) for x, y in zip(loss_a, loss_b)) <= tol
    ours, theirs = adapter(a), adapter(b)
    assert ours.keys() == theirs.keys()
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], atol=2e-6, rtol=1e-5)
    assert max(t.abs().max().item() for k, t in theirs.items() if "lora_B" in k) > 1e-3  # B left zero: trained


def expected_bytes_per_rank(model, world_size: int) -> tuple[int, float, float]:
    """(whole base, expected bytes per process, slack) from the unsharded model: the sharded tensors
    (packed codes, block scales, frozen parameters) split N ways, the NF4 code books and
    second-level scales whole on each; slack: a dim-0 shard may be one row longer than 1/N."""
    sharded, whole, slack = 0, 0, 0
    for m in model.modules():
        if isinstance(m, Linear4bit):
            s = m.state
            small = [s.code, s.absmax_scale, s.absmax_offset, s.absmax_code]
            whole += sum(t.numel() * t.element_size() for t in small if t is not None)
            sharded += m.weight.numel() + s.absmax.numel()  # both uint8
            slack += 2
    for p in model.parameters():
        if not p.requires_grad:
            sharded += p.numel() * p.element_size()
            slack += p[0].numel() * p.element_size()
    return sharded + whole, sharded / world_size + whole, slack


def test_fsdp_sft_on_two_gloo_processes_equals_one_process(tmp_path, tiny_run_model):
    """The QLoRA SFT run sharded over 2 processes (activation checkpointing on, as by default) has
    the single process's losses, held-out losses and adapter; the held-out data is 3 micro-batches,
    so one process evaluates one more than the other. run.json says what each process held of the
    base; the one PEFT adapter rank 0 wrote loads with the PEFT loader."""
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(24))
    held_out = ["--eval-data", write_jsonl(tmp_path / "eval.jsonl", chat_rows(6, seed=1)), "--eval-steps", "2"]
    run_torchrun(sft_args(tiny_run_model, data, tmp_path / "fsdp", 1, "--fsdp", *held_out))
    assert main(sft_args(tiny_run_model, data, tmp_path / "single", 2, *held_out)) == 0
    close_runs(tmp_path / "fsdp", tmp_path / "single")
    evals = [[(r["step"], r["eval_loss"]) for r in records(out) if "eval_loss" in r]
             for out in (tmp_path / "fsdp", tmp_path / "single")]
    assert [s for s, _ in evals[0]] == [s for s, _ in evals[1]] == [0, 2, 4]
    assert max(abs(a - b) for (_, a), (_, b) in zip(*evals)) <= 1e-4
    sharding = json.loads((tmp_path / "fsdp" / "run.json").read_text())["sharding"]
    cfg = TrainConfig(model=str(tiny_run_model), data=data, output="unused", lora_r=2, lora_alpha=4)
    total, per_rank, slack = expected_bytes_per_rank(load_trainable_model(cfg, DistInfo())[0], 2)
    assert sharding["world_size"] == 2 and sharding["base_bytes"] == total
    for held in sharding["base_bytes_per_rank"]:
        assert abs(held - per_rank) <= slack < 0.02 * total
    model = from_pretrained(tiny_run_model, quantize="nf4")
    load_adapter(model, tmp_path / "fsdp" / "adapter")
    assert (tmp_path / "fsdp" / "checkpoints" / "step-000004" / "dcp" / ".metadata").is_file()


def test_fsdp_dpo_with_the_adapters_off_reference_equals_one_process(tmp_path, tiny_run_model):
    """DPO sharded over 2 processes, the reference the same sharded model with its adapters off."""
    data = write_jsonl(tmp_path / "train.jsonl", toy_rows(16))

    def dpo(out, grad_accum, *extra):
        return ["dpo", "--model", str(tiny_run_model), "--data", data, "--output", str(out), "--lora-r", "2",
                "--lora-alpha", "4", "--optimizer", "adamw", "--batch-size", "2", "--grad-accum", str(grad_accum),
                "--max-steps", "3", "--lr", "2e-2", "--beta", "1", "--max-length", "64", "--no-progress", *extra]

    run_torchrun(dpo(tmp_path / "fsdp", 1, "--fsdp", "--reference", "adapters-off"))
    assert main(dpo(tmp_path / "single", 2)) == 0
    close_runs(tmp_path / "fsdp", tmp_path / "single")


def test_fsdp_run_killed_with_sigkill_resumes_bit_identically(tmp_path, tiny_run_model):
    """Both workers and torchrun SIGKILLed once checkpoint 2 of 6 exists; `--resume` (2 processes
    again) reads the sharded checkpoint (dcp/) and ends where the uninterrupted sharded run ends."""
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(16))

    def args(out, *extra):
        return sft_args(tiny_run_model, data, out, 1, "--fsdp", "--lora-dropout", "0.1", "--max-steps", "6",
                        "--save-steps", "1", "--no-gradient-checkpointing", *extra)

    run_torchrun(args(tmp_path / "whole"))
    killed = tmp_path / "killed"
    proc = torchrun(args(killed))
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        last = latest_checkpoint(killed) if (killed / "checkpoints").is_dir() else None
        if last is not None and int(last.name.split("-")[1]) >= 2:
            for pid in [*children(proc.pid), proc.pid]:  # the workers, then torchrun: no clean exit anywhere
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert int(latest_checkpoint(killed).name.split("-")[1]) < 6 and not (killed / "adapter").exists()
    run_torchrun(args(killed, "--resume"))
    assert same_tensors(adapter(tmp_path / "whole"), adapter(killed))
    assert losses(killed) == losses(tmp_path / "whole")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL)")
def test_fsdp_on_two_gpus_equals_one_gpu(tmp_path, tiny_run_model):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(24))
    run_torchrun(sft_args(tiny_run_model, data, tmp_path / "fsdp", 1, "--fsdp", "--device", "cuda"))
    assert main(sft_args(tiny_run_model, data, tmp_path / "single", 2, "--device", "cuda")) == 0
    close_runs(tmp_path / "fsdp", tmp_path / "single")
    assert load_file(str(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors"))
