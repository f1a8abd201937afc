"""Observability of a run: `metrics.jsonl` (one JSON object per optimizer step or evaluation),
peak memory, the tqdm progress bar and a PNG of the training curves (matplotlib).

A training record holds step, loss, lr, grad_norm, tokens_per_s and peak_mem_mb (plus whatever
metrics the loss function adds); an evaluation record holds step and eval_loss. Peak memory is
`torch.cuda.max_memory_allocated` on CUDA and the process's peak resident set size
(`getrusage`, the high-water mark since it started) on CPU.
"""

from __future__ import annotations

import json
import resource
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
from tqdm import tqdm

from anita.errors import AnitaError
from anita.files import write_text
from anita.train.tracking import tags

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_curves.png"


class MetricsLog:
    """Append-only JSON lines; on resume, records after the checkpoint's step are dropped (they
    will be written again). A process killed (or a disk filled) during an append leaves a last
    line cut short: reading drops it and says so; any other unreadable line is an error naming
    file:line. Each record appended is also sent to the `trackers` (`anita.train.tracking`:
    TensorBoard, trackio), so they chart the very numbers of the file."""

    def __init__(self, path):
        self.path = Path(path)
        self.trackers: list = []  # set by `tracking`

    def append(self, record: dict) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise AnitaError(f"{self.path}: could not append a record ({e.strerror or e}); free some space, "
                             "then --resume continues from the last checkpoint") from None
        for tracker in self.trackers:
            tracker.log(record["step"], tags(record))

    @contextmanager
    def tracking(self, trackers: list):
        """Send the records appended inside the block to `trackers` too; closed on the way out."""
        self.trackers = list(trackers)
        try:
            yield self
        finally:
            trackers, self.trackers = self.trackers, []
            for tracker in trackers:
                tracker.close()

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        lines = self.path.read_bytes().decode("utf-8", errors="replace").splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        records = []
        for number, line in enumerate(lines, 1):
            record = parse_record(line)
            if record is None and number == len(lines):
                print(f"{self.path}: dropped its last line, cut short by an interrupted append "
                      f"({line[:40]!r}...)", flush=True)
                break
            if record is None:
                raise AnitaError(f"{self.path}:{number}: not a metrics record (a JSON object with an integer "
                                 "'step'); fix or delete the line, then --resume")
            if line.strip():
                records.append(record)
        return records

    def truncate_after(self, step: int) -> None:
        """Keep the records up to and including `step` (rewritten atomically)."""
        if not self.path.is_file():
            return
        kept = [r for r in self.read() if r["step"] <= step]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def parse_record(line: str) -> dict | None:
    """One metrics line as a record, or None if it is not one ({} for a blank line)."""
    if not line.strip():
        return {}
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("step"), int) and not isinstance(record["step"], bool)
    return record if ok else None


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far in MiB: allocated CUDA memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / 2**20 if sys.platform == "darwin" else kib / 2**10


def progress_bar(total: int, initial: int, enabled: bool):
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def plot_metrics(records: list[dict], path, loss_title: str = "loss (per trained token)") -> None:
    """Four panels against the step: train and eval loss, learning rate, grad norm, tokens/s."""
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    fig = Figure(figsize=(10, 7))
    fig.subplots_adjust(hspace=0.35, wspace=0.25)  # fixed spacing: a layout engine costs seconds
    axes = fig.subplots(2, 2).ravel()
    panels = [("loss", loss_title), ("lr", "learning rate"),
              ("grad_norm", "gradient norm (before clipping)"), ("tokens_per_s", "tokens / s")]
    for ax, (key, title) in zip(axes, panels):
        ax.plot([r["step"] for r in train], [r[key] for r in train], label="train")
        ax.set_title(title)
        ax.set_xlabel("step")
    if evals:
        axes[0].plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out")
    axes[0].legend()
    fig.suptitle("train: each point is one step's batch; held-out: the whole held-out set", fontsize="small")
    fig.savefig(path, dpi=100)
