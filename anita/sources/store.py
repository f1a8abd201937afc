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
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from array import array
from pathlib import Path
from typing import Callable

import numpy as np

from anita.assets import cache_dir
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
        file = folder / "tokens.int32"
        tokens = np.memmap(file, dtype=np.int32, mode="r") if file.stat().st_size else np.zeros(0, np.int32)
        return cls(tokens, np.load(folder / "offsets.npy"), np.load(folder / "rows.npy"), k)


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
    meta = folder / "meta.json"
    if meta.is_file():
        try:
            saved = json.loads(meta.read_text())
            return TokenStore.load(folder, k), saved["report"], f"reused from the cache {folder}"
        except (OSError, ValueError, KeyError):  # a damaged cache folder is rebuilt, never trusted
            shutil.rmtree(folder, ignore_errors=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = StoreWriter(k, tmp)
    try:
        report = build(writer)
        writer.finish()
        write_json(tmp / "meta.json", {"key": key, "version": STORE_VERSION, "report": report})
        if folder.exists():  # another process finished first: its copy is as good as ours
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, folder)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenStore.load(folder, k), report, f"newly cached in {folder}"
