"""`--report-to` (anita/train/tracking.py): TensorBoard event files, read back with TensorBoard's own
EventAccumulator, and a trackio run, read back from trackio's database, hold the records of
metrics.jsonl under transformers' tag names (train/loss, train/learning_rate, train/rewards/chosen,
eval/loss, ...), each step once, also across a --resume; a bad --report-to is one line before any work.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from anita.cli import main
from anita.train.tracking import tags
from tests.dpo.test_trainer import toy_rows
from tests.train.conftest import chat_rows, write_jsonl
from tests.train.runs import start_anita

SFT_STEPS = 6


def sft_argv(model_dir, data, out, *extra) -> list[str]:
    return ["sft", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--lora-r", "2",
            "--batch-size", "2", "--max-steps", str(SFT_STEPS), "--save-steps", "2", "--warmup-steps", "2",
            "--lr", "1e-2", "--max-length", "64", "--no-gradient-checkpointing", "--no-progress", *extra]


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard itself reads the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected_scalars(recs: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What the trackers should hold: metrics.jsonl's numbers, tagged by hand as transformers does."""
    out: dict[str, list] = {}
    for r in recs:
        for key, value in r.items():
            if key != "step":
                tag = "eval/" + key[5:] if key.startswith("eval_") else \
                    "train/" + ("learning_rate" if key == "lr" else key)
                out.setdefault(tag, []).append((r["step"], value))
    return out


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag  # every step once, in order
        for (_, a), (_, b) in zip(got[tag], points):
            assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-30), (tag, a, b)  # TensorBoard stores float32


def test_tags_follow_transformers_rewrite_logs():
    """transformers' own `rewrite_logs` (what its TensorBoard and trackio callbacks log) names the
    keys as anita does, once anita's `lr` is HF's `learning_rate`."""
    rewrite_logs = pytest.importorskip("transformers.integrations.integration_utils").rewrite_logs
    train = {"step": 3, "loss": 0.5, "lr": 1e-3, "grad_norm": 2.0, "rewards/chosen": 0.1, "logps/rejected": -3.0}
    evals = {"step": 3, "eval_loss": 0.7, "eval_rewards/accuracies": 1.0}
    hf = {("learning_rate" if k == "lr" else k): v for k, v in train.items() if k != "step"}
    assert tags(train) == rewrite_logs(hf)
    assert tags(evals) == rewrite_logs({k: v for k, v in evals.items() if k != "step"})


def test_sft_tensorboard_holds_metrics_jsonl_and_a_resume_logs_each_step_once(tmp_path, tiny_run_model):
    """Loss, learning rate and the held-out loss at each step equal metrics.jsonl's; after the last
    checkpoint is lost, --resume re-runs steps 5-6 and TensorBoard still shows each step once."""
    pytest.importorskip("tensorboard")
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    held_out = write_jsonl(tmp_path / "eval.jsonl", chat_rows(4, seed=1))
    out = tmp_path / "run"
    argv = sft_argv(tiny_run_model, data, out, "--eval-data", held_out, "--eval-steps", "3", "--report-to",
                    "tensorboard")
    assert main(argv) == 0
    scalars = tensorboard_scalars(out / "tensorboard")
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/loss"} <= scalars.keys()
    assert [s for s, _ in scalars["eval/loss"]] == [0, 3, 6]
    assert_same(scalars, expected_scalars(records(out)))

    shutil.rmtree(out / "checkpoints" / f"step-{SFT_STEPS:06d}")  # resume from step 4: steps 5, 6 again
    assert main(argv + ["--resume"]) == 0
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert_same(tensorboard_scalars(out / "tensorboard"), expected_scalars(records(out)))


def test_dpo_tensorboard_holds_trl_reward_metrics(tmp_path, tiny_run_model):
    """DPO's records go to TensorBoard under TRL's names: train/rewards/chosen, rejected, accuracies,
    margins (and eval/...), equal to metrics.jsonl."""
    pytest.importorskip("tensorboard")
    write_jsonl(tmp_path / "train.jsonl", toy_rows(8))
    write_jsonl(tmp_path / "eval.jsonl", toy_rows(4, offset=100))
    out = tmp_path / "dpo"
    assert main(["dpo", "--model", str(tiny_run_model), "--data", str(tmp_path / "train.jsonl"), "--output", str(out),
                 "--eval-data", str(tmp_path / "eval.jsonl"), "--lora-r", "4", "--batch-size", "4", "--max-steps",
                 "3", "--max-length", "64", "--lr", "0.02", "--no-progress", "--report-to", "tensorboard"]) == 0
    scalars = tensorboard_scalars(out / "tensorboard")
    rewards = [f"rewards/{k}" for k in ("chosen", "rejected", "accuracies", "margins")]
    assert {f"train/{k}" for k in rewards} | {f"eval/{k}" for k in rewards} | {"train/loss"} <= scalars.keys()
    assert_same(scalars, expected_scalars(records(out)))


def trackio_logs(trackio_dir, run: str) -> list[dict]:
    """The run's rows in trackio's database (read in a process that sees TRACKIO_DIR, as trackio reads it once)."""
    code = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage; "
            "print(json.dumps(SQLiteStorage.get_logs('anita', sys.argv[1])))")
    done = subprocess.run([sys.executable, "-c", code, run], env={**os.environ, "TRACKIO_DIR": str(trackio_dir)},
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_sft_trackio_run_holds_metrics_jsonl(tmp_path, tiny_run_model):
    """`--report-to tensorboard,trackio`: trackio's run (named after OUTPUT) holds the same numbers,
    and a --resume that re-runs steps 5-6 does not log them twice."""
    pytest.importorskip("trackio")
    pytest.importorskip("tensorboard")
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    out, store = tmp_path / "tracked", tmp_path / "trackio"
    argv = sft_argv(tiny_run_model, data, out, "--report-to", "tensorboard,trackio")
    for extra in ([], ["--resume"]):
        proc = start_anita(argv + extra, env={"TRACKIO_DIR": str(store)})
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        if not extra:
            shutil.rmtree(out / "checkpoints" / f"step-{SFT_STEPS:06d}")  # resume from step 4
    logged: dict[str, list] = {}
    for row in trackio_logs(store, out.name):
        for tag, value in row.items():
            if tag.startswith(("train/", "eval/")):
                logged.setdefault(tag, []).append((row["step"], value))
    want = expected_scalars(records(out))
    assert logged.keys() == want.keys() and "train/learning_rate" in logged
    for tag in ("train/loss", "train/learning_rate", "train/grad_norm"):  # timings differ between the runs
        assert logged[tag] == want[tag], tag  # trackio keeps float64: exactly metrics.jsonl's numbers


@pytest.mark.parametrize("value, message", [
    ("wandb", "'report_to' must be tensorboard, trackio (comma-separated) or none, got 'wandb'"),
    ("tensorboard,mlflow", "got 'mlflow'"),
])
def test_unknown_report_to_is_one_line_before_any_work(value, message, tmp_path, capsys):
    """Refused by the config check: the model directory does not even exist, and no run directory is made."""
    out = tmp_path / "out"
    argv = ["sft", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no.jsonl"), "--output", str(out),
            "--report-to", value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_report_to_none_and_a_missing_package(monkeypatch):
    """'none' (as in transformers) asks for no tracker; a backend whose package is absent names the extra."""
    import importlib.util

    from anita.errors import AnitaError
    from anita.train.tracking import check_report_to

    pytest.importorskip("tensorboard")
    assert check_report_to(["none"]) == [] and check_report_to([]) == []
    assert check_report_to("tensorboard,none") == ["tensorboard"]
    assert check_report_to(["TensorBoard", "tensorboard"]) == check_report_to("tensorboard") == ["tensorboard"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AnitaError, match=r"report_to trackio needs the trackio package.*pip install 'anita\[track\]'"):
        check_report_to(["trackio"], "command line")
