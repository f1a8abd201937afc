"""Tests for anita/train/signals.py: SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C) sent to
a real `anita sft` process mid-run: it finishes the step, writes a checkpoint, exports the
adapter, prints where they are and the command that resumes, and exits 128 + signal; resumed,
it ends with the adapter of the uninterrupted run, bit for bit (the oracle: tests/train/runs.py's
run without a signal). Before: SIGTERM killed the run silently with nothing exported.
"""

import re
import shlex
import signal
import time

import pytest
from safetensors.torch import load_file

from anita.cli import main
from tests.train.runs import STEPS, adapter, losses, same_tensors, sft_args, start_anita


def stop_after_a_logged_step(proc, out, signum) -> tuple[str, str]:
    """Send `signum` once metrics.jsonl holds a training step's record; the process's (stdout, stderr)."""
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and '"loss"' in metrics.read_text():
            proc.send_signal(signum)
            break
        time.sleep(0.01)
    return proc.communicate(timeout=120)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_exports_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path, tiny_run_model, whole_run,
                                                                                signum, code):
    data, whole = whole_run
    out = tmp_path / "stopped"
    argv = sft_args(tiny_run_model, data, out, "--save-steps", "100")  # no periodic checkpoint before the end
    proc = start_anita(argv)
    _, err = stop_after_a_logged_step(proc, out, signum)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    stopped = re.search(rf"anita: stopped by {signum.name} after step (\d+) of {STEPS}: checkpoint (\S+), its adapter "
                        rf"in {out / 'adapter'}; --resume continues the run\nresume with: (.+)\n$", err)
    assert stopped, err[-2000:]
    step, checkpoint, command = int(stopped.group(1)), stopped.group(2), shlex.split(stopped.group(3))
    assert 1 <= step < STEPS and checkpoint.endswith(f"step-{step:06d}")
    assert command == ["anita", *argv, "--resume"]
    exported = load_file(f"{checkpoint}/adapter/adapter_model.safetensors")
    assert same_tensors(adapter(out), exported)  # the adapter of the step it stopped after
    assert main(command[1:]) == 0
    assert same_tensors(adapter(out), adapter(whole))
    assert losses(out) == losses(whole)
