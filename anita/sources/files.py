"""One data file -> a stream of rows, each with the place it came from (for error messages).

The reader is pyarrow, used directly, not the `datasets` library: pyarrow reads parquet, CSV and
Arrow files batch by batch (a source is never held whole in memory), it is the library `datasets`
itself stores its data in, and it is one compiled wheel with no further dependencies, where
`datasets` would bring its own cache, fsspec, multiprocess and a second tokenized copy of every data
set. JSON Lines is read line by line with the standard library, so that every error can name
`file:line`. What `datasets` adds on top (the Hub's file layouts) is small and lives in
`anita.sources.layout`.

File types, by suffix: .jsonl / .ndjson (JSON Lines), .jsonl.gz / .json.gz (gzip-compressed JSON
Lines), .json (a JSON array of objects, read whole, or JSON Lines), .parquet, .csv, .arrow (Arrow IPC,
stream or file: what `datasets` writes). A file with another suffix is recognised by its first bytes
(parquet, Arrow, gzip) or read as JSON Lines text; a binary file of no known kind is refused.

A row's place is `file:line` (1-based) for JSON Lines and `file:row N` (0-based, as `dataset[N]`)
for the others. Problems of one row (bytes that are not UTF-8, bad JSON, JSON nested deeper than the
parser allows, a lone UTF-16 surrogate such as "\\ud800", a row over MAX_ROW_BYTES) come back as a
`Record` with an `error`, which the readers may skip (--skip-bad-rows); problems of the whole file
(a gzip or parquet file named .jsonl, binary data, a damaged parquet file) raise `AnitaError`.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet

from anita.errors import AnitaError
from anita.jsonl import parse_object

MAX_ROW_BYTES = 8 * 2**20  # a larger row is refused before it is decoded or tokenized (bounds memory)
BATCH_ROWS = 1024  # rows per pyarrow record batch
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".jsonl.gz": "jsonl.gz", ".json.gz": "jsonl.gz",
            ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
MAGIC = {b"PAR1": "parquet", b"ARROW1": "arrow", b"\x1f\x8b": "jsonl.gz", b"\xff\xff\xff\xff": "arrow"}
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Record:
    """One row of a source: its values, or the reason it could not be read."""

    where: str  # "file:line" (JSON Lines) or "file:row N"
    index: int  # the line (1-based) or the row (0-based)
    row: dict | None
    error: str | None = None  # a problem of this row only (skippable with --skip-bad-rows)


def file_kind(path: Path) -> str:
    """The reader of a file: from its suffix, else from its first bytes (checked against the suffix)."""
    name = path.name.lower()
    by_suffix = next((kind for suffix, kind in SUFFIXES.items() if name.endswith(suffix)), None)
    with open(path, "rb") as f:
        head = f.read(4096)
    by_magic = next((kind for magic, kind in MAGIC.items() if head.startswith(magic)), None)
    if by_suffix in ("jsonl", "json", "csv") and by_magic:
        what = "gzip-compressed" if by_magic == "jsonl.gz" else by_magic
        raise AnitaError(f"{path}: holds {what} data, not {by_suffix.upper()} text; rename it to end in .{by_magic}")
    if by_suffix is None and by_magic is None and b"\x00" in head:
        raise AnitaError(f"{path}: a binary file of unknown kind; expected one of {', '.join(SUFFIXES)}")
    if by_suffix in ("jsonl", "json", "csv") and b"\x00" in head:
        raise AnitaError(f"{path}: binary data (NUL bytes), not {by_suffix.upper()} text")
    return by_suffix or by_magic or "jsonl"


def read_file(path: Path) -> Iterator[Record]:
    """Every row of one data file, in file order."""
    kind = file_kind(path)
    if kind in ("jsonl", "jsonl.gz"):
        return jsonl_records(path, gzip.open if kind == "jsonl.gz" else open)
    if kind == "json":
        return json_records(path)
    return table_records(path, kind)


# ---------------------------------------------------------------------------- JSON Lines
def jsonl_records(path: Path, opener) -> Iterator[Record]:
    """Lines read as bytes, at most MAX_ROW_BYTES at a time: a longer line is skipped over, never held."""
    line = 0
    try:
        with opener(path, "rb") as f:
            while raw := f.readline(MAX_ROW_BYTES + 1):
                line += 1
                where = f"{path}:{line}"
                if len(raw) > MAX_ROW_BYTES and not raw.endswith(b"\n"):
                    size = len(raw) + skip_line(f)
                    yield Record(where, line, None, f"a row of {size / 2**20:.1f} MiB; rows are limited to "
                                                    f"{MAX_ROW_BYTES // 2**20} MiB")
                elif raw.strip():
                    yield decode_line(raw[3:] if line == 1 and raw.startswith(b"\xef\xbb\xbf") else raw, where, line)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise AnitaError(f"{path}:{line + 1}: cannot read ({type(e).__name__}: {e})") from None


def skip_line(f) -> int:
    """Read to the end of the current line in chunks; returns how many bytes were skipped."""
    skipped = 0
    while chunk := f.readline(MAX_ROW_BYTES):
        skipped += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return skipped


def decode_line(raw: bytes, where: str, line: int) -> Record:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Record(where, line, None, f"not UTF-8 text (byte {e.start} of the line is {raw[e.start]:#04x})")
    try:
        row = parse_object(text)
    except ValueError as e:
        return Record(where, line, None, str(e))
    return Record(where, line, row, check_values(row))


def json_records(path: Path) -> Iterator[Record]:
    """A .json file: a JSON array of objects (read whole: it is one value), or JSON Lines."""
    with open(path, "rb") as f:
        first = f.read(MAX_ROW_BYTES).lstrip()[:1]
    if first != b"[":
        yield from jsonl_records(path, open)
        return
    try:
        rows = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise AnitaError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise AnitaError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise AnitaError(f"{path}: JSON nested too deeply") from None
    for i, row in enumerate(rows):
        where = f"{path}:row {i}"
        if not isinstance(row, dict):
            yield Record(where, i, None, f"expected a JSON object, got {type(row).__name__}")
        else:
            yield Record(where, i, row, check_values(row))


# --------------------------------------------------------------------- parquet, CSV, Arrow
def table_records(path: Path, kind: str) -> Iterator[Record]:
    """Rows of a columnar file, read a record batch at a time."""
    n = 0
    try:
        for batch in record_batches(path, kind):
            for row in batch.to_pylist():
                yield Record(f"{path}:row {n}", n, row, check_values(row))
                n += 1
    except (pa.ArrowException, OSError, ValueError) as e:  # ArrowInvalid is a ValueError; UnicodeDecodeError too
        detail = " ".join(str(e).split())[:200]  # one line, whatever pyarrow's message holds
        raise AnitaError(f"{path}:row {n}: not a readable {kind} file ({type(e).__name__}: {detail})") from None


def record_batches(path: Path, kind: str):
    if kind == "parquet":
        yield from pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS)
    elif kind == "csv":
        yield from pyarrow.csv.open_csv(path)
    else:  # Arrow IPC: `datasets` writes the stream format; the file format has its own magic
        source = pa.memory_map(str(path))
        try:
            yield from pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)


# ------------------------------------------------------------------------------- values
def check_values(row: dict) -> str | None:
    """What is wrong with a decoded row's strings (a lone surrogate, too many bytes), or None.

    Walks the row with an explicit stack (no recursion: the JSON parser's own depth limit bounds it)."""
    stack, size = [(None, row)], 0
    while stack:
        key, value = stack.pop()
        if isinstance(value, str):
            size += len(value)
            if _SURROGATE.search(value):
                return f"field {key!r} holds a lone UTF-16 surrogate (like \"\\ud800\"), not valid Unicode text"
        elif isinstance(value, dict):
            stack.extend(value.items())
        elif isinstance(value, list):
            stack.extend((key, v) for v in value)
    if size > MAX_ROW_BYTES:
        return f"a row of {size / 2**20:.1f} MiB of text; rows are limited to {MAX_ROW_BYTES // 2**20} MiB"
    return None
