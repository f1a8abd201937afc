"""Tokenized data as flat int32 arrays, memory-mapped from an on-disk cache.

A data set of N records, each of K token segments (SFT: one example; DPO: prompt, chosen, rejected;
KTO: prompt, completion), is three arrays:

    tokens   int32 [total tokens]   (tokens.int32, raw) every segment of every record, back to back
    offsets  int64 [N·K + 1]         segment j of record i is tokens[offsets[i·K + j] : offsets[i·K + j + 1]]
    rows     int64 [N]               where record i came from (its line or row in the source)

So a token costs 4 bytes, and an index costs 8 bytes per segment: UltraChat-200k's ~300M tokens
are 1.2 GB on disk, paged in as the shuffled order reads them, never Python lists of ints. SFT's
loss mask rides in the sign bit: a trained token is stored as its id, an untrained one as −(id + 1)
(`encode_masked` / `decode_masked`), so an example is one segment.

The cache: `$ANITA_DATA_CACHE` (default `$ANITA_CACHE/tokenized`, i.e. ~/.cache/anita/tokenized), one
folder per key, named by the sha256 of the key. The key covers everything that changes the tokens:
the source's fingerprint and slice, the column mapping, the tokenizer (its whole tokenizer.json),
the chat template, the lengths and the reader's version. A folder is written under a temporary name
and renamed when complete, so a crash leaves no half cache; a second run (or a `--resume`) finds it
and says so. The folder's meta.json holds the key and the reader's report (counts, skipped rows).
A folder whose arrays disagree (a truncated tokens.int32, offsets of the wrong length) is damaged:
it is rebuilt, never trusted. A temporary folder left by a killed run (`NAME.tmp-HOST-PID`, that
process gone) is removed by the next build. Under torchrun every process tokenizes on its own; the
first to finish publishes the folder and the others discard their copy and read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from array import array
from pathlib import Path
from typing import Callable

import numpy as np

from anita.assets import cache_dir
from anita.errors import AnitaError
from anita.files import write_json

STORE_VERSION = 1  # bump when what a reader writes changes


def default_cache_dir() -> Path:
    return Path(os.environ.get("ANITA_DATA_CACHE") or cache_dir() / "tokenized").expanduser()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides token ids: the tokenizer.json, the chat template and format, special tokens."""
    parts = [tokenizer.backend.to_str(), tokenizer.chat_template, tokenizer.chat_format, tokenizer.bos_token,
             tokenizer.eos_token]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def encode_masked(ids: list[int], mask: list[int]) -> np.ndarray:
    """Ids and a 0/1 mask -> one int32 segment: id where mask is 1, −(id + 1) where it is 0."""
    a = np.asarray(ids, dtype=np.int64)
    return np.where(np.asarray(mask, dtype=bool), a, -a - 1).astype(np.int32)


def decode_masked(segment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `encode_masked`: (ids int64, mask bool)."""
    s = segment.astype(np.int64)
    return np.where(s < 0, -s - 1, s), s >= 0


class TokenStore:
    """N records of K segments over flat arrays (in memory, or memory-mapped from a cache folder)."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, rows: np.ndarray, k: int):
        self.tokens, self.offsets, self.rows, self.k = tokens, offsets, rows, k

    def __len__(self) -> int:
        return len(self.rows)

    def segments(self, i: int) -> list[np.ndarray]:
        o = self.offsets[i * self.k: (i + 1) * self.k + 1]
        return [self.tokens[o[j]: o[j + 1]] for j in range(self.k)]

    def lengths(self) -> np.ndarray:
        """Tokens per record (all its segments). -> int64 [N]"""
        return self.offsets[self.k::self.k] - self.offsets[:-1:self.k]

    @classmethod
    def load(cls, folder: Path, k: int) -> "TokenStore":
        """The store saved in `folder`; ValueError if its three arrays do not fit together (damaged)."""
        file = folder / "tokens.int32"
        tokens = np.memmap(file, dtype=np.int32, mode="r") if file.stat().st_size else np.zeros(0, np.int32)
        offsets, rows = np.load(folder / "offsets.npy"), np.load(folder / "rows.npy")
        if offsets.shape != (len(rows) * k + 1,) or offsets[0] != 0 or offsets[-1] != tokens.size \
                or np.any(np.diff(offsets) < 0):
            raise ValueError(f"{folder}: {tokens.size} tokens, {offsets.size} offsets and {rows.size} rows "
                             "do not fit together")
        return cls(tokens, offsets, rows, k)


class StoreWriter:
    """Appends records; the tokens go to a file as they come (or stay in memory when there is no folder)."""

    def __init__(self, k: int, folder: Path | None = None):
        self.k, self.folder = k, folder
        self.offsets, self.rows, self.size = array("q", [0]), array("q"), 0
        self._file = open(folder / "tokens.int32", "wb") if folder else None
        self._memory = array("i")

    def add(self, segments, row: int) -> None:
        assert len(segments) == self.k
        for seg in segments:
            seg = np.asarray(seg, dtype=np.int32)
            if self._file:
                self._file.write(seg.tobytes())
            else:
                self._memory.frombytes(seg.tobytes())
            self.size += len(seg)
            self.offsets.append(self.size)
        self.rows.append(row)

    def finish(self) -> TokenStore:
        offsets, rows = np.frombuffer(self.offsets, dtype=np.int64), np.frombuffer(self.rows, dtype=np.int64)
        if not self._file:
            return TokenStore(np.frombuffer(self._memory, dtype=np.int32), offsets, rows, self.k)
        self._file.close()
        np.save(self.folder / "offsets.npy", offsets)
        np.save(self.folder / "rows.npy", rows)
        return TokenStore.load(self.folder, self.k)

    def abort(self) -> None:
        if self._file:
            self._file.close()


def cached_store(key: dict, k: int, build: Callable[[StoreWriter], dict], root: Path | None):
    """(store, report dict, what happened): the store named by `key` from the cache `root` ("reused
    from FOLDER"), or built by `build(writer)` (which returns the reader's report as a JSON-able
    dict) and saved there ("newly cached in FOLDER"). With `root` None nothing is written to disk (None)."""
    if root is None:
        writer = StoreWriter(k)
        report = build(writer)
        return writer.finish(), report, None
    folder = Path(root) / hashlib.sha256(json.dumps({**key, "version": STORE_VERSION}, sort_keys=True).encode()
                                         ).hexdigest()[:24]
    cached = load_cached(folder, k)
    if cached is not None:
        return *cached, f"reused from the cache {folder}"
    shutil.rmtree(folder, ignore_errors=True)  # absent, or damaged: rebuilt, never trusted
    removed = remove_stale_temporaries(Path(root))
    tmp = folder.with_name(f"{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = StoreWriter(k, tmp)
    try:
        report = build(writer)
        writer.finish()
        write_json(tmp / "meta.json", {"key": key, "version": STORE_VERSION, "report": report})
        publish(tmp, folder)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cached = load_cached(folder, k)
    if cached is None:
        raise AnitaError(f"{folder}: the tokenized cache just written cannot be read back")
    note = f" (removed {removed} unfinished cache folder(s) of stopped runs)" if removed else ""
    return *cached, f"newly cached in {folder}{note}"


def load_cached(folder: Path, k: int) -> tuple[TokenStore, dict] | None:
    """(store, report) of a complete cache folder; None if it is missing, unfinished or damaged."""
    try:
        saved = json.loads((folder / "meta.json").read_text())
        return TokenStore.load(folder, k), saved["report"]
    except (OSError, EOFError, ValueError, KeyError, TypeError):  # np.load of an empty file: EOFError
        return None


def publish(tmp: Path, folder: Path) -> None:
    """Rename the finished `tmp` to `folder`. If another process (another torchrun rank) published
    it first, the rename fails: ours is discarded, theirs (the same tokens) is used."""
    try:
        os.replace(tmp, folder)
    except OSError:
        if not (folder / "meta.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(root: Path) -> int:
    """Remove the temporary folders `NAME.tmp-HOST-PID` of this host whose process is gone (a run
    killed while tokenizing leaves one, possibly gigabytes); returns how many were removed."""
    removed = 0
    for tmp in root.glob(f"*.tmp-{socket.gethostname()}-*") if root.is_dir() else []:
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed += 1
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True
