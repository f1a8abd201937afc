"""anita/files.py: a written file appears whole or not at all, with ordinary permissions."""

import os

import pytest

import torch
from safetensors.torch import load_file

from anita.files import atomic_write, replace_dir, save_safetensors, write_json, write_text


def test_written_files_get_the_umasks_permissions(tmp_path):
    """Like open(path, "w"): 0o666 less the umask (mkstemp's 0o600 would lock others out of a
    shared cache or run directory)."""
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "run.json", {"lr": 1e-4})
        write_text(tmp_path / "m.jsonl", "{}\n")
        save_safetensors({"w": torch.ones(2)}, tmp_path / "w.safetensors")  # safetensors itself writes 0o600
    finally:
        os.umask(old)
    for name in ("run.json", "m.jsonl", "w.safetensors"):
        assert oct(os.stat(tmp_path / name).st_mode & 0o777) == oct(0o644), name
    assert torch.equal(load_file(tmp_path / "w.safetensors")["w"], torch.ones(2))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    write_json(target, {"step": 1})

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write('{"step": 2, "half')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, fail)
    assert target.read_text() == '{\n  "step": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_replace_dir_swaps_in_the_new_directory(tmp_path):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "old.txt").write_text("old")
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "new.txt").write_text("new")
    replace_dir(tmp_path / ".tmp", tmp_path / "final")
    assert [p.name for p in (tmp_path / "final").iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    replace_dir_into_missing = tmp_path / "other"
    (tmp_path / ".tmp2").mkdir()
    replace_dir(tmp_path / ".tmp2", replace_dir_into_missing)
    assert replace_dir_into_missing.is_dir()
