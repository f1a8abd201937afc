"""`DataSource`: what `--data` names, resolved to files, read as one stream of rows.

A source is a local data file (any type of `anita.sources.files`), a local directory laid out like
a Hub dataset (`anita.sources.layout`), or a Hub dataset id `org/name` (`anita.sources.hub`). A
directory or Hub id is read for one split (None: "train") of one config (subset); several files
(shards) are read one after the other in sorted order. `max_rows` keeps the first N rows: the same
slice on every run.

The fingerprint names the exact bytes read, cheaply: a file in huggingface-hub's cache by its blob
name (the content's hash), any other file by its resolved path, size and modification time.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from anita.errors import AnitaError
from anita.sources.files import Record, read_file
from anita.sources.hub import dataset_files
from anita.sources.layout import select_files

DEFAULT_SPLIT = "train"


@dataclass(frozen=True)
class DataSource:
    name: str  # as the user gave it
    files: tuple[Path, ...]
    split: str | None = None  # None for a single file
    config: str | None = None

    @property
    def label(self) -> str:
        """How messages name the source: the file, or `name [config/]split`."""
        if self.split is None:
            return self.name
        return f"{self.name} [{self.config + '/' if self.config else ''}{self.split}]"

    def records(self, max_rows: int | None = None) -> Iterator[Record]:
        """Every row (the first `max_rows`), file after file."""
        rows = itertools.chain.from_iterable(read_file(f) for f in self.files)
        return itertools.islice(rows, max_rows) if max_rows is not None else rows

    def fingerprint(self) -> str:
        parts = [self.split, self.config] + [file_identity(f) for f in self.files]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def file_identity(path: Path) -> list:
    real = path.resolve()
    stat = real.stat()
    if real.parent.name == "blobs":  # huggingface-hub cache: the blob is named by its content hash
        return [real.name, stat.st_size]
    return [str(real), stat.st_size, stat.st_mtime_ns]


def looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "." not in parts[0][:1] \
        and not name.lower().endswith(tuple([".jsonl", ".json", ".parquet", ".csv", ".arrow", ".gz", ".txt"]))


def open_source(name, split: str | None = None, config: str | None = None, what: str = "data file") -> DataSource:
    """Resolve what `--data` names; AnitaError if it is none of a file, a dataset directory or a Hub id,
    or if a `split` or `config` is given for a single file (it has neither, and would be ignored)."""
    if isinstance(name, DataSource):
        return name
    text = os.fspath(name)
    path = Path(text).expanduser()
    if path.is_file():
        for kind, given in (("config", config), ("split", split)):
            if given is not None:
                raise AnitaError(f"{text}: a single file has no {kind}s ({kind} {given!r} given); {kind}s are for a "
                                 "dataset directory or Hub id")
        return DataSource(text, (path,))
    split = split or DEFAULT_SPLIT
    if path.is_dir():
        paths = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        readme = (path / "README.md").read_text(encoding="utf-8") if (path / "README.md").is_file() else None
        files = select_files(paths, readme, split, config, text)
        return DataSource(text, tuple(path / f for f in files), split, config)
    if path.exists() or not looks_like_repo_id(text):
        raise AnitaError(f"{text}: no such {what}")
    return DataSource(text, tuple(dataset_files(text, split, config)), split, config)
