"""The run directory and its checkpoints: atomic, verified saves and exact resume, without pickle.

    OUTPUT/
      run.json                 the run's settings (TrainConfig); --resume with other settings is refused
      checkpoints/step-000050/ adapter/                 PEFT format
                               optimizer.safetensors    optimizer tensors (moments; 8-bit states and
                                                        their quantization maps)
                               trainer_state.json       optimizer and scheduler state (tensors by name)
                               rng-rank{R}.safetensors  each process's RNG states (uint8 tensors)
                               dcp/                     --fsdp: each process's shards of the adapter and
                                                        optimizer state (torch.distributed.checkpoint);
                                                        then optimizer.safetensors holds only the scheduler's
                               state.json               step (the data position), world_size
                               manifest.json            the sha256 of every file above
      metrics.jsonl, training_curves.png, adapter/ (the final adapter)

A checkpoint is written into `checkpoints/.tmp-step-N/` and renamed to `step-N/` only when
complete (a rename is atomic on POSIX file systems), so a run killed at any moment leaves only
complete checkpoints. Everything that decides the rest of the run is in it: adapter weights,
optimizer and scheduler state, RNG states, and the data position (the number of optimizer steps
done; the micro-batch stream is a pure function of it, see `anita.train.data.MicroBatches`). So a
resumed run ends with the same adapter as an uninterrupted one. Nothing is a pickle
(`anita.train.trainer_state`): reading a checkpoint never runs code.

Before a checkpoint is used it is verified: every file of its manifest present with its sha256,
state.json well formed, the adapter's tensors finite and of the shapes this run's LoRA has, the
optimizer state fitting the optimizer. `--resume` takes the newest checkpoint that passes; newer
damaged ones are set aside as `.damaged-step-N/` (never deleted) and the run says so in one line.
The final adapter is copied to OUTPUT/adapter only from a verified checkpoint, through a
temporary directory whose copy is verified again, and a rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException

from anita.errors import AnitaError
from anita.files import replace_dir, save_safetensors, write_json
from anita.lora import load_lora_state_dict, lora_state_dict, save_adapter
from anita.train.config import differences
from anita.train.distributed import DistInfo, all_reduce_sum, barrier
from anita.train.fsdp import DCP_DIR, full_adapter, is_sharded, load_sharded, local, save_sharded
from anita.train.tracking import TENSORBOARD_DIR
from anita.train.trainer_state import check_optimizer_state, from_tree, rng_tensors, set_rng_tensors, to_tree

RUN_FILE = "run.json"
STATE_FILE, MANIFEST_FILE = "state.json", "manifest.json"
OPTIMIZER_FILE, TRAINER_FILE = "optimizer.safetensors", "trainer_state.json"
ADAPTER_FILES = ("adapter/adapter_model.safetensors", "adapter/adapter_config.json")
PEFT_PREFIX = "base_model.model."
STEP_DIR = re.compile(r"step-(\d+)")
# What a run writes before its first checkpoint: a directory holding only these, with a run.json and
# no complete checkpoint, is a run that stopped before one (a crash at step 1, a bad setting), and
# a new run may clear it.
EARLY_RUN_FILES = {RUN_FILE, "checkpoints", "metrics.jsonl", "training_curves.png", "dpo_curves.png", ".tmp-adapter",
                   TENSORBOARD_DIR}
# run.json fields that are not settings of the run: where it lives, where a cache lives, and what
# each process held of the base under --fsdp (`anita.train.fsdp.base_bytes`).
NOT_SETTINGS = {"output", "reference_cache", "sharding"}
# Fields naming a file or directory (or a Hub id): compared by what they point to, not their spelling.
PATH_FIELDS = ("model", "data", "eval_data", "adapter")


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


class DamagedCheckpoint(AnitaError):
    """A checkpoint that fails verification; `--resume` falls back to an older one."""


class CheckpointWriteError(AnitaError):
    """A checkpoint file could not be written (a full disk, a file-size limit, a quota)."""

    def __init__(self, path, error: Exception):
        code = re.search(r"os error (\d+)", str(error))  # safetensors' Rust I/O errors carry the errno
        reason = getattr(error, "strerror", None) or (os.strerror(int(code.group(1))) if code else
                                                      str(error).splitlines()[0])
        super().__init__(f"could not write {path} ({reason})")
        self.path = path


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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return False


def clear_early_run(out: Path, info: DistInfo) -> None:
    """Empty a directory left by a run that stopped before its first checkpoint (rank 0)."""
    barrier(info)  # every rank has looked before rank 0 clears
    if info.is_main:
        metrics = out / "metrics.jsonl"
        logged = metrics.read_bytes().count(b"\n") if metrics.is_file() else 0  # any bytes: a torn tail too
        print(f"{out}: an earlier run stopped before its first checkpoint; starting afresh (its {logged} "
              "logged records are dropped)", flush=True)
        for p in out.iterdir():
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()


def normalize_path(value):
    """A path as the absolute path it names (so `runs/x`, `./runs/x/` and `/home/me/runs/x` are one);
    a value naming nothing on disk (a Hub id) as it is."""
    if isinstance(value, str) and value and os.path.exists(os.path.expanduser(value)):
        return str(Path(value).expanduser().resolve())
    return value


def run_settings(config: dict) -> dict:
    """What identifies a run in its config: every field but where it lives, paths normalized."""
    settings = {k: v for k, v in config.items() if k not in NOT_SETTINGS}
    return {**settings, **{k: normalize_path(settings[k]) for k in PATH_FIELDS if k in settings}}


def read_run_file(run_file: Path) -> dict:
    try:
        saved = json.loads(run_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AnitaError(f"{run_file}: not valid JSON (line {e.lineno}: {e.msg}); cannot resume") from None
    except RecursionError:
        raise AnitaError(f"{run_file}: JSON nested too deeply; cannot resume") from None
    except UnicodeDecodeError:
        raise AnitaError(f"{run_file}: not UTF-8 text; cannot resume") from None
    if not isinstance(saved, dict):
        raise AnitaError(f"{run_file}: holds a {type(saved).__name__}, expected a JSON object of settings; "
                         "cannot resume")
    return saved


def check_same_run(out: Path, config: dict, defaults: dict | None) -> None:
    """--resume: OUTPUT's run.json has this run's settings (a field added since: its default)."""
    saved = read_run_file(out / RUN_FILE)
    before, now = run_settings({**(defaults or {}), **saved}), run_settings(config)
    changed = differences(before, now)
    if changed:
        detail = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
        raise AnitaError(f"--resume: {out} holds a different run ({detail}); use another --output")


def prepare_run_dir(config: dict, output, resume: bool, info: DistInfo, defaults: dict | None = None) -> Path:
    """Create OUTPUT (rank 0) or check that it holds this very run when resuming.

    Without `resume` an OUTPUT with anything in it is refused (it would be clobbered); with it,
    OUTPUT must be empty or hold a run with the same settings (see `config.RESUMABLE_CHANGES` and
    `run_settings`: paths are compared by what they name, and the run directory may have moved).
    An OUTPUT that holds only what a run writes before its first checkpoint (see
    `stopped_before_first_checkpoint`) is not a run: it is cleared and used afresh, with or
    without `resume`. `defaults` stand in for fields an older run.json lacks.
    """
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise AnitaError(f"--output {out}: exists and is not a directory")
    occupied = out.is_dir() and any(out.iterdir())
    if occupied and stopped_before_first_checkpoint(out):
        clear_early_run(out, info)
        occupied = False
    if occupied and not resume:
        raise AnitaError(f"--output {out}: already holds files (a previous run?); pass --resume to continue "
                         "that run, or choose another --output")
    if occupied and not (out / RUN_FILE).is_file():
        raise AnitaError(f"--output {out}: holds files but no {RUN_FILE}; not an anita run to resume")
    if occupied:
        check_same_run(out, config, defaults)
    elif resume and info.is_main:
        print(f"--resume: {out} holds no checkpoint; starting a new run there", flush=True)
    barrier(info)  # every rank has checked before rank 0 writes
    if info.is_main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        write_json(out / RUN_FILE, {**config, **{k: normalize_path(config[k]) for k in PATH_FIELDS if k in config}})
    barrier(info)
    return out


def record_in_run_file(out: Path, key: str, value) -> None:
    """Add `key` (one of NOT_SETTINGS) to OUTPUT/run.json (rank 0)."""
    write_json(out / RUN_FILE, {**read_run_file(out / RUN_FILE), key: value})


# ------------------------------------------------------------------------------- listing
def checkpoint_dirs(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, dir), oldest first (temporary and set-aside dirs are never listed)."""
    root = Path(out) / "checkpoints"
    found = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := STEP_DIR.fullmatch(p.name))]
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoint_dirs(out)
    return found[-1][1] if found else None


# ------------------------------------------------------------------------------------ save
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_guarded(path: Path, write) -> None:
    """Run `write()`, turning a failed write (full disk, size limit, quota) into one that names `path`."""
    try:
        write()
    except (OSError, SafetensorError) as e:
        raise CheckpointWriteError(path, e) from None


def write_rank_files(tmp: Path, step: int, model, optimizer, scheduler, info: DistInfo, base_model) -> None:
    """This process's files of a checkpoint: its RNG; on rank 0 also adapter, optimizer, state.
    A sharded model: every process also writes its shards into dcp/, and the adapter is gathered
    for rank 0 to write; both are collectives, so they come before any write that could fail on
    one process alone."""
    sharded = is_sharded(model)
    if sharded:
        try:
            save_sharded(tmp / DCP_DIR, model, optimizer)
        except CheckpointException as e:  # raised on every process when any failed
            raise CheckpointWriteError(tmp / DCP_DIR, e) from None
        adapter = full_adapter(model)
    write_guarded(tmp / rng_file(info.rank), lambda: save_safetensors(rng_tensors(), tmp / rng_file(info.rank)))
    if not info.is_main:
        return
    write_guarded(tmp / "adapter", lambda: save_adapter(model, tmp / "adapter", base_model_name_or_path=base_model,
                                                        tensors=adapter if sharded else None))
    tensors: dict[str, torch.Tensor] = {}
    tree = {"scheduler": to_tree(scheduler.state_dict(), tensors, "scheduler")}
    if not sharded:
        tree["optimizer"] = to_tree(optimizer.state_dict(), tensors, "optimizer")
    write_guarded(tmp / OPTIMIZER_FILE, lambda: save_safetensors(tensors, tmp / OPTIMIZER_FILE))
    write_guarded(tmp / TRAINER_FILE, lambda: write_json(tmp / TRAINER_FILE, tree))
    write_guarded(tmp / STATE_FILE, lambda: write_json(tmp / STATE_FILE, {"step": step, "world_size": info.world_size}))


def write_manifest(tmp: Path) -> None:
    files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    digests = {p.relative_to(tmp).as_posix(): sha256(p) for p in files}
    write_guarded(tmp / MANIFEST_FILE, lambda: write_json(tmp / MANIFEST_FILE, {"sha256": digests}))


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, info: DistInfo, keep: int,
                    base_model: str | None = None) -> Path:
    """Write checkpoint `step` atomically (all ranks call this); keep only the newest `keep`.

    A write that fails on any process raises `CheckpointWriteError` on every process (naming the
    file where it failed), after the half-written directory is removed; the older checkpoints are
    untouched."""
    root = Path(out) / "checkpoints"
    final, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir(parents=True)
    barrier(info)
    error = None
    try:
        write_rank_files(tmp, step, model, optimizer, scheduler, info, base_model)
    except CheckpointWriteError as e:
        error = e
    failed = all_reduce_sum(torch.tensor([float(error is not None)]), info).item() > 0
    if not failed and info.is_main:
        try:
            write_manifest(tmp)  # after the barrier inside all_reduce: every rank's RNG file is there
        except CheckpointWriteError as e:
            error = e
    failed = all_reduce_sum(torch.tensor([float(error is not None)]), info).item() > 0
    if failed:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space the half-written files took
        raise error or CheckpointWriteError(tmp, OSError("another process could not write its files"))
    if info.is_main:
        replace_dir(tmp, final)  # the checkpoint appears complete, or not at all
        for _, old in checkpoint_dirs(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


# ---------------------------------------------------------------------------------- verify
def check_manifest(path: Path, only: tuple[str, ...] | None = None, root: Path | None = None) -> dict:
    """Every file the manifest of checkpoint `path` lists (or just `only`) exists under `root`
    (default: `path`) with its sha256; returns the manifest's {file: sha256}."""
    if (path / "trainer_state.pt").exists() or any(path.glob("rng-rank*.pt")):
        raise DamagedCheckpoint(f"{path}: written by an older anita as torch pickles (trainer_state.pt), which "
                                "this version never reads (unpickling a file can run code); finish that run with "
                                "the anita that started it, or start a new one")
    digests = read_json(path / MANIFEST_FILE).get("sha256")
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise DamagedCheckpoint(f"{path / MANIFEST_FILE}: expected {{'sha256': {{file: hex digest}}}}")
    required = (STATE_FILE, TRAINER_FILE, OPTIMIZER_FILE, *ADAPTER_FILES)
    for name in only or sorted(set(digests) | set(required)):
        file = (root or path) / name
        if name not in digests:
            raise DamagedCheckpoint(f"{path / MANIFEST_FILE}: does not list {name}")
        if not file.is_file():
            raise DamagedCheckpoint(f"{file}: missing")
        if sha256(file) != digests[name]:
            raise DamagedCheckpoint(f"{file}: sha256 differs from the manifest's (truncated or changed since written)")
    return digests


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise DamagedCheckpoint(f"{path}: missing")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DamagedCheckpoint(f"{path}: not valid JSON ({str(e) or 'nested too deeply'})") from None
    if not isinstance(value, dict):
        raise DamagedCheckpoint(f"{path}: holds a {type(value).__name__}, expected a JSON object")
    return value


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise DamagedCheckpoint(f"{path}: cannot read safetensors ({str(e).splitlines()[0]})") from None


def read_step_state(path: Path, step: int) -> dict:
    state = read_json(path / STATE_FILE)
    for key in ("step", "world_size"):
        if not isinstance(state.get(key), int) or isinstance(state[key], bool) or state[key] < 1:
            raise DamagedCheckpoint(f"{path / STATE_FILE}: {key!r} must be a positive integer, got {state.get(key)!r}")
    if state["step"] != step:
        raise DamagedCheckpoint(f"{path / STATE_FILE}: says step {state['step']}, the directory step {step}")
    return state


def read_adapter(path: Path, model) -> dict[str, torch.Tensor]:
    """The checkpoint's adapter tensors under the model's keys: all there, finite, of the model's shapes."""
    file = path / ADAPTER_FILES[0]
    tensors = {k.removeprefix(PEFT_PREFIX): t for k, t in read_tensors(file).items()}
    own = lora_state_dict(model)
    if set(tensors) != set(own):
        odd = sorted(set(tensors) ^ set(own))
        raise DamagedCheckpoint(f"{file}: its tensors are not this run's LoRA tensors ({odd[0]!r} differs)")
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise DamagedCheckpoint(f"{file}: tensor {k!r} has shape {tuple(t.shape)}, this run's LoRA "
                                    f"{tuple(own[k].shape)}")
        if not torch.isfinite(t).all():
            raise DamagedCheckpoint(f"{file}: tensor {k!r} holds non-finite values")
    return tensors


def read_checkpoint(path: Path, model, optimizer, info: DistInfo) -> dict:
    """Everything in checkpoint `path`, verified, without changing the run; raises
    `DamagedCheckpoint` naming the file at fault."""
    step = int(STEP_DIR.fullmatch(path.name).group(1))
    check_manifest(path)
    state = read_step_state(path, step)
    if state["world_size"] != info.world_size:
        raise AnitaError(f"{path}: written by {state['world_size']} process(es), resumed with {info.world_size}; "
                         "the data order depends on it, so resume with the same number of processes")
    if not (path / rng_file(info.rank)).is_file():
        raise DamagedCheckpoint(f"{path / rng_file(info.rank)}: missing")
    trainer = read_json(path / TRAINER_FILE)
    tensors = read_tensors(path / OPTIMIZER_FILE)
    where = str(path / TRAINER_FILE)
    sharded = is_sharded(model)  # then the optimizer state is in dcp/, loaded by `apply_checkpoint`
    if sharded and f"{DCP_DIR}/.metadata" not in read_json(path / MANIFEST_FILE)["sha256"]:
        raise DamagedCheckpoint(f"{path / MANIFEST_FILE}: does not list {DCP_DIR}/.metadata (the sharded state)")
    try:
        optim_state = None if sharded else from_tree(trainer.get("optimizer"), tensors, where)
        scheduler_state = from_tree(trainer.get("scheduler"), tensors, where)
        if not sharded:
            check_optimizer_state(optim_state, optimizer, where)
    except AnitaError as e:
        raise DamagedCheckpoint(str(e)) from None
    except RecursionError:
        raise DamagedCheckpoint(f"{where}: nested too deeply") from None
    if not isinstance(scheduler_state, dict):
        raise DamagedCheckpoint(f"{where}: no scheduler state")
    rng = path / rng_file(info.rank)
    return {"step": step, "adapter": read_adapter(path, model), "optimizer": optim_state,
            "scheduler": scheduler_state, "rng": read_tensors(rng), "rng_file": rng}


# ------------------------------------------------------------------------------------ load
def apply_checkpoint(path: Path, loaded: dict, model, optimizer, scheduler) -> None:
    """Put what `read_checkpoint` returned into the run (all of it: a later one replaces all); a
    sharded model's adapter and optimizer shards come from dcp/ (every process calls this)."""
    try:
        if is_sharded(model):
            load_sharded(path / DCP_DIR, model, optimizer)
        else:
            load_lora_state_dict(model, loaded["adapter"])
            optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["scheduler"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise DamagedCheckpoint(f"{path / TRAINER_FILE}: does not fit this run's optimizer ({e})") from None
    try:
        set_rng_tensors(loaded["rng"], str(loaded["rng_file"]))
    except AnitaError as e:
        raise DamagedCheckpoint(str(e)) from None


def load_checkpoint(path: Path, model, optimizer, scheduler, info: DistInfo) -> int:
    """Verify checkpoint `path`, then restore adapter, optimizer, scheduler and this rank's RNG; returns the step.
    A sharded model loads only a checkpoint that every process verified (the load is a collective)."""
    try:
        loaded, error = read_checkpoint(path, model, optimizer, info), None
    except DamagedCheckpoint as e:
        loaded, error = None, e
    if is_sharded(model) and all_reduce_sum(torch.tensor([float(error is not None)]), info).item() > 0:
        error = error or DamagedCheckpoint(f"{path}: another process found it damaged")
    if error is not None:
        raise error
    apply_checkpoint(path, loaded, model, optimizer, scheduler)
    return loaded["step"]


def load_latest(out: Path, model, optimizer, scheduler, info: DistInfo) -> tuple[int, Path | None]:
    """(step, checkpoint) of the newest checkpoint that verifies and loads, or (0, None) when there
    is none at all. Newer damaged ones are set aside (`.damaged-step-N`) and reported in one line;
    when every checkpoint is damaged, one error line names the newest's problem."""
    found = checkpoint_dirs(out)
    damaged: list[tuple[Path, str]] = []
    for step, path in reversed(found):
        try:
            load_checkpoint(path, model, optimizer, scheduler, info)
        except DamagedCheckpoint as e:
            damaged.append((path, str(e)))
            continue
        if info.enabled and all_reduce_sum(torch.tensor([float(step)]), info).item() != step * info.world_size:
            raise AnitaError(f"{out}: the processes found different checkpoints to resume from")
        if damaged:
            set_aside(damaged, path, info)
        return step, path
    if damaged:
        raise AnitaError(f"{out}: no usable checkpoint to resume from ({len(damaged)} checked); the newest, "
                         f"{damaged[0][1]}. Start afresh in another --output")
    return 0, None


def set_aside(damaged: list[tuple[Path, str]], good: Path, info: DistInfo) -> None:
    """Rename damaged checkpoints newer than `good` to `.damaged-step-N` (rank 0) and say so in one line."""
    barrier(info)  # every rank has read before rank 0 renames
    if info.is_main:
        for path, _ in damaged:
            replace_dir(path, path.with_name(f".damaged-{path.name}"))
        names = ", ".join(p.name for p, _ in damaged)
        print(f"resume: {names} damaged ({damaged[0][1]}); resuming from the newest good checkpoint, {good} "
              f"(the damaged one(s) kept as .damaged-*)", flush=True)
    barrier(info)


# ---------------------------------------------------------------------------------- export
def export_adapter(checkpoint: Path, out: Path) -> Path:
    """Copy a checkpoint's adapter to OUTPUT/adapter: only after its files match the checkpoint's
    manifest, through a temporary directory whose copy is checked again, then a rename. A damaged
    checkpoint raises and leaves OUTPUT/adapter as it was."""
    check_manifest(checkpoint, only=ADAPTER_FILES)
    final, tmp = Path(out) / "adapter", Path(out) / ".tmp-adapter"
    shutil.rmtree(tmp, ignore_errors=True)
    write_guarded(final, lambda: shutil.copytree(checkpoint / "adapter", tmp / "adapter"))
    check_manifest(checkpoint, only=ADAPTER_FILES, root=tmp)
    replace_dir(tmp / "adapter", final)
    shutil.rmtree(tmp, ignore_errors=True)
    return final


def adapter_is_finite(model, info: DistInfo | None = None) -> bool:
    """True when every adapter weight is finite (a checkpoint of NaN weights is not 'good'); a
    sharded model's processes (`info` is then needed) check their shards and agree."""
    bad = sum(not torch.isfinite(local(t)).all() for t in lora_state_dict(model).values())
    if is_sharded(model):
        bad = all_reduce_sum(torch.tensor([float(bad)]), info).item()
    return bad == 0
