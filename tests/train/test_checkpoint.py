"""Tests for anita/train/checkpoint.py (with the loop and `anita sft` around it): a run killed
with SIGKILL and resumed ends with exactly the adapter of an uninterrupted run; the run
directory refuses to be clobbered; half-written checkpoints are never resumed from.

The runs are tiny (the tiny Llama, 16 byte-tokenized chats) but cross epochs (reshuffled data)
and use LoRA dropout and an 8-bit optimizer, so the data position, the RNG states and the
optimizer state all have to come back for the adapters to match bit for bit.
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
from anita.errors import AnitaError
from anita.train.checkpoint import latest_checkpoint, prepare_run_dir
from anita.train.distributed import DistInfo
from tests.train.conftest import chat_rows, write_jsonl

STEPS = 16


def sft_args(model_dir, data, out, *extra) -> list[str]:
    return ["sft", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--lora-r", "2",
            "--lora-alpha", "4", "--lora-dropout", "0.1", "--batch-size", "2", "--grad-accum", "2",
            "--max-steps", str(STEPS), "--save-steps", "1", "--warmup-steps", "2", "--lr", "1e-2",
            "--max-length", "64", "--optimizer", "adamw_8bit", "--no-gradient-checkpointing", "--no-progress",
            *extra]


def adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def losses(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def run_and_kill(args: list[str], out, after_step: int) -> int:
    """Start `anita sft` in a subprocess and SIGKILL it once checkpoint `after_step` exists."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the in-process tests (tests/conftest.py)
    proc = subprocess.Popen([sys.executable, "-m", "anita.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        last = latest_checkpoint(out) if (out / "checkpoints").is_dir() else None
        if last is not None and int(last.name.split("-")[1]) >= after_step:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    return int(latest_checkpoint(out).name.split("-")[1])


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, tiny_run_model):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(16))  # 4 steps per epoch: 4 epochs
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(sft_args(tiny_run_model, data, whole)) == 0
    reached = run_and_kill(sft_args(tiny_run_model, data, killed), killed, after_step=3)
    assert reached < STEPS and not (killed / "adapter").exists()  # really killed mid-run
    assert main(sft_args(tiny_run_model, data, killed, "--resume")) == 0
    want, got = adapter(whole), adapter(killed)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert losses(killed) == losses(whole)  # metrics.jsonl: every step once, same values
    assert len(list((killed / "checkpoints").iterdir())) == 2  # --keep-checkpoints default
    assert (whole / "training_curves.png").stat().st_size > 0


def test_output_dir_holding_a_run_is_not_clobbered(tmp_path):
    cfg = {"lr": 1e-3, "seed": 1, "save_steps": 5}
    out = prepare_run_dir(cfg, tmp_path / "run", resume=False, info=DistInfo())
    (out / "checkpoints" / "step-000001").mkdir()  # a run that got past its first checkpoint
    with pytest.raises(AnitaError, match="already holds files.*--resume"):
        prepare_run_dir(cfg, out, resume=False, info=DistInfo())
    with pytest.raises(AnitaError, match=r"holds a different run \(lr: 0.001 -> 0.002"):
        prepare_run_dir({**cfg, "lr": 2e-3}, out, resume=True, info=DistInfo())
    prepare_run_dir({**cfg, "save_steps": 7}, out, resume=True, info=DistInfo())  # harmless change
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(AnitaError, match="no run.json"):
        prepare_run_dir(cfg, tmp_path / "other", resume=True, info=DistInfo())


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_that_stopped_before_its_first_checkpoint_is_not_a_run(tmp_path, resume, capsys):
    """run.json, metrics.jsonl and an empty or half-written checkpoints/ without one complete
    checkpoint: the corrected command (changed settings, with or without --resume) starts afresh;
    a file anita did not write keeps the directory refused, and is never deleted."""
    out = prepare_run_dir({"lr": float("nan")}, tmp_path / "run", resume=False, info=DistInfo())
    (out / "metrics.jsonl").write_text('{"step": 0, "eval_loss": 1.0}\n')
    (out / "checkpoints" / ".tmp-step-000001").mkdir()
    prepare_run_dir({"lr": 1e-4}, out, resume=resume, info=DistInfo())
    assert "starting afresh" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "run.json"]
    assert json.loads((out / "run.json").read_text()) == {"lr": 1e-4}
    (out / "notes.txt").write_text("mine")
    with pytest.raises(AnitaError, match="already holds files"):
        prepare_run_dir({"lr": 1e-3}, out, resume=False, info=DistInfo())
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("files", [
    {"metrics.jsonl": "{}\n", "checkpoints/epoch=3-step=900.ckpt": "weights"},  # someone else's, no run.json
    {"run.json": "[1, 2]", "metrics.jsonl": "{}\n"},  # not an anita run.json
    {"run.json": "{}", "checkpoints/mine.txt": "x"},  # checkpoints/ holds more than half-written steps
])
def test_directories_that_are_not_an_unfinished_anita_run_are_never_cleared(tmp_path, files):
    out = tmp_path / "run"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    with pytest.raises(AnitaError):
        prepare_run_dir({"lr": 1e-4}, out, resume=False, info=DistInfo())
    assert all((out / name).read_text() == text for name, text in files.items())


def test_a_field_added_since_a_run_started_does_not_block_its_resume(tmp_path):
    """run.json written before a field existed: the field's default stands in for it."""
    out = prepare_run_dir({"lr": 1e-3}, tmp_path / "run", resume=False, info=DistInfo())
    (out / "checkpoints" / "step-000001").mkdir()
    prepare_run_dir({"lr": 1e-3, "new_knob": 0.5}, out, resume=True, info=DistInfo(), defaults={"new_knob": 0.5})
    with pytest.raises(AnitaError, match="new_knob"):
        prepare_run_dir({"lr": 1e-3, "new_knob": 0.7}, out, resume=True, info=DistInfo(), defaults={"new_knob": 0.5})


def test_half_written_checkpoints_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step-000002", "step-000010", ".tmp-step-000011", "step-junk"):
        (root / name).mkdir(parents=True)
    assert latest_checkpoint(tmp_path).name == "step-000010"


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_too_little_data_fails_before_the_model_loads_and_leaves_no_directory(command, tmp_path, tiny_run_model,
                                                                              monkeypatch, capsys):
    """4 rows in micro-batches of 2 are 2 micro-batches; 4 accumulated per step do not fit: the
    error comes from the step arithmetic, before any model is loaded, and OUTPUT is never made."""
    import anita.dpo.run
    import anita.train.sft

    def no_model(*_):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(anita.train.sft, "load_trainable_model", no_model)
    monkeypatch.setattr(anita.dpo.run, "load_trainable_model", no_model)
    rows = chat_rows(4) if command == "sft" else [{"prompt": f"p{i}", "chosen": "si", "rejected": "no"} for i in range(4)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    argv = [command, "--model", str(tiny_run_model), "--data", data, "--output", str(tmp_path / "out"),
            "--batch-size", "2", "--grad-accum", "4", "--no-progress"]
    assert main(argv) == 2
    assert "one optimizer step needs 4" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
