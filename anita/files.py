"""Writing files so that a crash never leaves half of one: write beside the target, then rename.

A rename within one file system is atomic on POSIX, so a reader (or a resumed run) sees the old
file or the new one, never a mix. Temporary names start with "." and are unique per call, so two
processes writing the same target cannot collide.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_name)` for a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def replace_dir(tmp, final) -> None:
    """Put the complete directory `tmp` at `final`, replacing what was there."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
