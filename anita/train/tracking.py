"""Trackers (`--report-to tensorboard,trackio`): every record written to metrics.jsonl, also sent
to TensorBoard and/or trackio, so that a run can be watched live with the same numbers.

A tracker has two methods, `log(step, scalars)` and `close()`; `MetricsLog.append` hands each of
them the record it has just written, as tags named the way transformers' `rewrite_logs` names
them for TensorBoard and trackio (so TRL's and anita's runs chart side by side):

    training record  {"step": 5, "loss": .., "lr": .., "rewards/chosen": ..}
                  -> train/loss, train/learning_rate, train/rewards/chosen, ... at step 5
    evaluation record {"step": 5, "eval_loss": .., "eval_rewards/chosen": ..}
                  -> eval/loss, eval/rewards/chosen, ... at step 5

Only `lr` is renamed (HF's key is `learning_rate`); every other key keeps its metrics.jsonl name.
Where the data go: TensorBoard event files in OUTPUT/tensorboard/ (`tensorboard --logdir
OUTPUT`); trackio's local database ($TRACKIO_DIR, by default ~/.cache/huggingface/trackio), project
"anita", one run named after OUTPUT (`trackio show --project anita`).

On `--resume` the steps after the checkpoint are run (and logged) again. TensorBoard is told to
drop what it holds from that step on (`purge_step`), as metrics.jsonl drops those records; trackio
cannot drop what it holds, so it is sent only the steps after those it already has (a resumed
run repeats them with the same numbers: resuming is exact, docs/training.md).

The backends are optional extras (`pip install 'anita[track]'`), imported only by a run that
names them; `check_report_to` refuses an unknown name or a missing package before any work.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from anita.errors import AnitaError

TENSORBOARD_DIR = "tensorboard"  # OUTPUT/tensorboard/events.out.tfevents.*
TRACKIO_PROJECT = "anita"
RENAMED = {"lr": "learning_rate"}  # metrics.jsonl key -> transformers' log key


def tags(record: dict) -> dict[str, float]:
    """A metrics record's numbers as tracker tags (train/..., eval/...); `step` is the x axis, not a tag."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out["eval/" + key[5:] if key.startswith("eval_") else "train/" + RENAMED.get(key, key)] = float(value)
    return out


class TensorBoard:
    """Event files in OUTPUT/tensorboard, written with torch's SummaryWriter (needs `tensorboard`)."""

    def __init__(self, out: Path, first_step: int, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events at or after it, left by the run being resumed, are hidden from TensorBoard
        self.writer = SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=first_step)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # watchable while the run goes on

    def close(self) -> None:
        self.writer.close()


class Trackio:
    """One trackio run (project "anita", named after OUTPUT) in trackio's local database."""

    def __init__(self, out: Path, first_step: int, config: dict):
        import trackio

        name, resumed = out.resolve().name, first_step > 0
        self.run = trackio.init(project=TRACKIO_PROJECT, name=name, config=config, resume="allow" if resumed else "never",
                                embed=False, auto_log_cpu=False, auto_log_gpu=False)  # only the run's own metrics
        held = _last_step(name) if resumed else None
        self.skip_through = -1 if held is None else held  # steps it holds already are not sent again

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if step > self.skip_through:
            self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def _last_step(name: str) -> int | None:
    from trackio.sqlite_storage import SQLiteStorage  # what trackio's own resume reads

    return SQLiteStorage.get_max_step_for_run(TRACKIO_PROJECT, name)


# backend -> (its class, the package it imports)
BACKENDS = {"tensorboard": (TensorBoard, "tensorboard"), "trackio": (Trackio, "trackio")}


def check_report_to(names: list[str] | str, source: str = "config") -> list[str]:
    """The backends `names` (a list, or a comma-separated string as transformers takes) asks for
    ([] for none); AnitaError for an unknown name or a backend whose package is not installed, so
    that a run fails on it in seconds, before any work."""
    wanted = [n.strip().lower() for n in (names.split(",") if isinstance(names, str) else names)]
    wanted = [n for n in wanted if n != "none"]  # "none" alone: no tracker (transformers' spelling)
    for name in wanted:
        if name not in BACKENDS:
            raise AnitaError(f"{source}: 'report_to' must be {', '.join(BACKENDS)} (comma-separated) or none, "
                             f"got {name!r}")
        package = BACKENDS[name][1]
        if importlib.util.find_spec(package) is None:
            raise AnitaError(f"{source}: report_to {name} needs the {package} package, which is not installed: "
                             f"pip install 'anita[track]' (or pip install {package})")
    return list(dict.fromkeys(wanted))


def open_trackers(names: list[str], out: Path, first_step: int, config: dict) -> list:
    """The trackers of a run whose first logged step is `first_step` (0 for a fresh run)."""
    return [BACKENDS[name][0](Path(out), first_step, config) for name in check_report_to(names)]
