"""Read and tokenize a synthetic UltraChat-shaped parquet set through anita's data layer: rows/s,
tokens, peak RSS and the token cache's bytes per token (issue 11: memory near 4 bytes per token
plus a bounded overhead).

    python benchmarks/bench_data.py [--rows 200000] [--turns 4]

Rows have UltraChat-200k's columns (prompt, prompt_id, messages of alternating user/assistant
turns); the tokenizer is Llama 3's (`anita.assets.llama3_tokenizer_dir()`). The first pass
tokenizes into a fresh cache; the second memory-maps it.
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from anita.assets import llama3_tokenizer_dir
from anita.model import Tokenizer
from anita.train.data import load_examples

WORDS = "il mare sole pane vino luna gatto cane fiore casa treno strada città lago monte".split()


def write_set(path: Path, rows: int, turns: int) -> None:
    """UltraChat-shaped parquet, written in chunks of 10k rows."""
    writer = None
    for start in range(0, rows, 10_000):
        batch = []
        for i in range(start, min(rows, start + 10_000)):
            text = lambda k: " ".join(WORDS[(i * 7 + k * 3 + j) % len(WORDS)] for j in range(20 + (i + k) % 30))  # noqa: E731
            messages = [{"role": "user" if k % 2 == 0 else "assistant", "content": text(k)} for k in range(turns)]
            batch.append({"prompt": messages[0]["content"], "prompt_id": hashlib.sha1(str(i).encode()).hexdigest(),
                          "messages": messages})
        table = pa.Table.from_pylist(batch)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--turns", type=int, default=4)
    args = parser.parse_args()
    tok = Tokenizer.from_pretrained(llama3_tokenizer_dir())
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = Path(tmp) / "ultrachat.parquet", Path(tmp) / "cache"
        write_set(data, args.rows, args.turns)
        base = peak_rss_mib()
        for label in ("tokenize + cache", "reuse the cache"):
            start = time.perf_counter()
            examples, report = load_examples(data, tok, max_length=2048, cache_dir=cache)
            seconds = time.perf_counter() - start
            size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
            print(f"{label}: {report.kept} rows in {seconds:.1f} s = {report.kept / seconds:,.0f} rows/s; "
                  f"{report.tokens:,} tokens; cache {size / report.tokens:.2f} bytes/token; "
                  f"peak RSS {peak_rss_mib():.0f} MiB (before reading: {base:.0f} MiB)")


if __name__ == "__main__":
    main()
