"""The run directory and its checkpoints: atomic saves and exact resume.

    OUTPUT/
      run.json                 the run's TrainConfig (a different run is refused here)
      checkpoints/step-000050/ adapter/ (PEFT format), trainer_state.pt (optimizer, scheduler),
                               rng-rank{R}.pt (each process's RNG), state.json (step, data position)
      metrics.jsonl, training_curves.png, adapter/ (the final adapter)

A checkpoint is written into `checkpoints/.tmp-step-N/` and renamed to `step-N/` only when
complete (a rename is atomic on POSIX file systems), so a run killed at any moment leaves only
complete checkpoints; `--resume` takes the newest. Everything that decides the rest of the run is
in it: adapter weights, optimizer and scheduler state, RNG states, and the data position (the
number of optimizer steps done; the micro-batch stream is a pure function of it, see
`anita.train.data.MicroBatches`). So a resumed run ends with the same adapter as an uninterrupted
one. Tensors are read back with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from anita.errors import AnitaError
from anita.files import replace_dir, write_json
from anita.lora import load_adapter_weights, lora_state_dict, save_adapter
from anita.train.config import differences
from anita.train.distributed import DistInfo, barrier

RUN_FILE = "run.json"
STEP_DIR = re.compile(r"step-(\d+)")
# What a run writes before its first checkpoint: a directory holding only these, with a run.json and
# no complete checkpoint, is a run that stopped before one (a crash at step 1, a bad setting), and
# a new run may clear it.
EARLY_RUN_FILES = {RUN_FILE, "checkpoints", "metrics.jsonl", "training_curves.png", "dpo_curves.png", ".tmp-adapter"}


# ------------------------------------------------------------------------ run directory
def stopped_before_first_checkpoint(out: Path) -> bool:
    """OUTPUT holds an anita run (a run.json object) that wrote no complete checkpoint, and nothing
    anita does not write: checkpoints/ holds at most half-written `.tmp-step-*` directories."""
    if not {p.name for p in out.iterdir()} <= EARLY_RUN_FILES or not (out / RUN_FILE).is_file():
        return False
    root = out / "checkpoints"
    if root.exists() and (not root.is_dir() or any(not p.name.startswith(".tmp-step-") for p in root.iterdir())):
        return False
    try:
        return isinstance(json.loads((out / RUN_FILE).read_text()), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def prepare_run_dir(config: dict, output, resume: bool, info: DistInfo, defaults: dict | None = None) -> Path:
    """Create OUTPUT (rank 0) or check that it holds this very run when resuming.

    Without `resume` an OUTPUT with anything in it is refused (it would be clobbered); with it,
    OUTPUT must be empty or hold a run with the same settings (see `config.RESUMABLE_CHANGES`).
    An OUTPUT that holds only what a run writes before its first checkpoint (see
    `stopped_before_first_checkpoint`) is cleared and used afresh. `defaults` stand in for fields
    an older run.json lacks.
    """
    out = Path(output)
    run_file = out / RUN_FILE
    if out.exists() and not out.is_dir():
        raise AnitaError(f"--output {out}: exists and is not a directory")
    occupied = out.is_dir() and any(out.iterdir())
    if occupied and stopped_before_first_checkpoint(out):
        barrier(info)  # every rank has looked before rank 0 clears
        if info.is_main:
            logged = len((out / "metrics.jsonl").read_text().splitlines()) if (out / "metrics.jsonl").is_file() else 0
            print(f"{out}: an earlier run stopped before its first checkpoint; starting afresh (its {logged} "
                  "logged records are dropped)", flush=True)
            for p in out.iterdir():
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        occupied = False
    if occupied and not resume:
        raise AnitaError(f"--output {out}: already holds files (a previous run?); pass --resume to continue "
                         "that run, or choose another --output")
    if occupied and not run_file.is_file():
        raise AnitaError(f"--output {out}: holds files but no {RUN_FILE}; not an anita run to resume")
    if occupied:
        try:
            saved = json.loads(run_file.read_text())
        except json.JSONDecodeError as e:
            raise AnitaError(f"{run_file}: not valid JSON (line {e.lineno}: {e.msg}); cannot resume") from None
        changed = differences({**(defaults or {}), **saved}, config)  # a field added since: its default
        if changed:
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in changed[:5])
            raise AnitaError(f"--resume: {out} holds a different run ({detail}); use another --output")
    barrier(info)  # every rank has checked before rank 0 writes
    if info.is_main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        write_json(run_file, config)
    barrier(info)
    return out


# ---------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- save / load
def checkpoint_dirs(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, dir), oldest first (temporary dirs are never listed)."""
    root = Path(out) / "checkpoints"
    found = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := STEP_DIR.fullmatch(p.name))]
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoint_dirs(out)
    return found[-1][1] if found else None


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, info: DistInfo, keep: int,
                    base_model: str | None = None) -> Path:
    """Write checkpoint `step` atomically (all ranks call this); keep only the newest `keep`."""
    root = Path(out) / "checkpoints"
    final, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir(parents=True)
    barrier(info)
    torch.save(rng_state(), tmp / f"rng-rank{info.rank}.pt")
    if info.is_main:
        save_adapter(model, tmp / "adapter", base_model_name_or_path=base_model)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   tmp / "trainer_state.pt")
        write_json(tmp / "state.json", {"step": step, "world_size": info.world_size})
    barrier(info)
    if info.is_main:
        replace_dir(tmp, final)  # the checkpoint appears complete, or not at all
        for _, old in checkpoint_dirs(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, info: DistInfo) -> int:
    """Restore adapter, optimizer, scheduler and this rank's RNG from `path`; returns the step."""
    state = json.loads((path / "state.json").read_text())
    if state["world_size"] != info.world_size:
        raise AnitaError(f"{path}: written by {state['world_size']} process(es), resumed with {info.world_size}; "
                         "the data order depends on it, so resume with the same number of processes")
    load_adapter_weights(model, path / "adapter")
    trainer = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(torch.load(path / f"rng-rank{info.rank}.pt", map_location="cpu", weights_only=True))
    return state["step"]


def export_adapter(checkpoint: Path, out: Path) -> Path:
    """Copy a checkpoint's adapter to OUTPUT/adapter (through a temporary dir and a rename)."""
    final, tmp = Path(out) / "adapter", Path(out) / ".tmp-adapter"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint / "adapter", tmp)
    replace_dir(tmp, final)
    return final


def adapter_is_finite(model) -> bool:
    """True when every adapter weight is finite (a checkpoint of NaN weights is not 'good')."""
    return all(torch.isfinite(t).all() for t in lora_state_dict(model).values())
