"""Stopping a run cleanly on SIGTERM (how schedulers such as Slurm or Kubernetes preempt a job)
or SIGINT (Ctrl-C).

While the loop runs, `StopSignals` replaces both handlers with one that only records the
signal. The loop checks it after each optimizer step (`requested`): it finishes the step it is
in, writes a checkpoint, exports the adapter, and raises `anita.errors.Interrupted`, whose message
says where they are; the CLI adds the command that resumes and exits 128 + signal (143, 130).
A step is never cut in half, so a scheduler's grace period should exceed one step; if it ends
first, its SIGKILL leaves the last periodic checkpoint, which is as exact. A second signal while
stopping stops at once (every file is written atomically, so nothing is left half-written).
Under torchrun the processes agree (an all-reduce per step) so that all stop after the same step.
"""

from __future__ import annotations

import signal
import sys
import threading

import torch

from anita.errors import Interrupted
from anita.train.distributed import DistInfo, all_reduce_sum

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager: record SIGTERM/SIGINT instead of dying; restores the old handlers on exit.
    Outside the main thread (where Python cannot install handlers) it records nothing."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._record) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _record(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            raise Interrupted(f"a second {name} while stopping: stopped at once; every checkpoint written is "
                              "complete, and --resume continues from the newest", signum)
        self.signum = signum
        print(f"\n{name} received: finishing this step, then writing a checkpoint and the adapter "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    def requested(self, info: DistInfo) -> int | None:
        """The signal to stop for, if this process or (under torchrun) any other got one."""
        if not info.enabled:
            return self.signum
        got = all_reduce_sum(torch.tensor([float(self.signum or 0), float(self.signum is not None)]), info)
        return None if got[1] == 0 else (self.signum or int(signal.SIGTERM))
