"""Data sets shaped like the recipe's real ones, written as the Hub and huggingface-cli leave them.

Columns are those of the real data sets: UltraFeedback-binarized (prompt, prompt_id, chosen,
rejected as message lists, messages, score_chosen, score_rejected), UltraChat-200k (prompt,
prompt_id, messages), Alpaca (instruction, input, output), ShareGPT (conversations of from/value)
and mC4 (text, timestamp, url). The README YAML headers follow the real repositories'.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.train.conftest import byte_tokenizer, tiny_run_model  # noqa: F401 (fixtures)

WORDS = ["mare", "sole", "pane", "vino", "luna", "gatto", "cane", "fiore", "casa", "treno"]


def ultrafeedback_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        q = f"{WORDS[i % 10]} {i}?"
        chosen = [{"role": "user", "content": q}, {"role": "assistant", "content": f"si, {WORDS[(i + 1) % 10]}"}]
        rejected = [{"role": "user", "content": q}, {"role": "assistant", "content": f"no, {WORDS[(i + 4) % 10]}"}]
        rows.append({"prompt": q, "prompt_id": hashlib.sha256(q.encode()).hexdigest(), "chosen": chosen,
                     "rejected": rejected, "messages": chosen, "score_chosen": 8.0, "score_rejected": 3.5})
    return rows


def ultrachat_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        q = f"{WORDS[i % 10]} {i}?"
        rows.append({"prompt": q, "prompt_id": hashlib.sha256(q.encode()).hexdigest(),
                     "messages": [{"role": "user", "content": q},
                                  {"role": "assistant", "content": WORDS[(i + 2) % 10].upper()},
                                  {"role": "user", "content": "ancora"},
                                  {"role": "assistant", "content": WORDS[(i + 3) % 10]}]})
    return rows


def alpaca_rows(n: int) -> list[dict]:
    return [{"instruction": f"Traduci {WORDS[i % 10]}", "input": "" if i % 2 else "in inglese",
             "output": WORDS[(i + 5) % 10]} for i in range(n)]


def sharegpt_rows(n: int) -> list[dict]:
    return [{"id": str(i), "conversations": [{"from": "system", "value": "Sii breve."},
                                             {"from": "human", "value": f"{WORDS[i % 10]}?"},
                                             {"from": "gpt", "value": WORDS[(i + 6) % 10]}]} for i in range(n)]


def mc4_rows(n: int) -> list[dict]:
    return [{"text": f"{WORDS[i % 10]} e {WORDS[(i + 7) % 10]}. " * (1 + i % 3), "timestamp": "2020-01-01T00:00:00Z",
             "url": f"https://example.it/{i}"} for i in range(n)]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def readme(configs: dict[str, dict[str, str]]) -> str:
    """A README with the Hub's `configs` YAML header: {config: {split: glob}}."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {glob}" for split, glob in splits.items()]
    return "\n".join(lines + ["---", "", "# a data set", ""])


def hub_dataset(hf_home: Path, repo_id: str, files: dict[str, bytes], revision: str = "0" * 40) -> Path:
    """`repo_id` in huggingface-hub's cache as `huggingface-cli download --repo-type dataset` leaves it:
    blobs named by content hash, snapshots/<revision>/... symlinked to them, refs/main."""
    repo = hf_home / "hub" / f"datasets--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / revision / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (name.count("/") + 2)) / "blobs" / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return repo


def parquet_bytes(rows: list[dict], tmp: Path) -> bytes:
    return write_parquet(tmp, rows).read_bytes()


def jsonl_text(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
