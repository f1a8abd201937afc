"""Tests for anita/train/checkpoint.py (with the loop and `anita sft` around it): a run killed
with SIGKILL and resumed ends with exactly the adapter of an uninterrupted run; the run
directory refuses to be clobbered, but a directory without a checkpoint is not a run and a moved
one still is; a damaged checkpoint is never used (the newest good one is, and says so), and a
good exported adapter is never replaced by a worse one; a full disk while checkpointing is one
line naming the file; half-written checkpoints are never resumed from.

The runs are those of tests/train/runs.py (tiny, but crossing epochs, with dropout and an 8-bit
optimizer); the oracle of every resume is the uninterrupted run's adapter.
"""

import errno
import json
import os
import re
import resource
import shutil
import signal
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import anita.files
from anita.cli import main
from anita.errors import AnitaError
from anita.train.checkpoint import check_manifest, latest_checkpoint, load_latest, prepare_run_dir, write_manifest
from anita.train.config import TrainConfig
from anita.train.distributed import DistInfo
from anita.train.loop import build_training, plan_run, save
from anita.train.model import load_trainable_model
from tests.train.conftest import chat_rows, write_jsonl
from tests.train.runs import STEPS, adapter, losses, same_tensors, sft_args, start_anita


def run_and_kill(args: list[str], out, after_step: int) -> int:
    """Start `anita sft` in a subprocess and SIGKILL it once checkpoint `after_step` exists."""
    proc = start_anita(args)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        last = latest_checkpoint(out) if (out / "checkpoints").is_dir() else None
        if last is not None and int(last.name.split("-")[1]) >= after_step:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    return int(latest_checkpoint(out).name.split("-")[1])


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, tiny_run_model, whole_run):
    data, whole = whole_run
    killed = tmp_path / "killed"
    reached = run_and_kill(sft_args(tiny_run_model, data, killed), killed, after_step=3)
    assert reached < STEPS and not (killed / "adapter").exists()  # really killed mid-run
    assert main(sft_args(tiny_run_model, data, killed, "--resume")) == 0
    assert same_tensors(adapter(whole), adapter(killed))
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
    prepare_run_dir({**cfg, "checkpointing": "selective"}, out, resume=True, info=DistInfo())  # bit-equal modes
    prepare_run_dir({**cfg, "chunk_size": 512}, out, resume=True, info=DistInfo())  # a run from before 256
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(AnitaError, match="no run.json"):
        prepare_run_dir(cfg, tmp_path / "other", resume=True, info=DistInfo())


def test_a_run_with_bf16_adapters_exports_them_and_its_adapter_dtype_cannot_change_on_resume(tmp_path, tiny_run_model,
                                                                                             capsys):
    """`anita sft --adapter-dtype bf16` (TRL's QLoRA adapters) trains, checkpoints and exports a bf16
    PEFT adapter; resuming it in fp32 would restart the optimizer's state in another dtype, so it is
    one error line and the run is left as it was."""
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    out = tmp_path / "run"
    args = sft_args(tiny_run_model, data, out, "--adapter-dtype", "bf16")  # with bitsandbytes' AdamW 8-bit
    args[args.index("--max-steps") + 1] = "4"
    assert main(args) == 0
    exported = adapter(out)
    assert exported and all(t.dtype == torch.bfloat16 and torch.isfinite(t).all() for t in exported.values())
    assert any(t.abs().sum() > 0 for k, t in exported.items() if "lora_B" in k)  # trained: B left 0
    capsys.readouterr()
    args[args.index("--adapter-dtype") + 1] = "fp32"
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "adapter_dtype: 'bf16' -> 'fp32'" in err and len(err.strip().splitlines()) == 1
    assert same_tensors(adapter(out), exported)


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_that_stopped_before_its_first_checkpoint_is_not_a_run(tmp_path, resume, capsys):
    """run.json, metrics.jsonl and an empty or half-written checkpoints/ without one complete
    checkpoint: the corrected command (changed settings, with or without --resume) starts afresh;
    a file anita did not write keeps the directory refused, and is never deleted."""
    out = prepare_run_dir({"lr": float("nan")}, tmp_path / "run", resume=False, info=DistInfo())
    (out / "metrics.jsonl").write_bytes(b'{"step": 0, "eval_loss": 1.0}\n{"st\xff')  # with a torn tail
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
    {"run.json": "[" * 100_000 + "]" * 100_000},  # nor this (before: a RecursionError traceback)
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
    import anita.train.model

    def no_model(*_):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(anita.train.model, "load_trainable_model", no_model)  # what sft's and dpo's start_run call
    rows = chat_rows(4) if command == "sft" else [{"prompt": f"p{i}", "chosen": "si", "rejected": "no"} for i in range(4)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    argv = [command, "--model", str(tiny_run_model), "--data", data, "--output", str(tmp_path / "out"),
            "--batch-size", "2", "--grad-accum", "4", "--no-progress"]
    assert main(argv) == 2
    assert "one optimizer step needs 4" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ --resume: settings, not spellings
@pytest.mark.parametrize("output, data, relocate", [
    ("runs/a", "data.jsonl", None),  # the same spelling
    ("{tmp}/runs/a", "{tmp}/data.jsonl", None),  # absolute
    ("runs/a/", "./data.jsonl", None),  # trailing '/', './'
    ("runs/../runs/a", "sub/../data.jsonl", None),  # '..'
    ("runs/b", "data.jsonl", "move"),  # the run directory moved
    ("{tmp}/runs/b/", "data.jsonl", "copy"),  # ... or copied
])
def test_resume_compares_the_settings_not_how_paths_are_spelled(tmp_path, monkeypatch, output, data, relocate):
    """Before: run.json's path strings were compared, so `--output /abs/runs/a` or `runs/a/`, or a
    moved run directory, was 'a different run'. Another data file still is."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    for name in ("data.jsonl", "other.jsonl"):
        (tmp_path / name).write_text("{}\n")
    first = {"output": "runs/a", "data": "data.jsonl", "lr": 1e-3}
    (prepare_run_dir(first, "runs/a", resume=False, info=DistInfo()) / "checkpoints" / "step-000001").mkdir()
    if relocate:
        (shutil.move if relocate == "move" else shutil.copytree)("runs/a", "runs/b")
    output, data = output.format(tmp=tmp_path), data.format(tmp=tmp_path)
    prepare_run_dir({**first, "output": output, "data": data}, output, resume=True, info=DistInfo())
    with pytest.raises(AnitaError, match=r"holds a different run \(data: '.*/data.jsonl' -> '.*/other.jsonl'\)"):
        prepare_run_dir({**first, "output": output, "data": "other.jsonl"}, output, resume=True, info=DistInfo())


@pytest.mark.parametrize("content, message", [
    (b"[1, 2]", "run.json: holds a list, expected a JSON object"),  # before: a TypeError traceback
    (b'"lr"', "run.json: holds a str"),
    (b'{"lr": 0.001', r"run.json: not valid JSON \(line 1"),
    (b"\xff\xfe{}", "run.json: not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "run.json: JSON nested too deeply"),
])
def test_a_damaged_run_json_is_one_line(tmp_path, content, message):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-000001").mkdir(parents=True)
    (out / "run.json").write_bytes(content)
    with pytest.raises(AnitaError, match=message):
        prepare_run_dir({"lr": 1e-3}, out, resume=True, info=DistInfo())
    assert (out / "run.json").read_bytes() == content


@pytest.mark.parametrize("exists", [False, True])
def test_resume_where_there_is_no_run_starts_one_and_says_so(tmp_path, capsys, exists):
    """No checkpoint, no run: --resume there starts a new run (documented) rather than refusing."""
    if exists:
        (tmp_path / "run").mkdir()
    prepare_run_dir({"lr": 1e-3}, tmp_path / "run", resume=True, info=DistInfo())
    assert "holds no checkpoint; starting a new run there" in capsys.readouterr().out


# --------------------------------------------------------------- damaged checkpoints: verify, fall back
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_run_model):
    """(argv, out): a finished 3-step run that kept all three checkpoints."""
    tmp = tmp_path_factory.mktemp("finished")
    data = write_jsonl(tmp / "train.jsonl", chat_rows(16))
    argv = sft_args(tiny_run_model, data, tmp / "run", "--max-steps", "3", "--keep-checkpoints", "3")
    assert main(argv) == 0
    return argv, tmp / "run"


def copy_run(finished_run, tmp_path):
    argv, out = finished_run
    shutil.copytree(out, tmp_path / "run")
    return [str(tmp_path / "run") if a == str(out) else a for a in argv], tmp_path / "run"


def agreeing_manifest(checkpoint):
    """Rewrite the manifest after a damage, as if the damaged file had been written so: then only
    the content checks (JSON, shapes, finiteness, the optimizer's fit) can catch it."""
    (checkpoint / "manifest.json").unlink()
    write_manifest(checkpoint)


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def text(content):
    return lambda path: path.write_text(content)


def nan_adapter(path):
    tensors = load_file(path)
    key = sorted(tensors)[-1]
    tensors[key] = tensors[key].clone().fill_(float("nan"))
    save_file(tensors, path, metadata={"format": "pt"})


def wider_adapter(path):
    tensors = load_file(path)
    key = sorted(tensors)[-1]
    tensors[key] = torch.cat([tensors[key], tensors[key]])
    save_file(tensors, path, metadata={"format": "pt"})


def flat_moments(path):
    save_file({k: v.flatten() if k.endswith("state1") else v for k, v in load_file(path).items()}, path)


def short_rng(path):
    save_file({"torch": torch.zeros(10, dtype=torch.uint8)}, path)


def planted_pickle(path):
    """An old checkpoint's trainer_state.pt, holding a pickle that would create `pwned` if unpickled."""
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {path.parents[2] / 'pwned'}",)

    torch.save({"optimizer": Payload()}, path)


DAMAGED = [  # (file of the newest checkpoint, damage, manifest agreeing, message)
    ("state.json", text("{"), True, "state.json: not valid JSON"),
    ("state.json", text('{"world_size": 1}'), True, "'step' must be a positive integer, got None"),
    ("state.json", text('{"step": "3", "world_size": 1}'), True, "'step' must be a positive integer, got '3'"),
    ("state.json", text("[3, 1]"), True, "state.json: holds a list"),
    ("state.json", text('{"step": 3, "world_size": 1} '), False, "state.json: sha256 differs"),
    ("optimizer.safetensors", truncate, False, "optimizer.safetensors: sha256 differs"),
    ("optimizer.safetensors", truncate, True, "optimizer.safetensors: cannot read safetensors"),
    ("optimizer.safetensors", flat_moments, True, "optimizer state state1 of parameter 0 has shape"),
    ("trainer_state.json", text("[]"), True, "trainer_state.json: holds a list"),
    ("trainer_state.json", text('{"optimizer": {"dict": {}}, "scheduler": {"dict": {}}}'), True,
     "lacks 'state' or 'param_groups'"),
    ("trainer_state.json", text('{"optimizer": {"pickle": "x"}}'), True, "unknown tag 'pickle'"),
    ("trainer_state.json", text("[" * 100_000 + "]" * 100_000), True, "trainer_state.json: not valid JSON"),
    ("rng-rank0.safetensors", truncate, True, "rng-rank0.safetensors: cannot read safetensors"),
    ("rng-rank0.safetensors", short_rng, True, "rng-rank0.safetensors: not a valid RNG state"),
    ("adapter/adapter_model.safetensors", nan_adapter, True, "holds non-finite values"),
    ("adapter/adapter_model.safetensors", nan_adapter, False, "adapter_model.safetensors: sha256 differs"),
    ("adapter/adapter_model.safetensors", wider_adapter, True, r"has shape \(64, 2\), this run's LoRA \(32, 2\)"),
    ("adapter/adapter_config.json", os.remove, False, "adapter_config.json: missing"),
    ("manifest.json", os.remove, False, "manifest.json: missing"),
    ("trainer_state.pt", planted_pickle, False, "older anita as torch pickles"),
]


def resume_state(out):
    """What `--resume` of the run in `out` loads: (step, checkpoint), through the library."""
    cfg = TrainConfig(**json.loads((out / "run.json").read_text()))
    model, _ = load_trainable_model(cfg, DistInfo())
    _, optimizer, scheduler = build_training(model, cfg, plan_run(cfg, 8, DistInfo()))
    return load_latest(out, model, optimizer, scheduler, DistInfo())


@pytest.mark.parametrize("file, damage, agreeing, message", DAMAGED)
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_good_one(finished_run, tmp_path, capsys,
                                                                       file, damage, agreeing, message):
    """Before: each of these was a traceback on --resume (or, for a NaN adapter, silently used)."""
    _, out = copy_run(finished_run, tmp_path)
    newest = out / "checkpoints" / "step-000003"
    damage(newest / file)
    if agreeing:
        agreeing_manifest(newest)
    assert resume_state(out) == (2, out / "checkpoints" / "step-000002")
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "step-000003 damaged" in printed[0] and "step-000002" in printed[0]
    assert re.search(message, printed[0]), printed[0]
    assert (out / "checkpoints" / ".damaged-step-000003").is_dir() and not newest.exists()  # kept, set aside
    assert not (out / "pwned").exists()  # nothing was unpickled


@pytest.mark.parametrize("file, damage, agreeing, message", [d for d in DAMAGED if d[3] in (
    "state.json: not valid JSON", "holds non-finite values", "older anita as torch pickles")])
def test_with_every_checkpoint_damaged_resume_is_one_error_line(finished_run, tmp_path, file, damage, agreeing,
                                                                 message):
    _, out = copy_run(finished_run, tmp_path)
    for checkpoint in (out / "checkpoints").iterdir():
        damage(checkpoint / file)
        if agreeing:
            agreeing_manifest(checkpoint)
    expected = rf"no usable checkpoint to resume from \(3 checked\); the newest, .*step-000003.*{message}"
    with pytest.raises(AnitaError, match=expected):
        resume_state(out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002", "step-000003"]
    assert not (out / "pwned").exists()


def nan_newest_adapter(out):
    nan_adapter(out / "checkpoints" / "step-000003" / "adapter" / "adapter_model.safetensors")
    agreeing_manifest(out / "checkpoints" / "step-000003")


def nan_every_adapter(out):
    for checkpoint in (out / "checkpoints").iterdir():
        nan_adapter(checkpoint / "adapter" / "adapter_model.safetensors")


def list_run_json(out):
    (out / "run.json").write_text("[1]")


def torn_metrics(out):
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 5.1, "lr"')  # what a kill during an append leaves


@pytest.mark.parametrize("damage, code, says", [
    (nan_newest_adapter, 0, "step-000003 damaged"),  # before: copied over OUTPUT/adapter unchecked
    (torn_metrics, 0, "dropped its last line"),  # before: JSONDecodeError traceback
    (nan_every_adapter, 2, "no usable checkpoint"),
    (list_run_json, 2, "run.json: holds a list"),  # before: a TypeError traceback
])
def test_resume_of_a_finished_run_never_replaces_a_good_adapter_with_a_worse_one(finished_run, tmp_path, capsys,
                                                                                 damage, code, says):
    argv, out = copy_run(finished_run, tmp_path)
    good = {p.name: p.read_bytes() for p in (out / "adapter").iterdir()}
    damage(out)
    assert main(argv + ["--resume"]) == code
    printed = capsys.readouterr()
    assert says in (printed.out + printed.err) and "Traceback" not in printed.err
    if code:
        assert printed.err.count("\n") == 1  # one line
    assert {p.name: p.read_bytes() for p in (out / "adapter").iterdir()} == good  # retrained to the same, or kept
    if code == 0:
        assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3]


# ------------------------------------------------------------------------ a full disk while checkpointing
@pytest.mark.parametrize("name, code", [
    ("rng-rank0.safetensors", errno.ENOSPC),
    ("adapter_model.safetensors", errno.ENOSPC),
    ("optimizer.safetensors", errno.EDQUOT),
    ("trainer_state.json", errno.ENOSPC),
    ("state.json", errno.EFBIG),
    ("manifest.json", errno.ENOSPC),
])
def test_a_full_disk_while_checkpointing_is_one_line_naming_the_file(tmp_path, tiny_run_model, monkeypatch, capsys,
                                                                     name, code):
    """The write of `name` in checkpoint 2 fails as a full disk makes it fail: one line naming the
    file and the last good checkpoint (before: a torch traceback); no half checkpoint is left."""
    real = anita.files.atomic_write

    def failing(path, write):
        if os.path.basename(path) == name and ".tmp-step-000002" in str(path):
            raise OSError(code, os.strerror(code))
        return real(path, write)

    monkeypatch.setattr(anita.files, "atomic_write", failing)
    out = tmp_path / "run"
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    assert main(sft_args(tiny_run_model, data, out, "--max-steps", "3")) == 2
    err = capsys.readouterr().err
    file = out / "checkpoints" / ".tmp-step-000002" / ("adapter" if name.startswith("adapter") else name)
    assert err.count("\n") == 1 and f"could not write {file} ({os.strerror(code)})" in err
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-000001'}" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]
    check_manifest(out / "checkpoints" / "step-000001")  # intact
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_a_file_size_limit_while_checkpointing_names_the_file(finished_run, tmp_path):
    """A real `ulimit -f` (RLIMIT_FSIZE, set in this process for the save only; Python ignores
    SIGXFSZ, so the write fails with EFBIG) below the RNG file's size (about 5 KB): the error
    names that file, in the words of the OS, and the last good checkpoint; nothing half-written
    is left."""
    _, out = copy_run(finished_run, tmp_path)
    cfg = TrainConfig(**json.loads((out / "run.json").read_text()))
    model, _ = load_trainable_model(cfg, DistInfo())
    _, optimizer, scheduler = build_training(model, cfg, plan_run(cfg, 8, DistInfo()))
    last = out / "checkpoints" / "step-000003"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(AnitaError) as error:
            save(out, 4, model, optimizer, scheduler, cfg, DistInfo(), None, last)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    rng = out / "checkpoints" / ".tmp-step-000004" / "rng-rank0.safetensors"
    assert str(error.value) == (f"step 4: could not write {rng} (File too large), so checkpoint 4 was not saved; "
                                f"the last good checkpoint is {last}. Free some space, then --resume")
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000001", "step-000002", "step-000003"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
