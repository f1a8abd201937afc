"""Writing files so that a crash never leaves half of one: write beside the target, then rename.

A rename within one file system is atomic on POSIX, so a reader (or a resumed run) sees the old
file or the new one, never a mix. (No fsync: this guards against a killed process, not against
power loss.) Temporary names start with "." and are unique per call, so two processes writing the
same target cannot collide.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from safetensors.torch import save_file


def atomic_write(path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_name)` for a temporary file beside `path`, then rename it into place. The file
    is created as `open(path, "w")` would create it, so it gets the usual permissions (the umask's)."""
    path = Path(path)
    tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    mode = os.stat(tmp).st_mode  # 0o666 less the umask
    try:
        write(tmp)
        os.chmod(tmp, mode)  # some writers (safetensors) make their files owner-only
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_safetensors(tensors: dict, path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, atomically and with ordinary permissions."""
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})}))


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def replace_dir(tmp, final) -> None:
    """Put the complete directory `tmp` at `final`. What was there is first renamed aside and
    removed only once the new one is in place, so a crash never loses both."""
    final = Path(final)
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)

