"""Bad data gives one line naming the file and line (or row), exit 2, no traceback and nothing
written, in `anita sft`, `anita dpo` and both `anita eval` modes (issue 18 item 7, issue 11 item 5).
Per-row problems are skipped by --skip-bad-rows. One row per case: a new case is one line."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from anita.cli import main
from anita.sources import MAX_ROW_BYTES
from anita.train.data import load_examples

GOOD = {"sft": {"text": "ciao"}, "dpo": {"prompt": "q?", "chosen": "si", "rejected": "no"},
        "task": {"context": "x", "choices": [" a", " b"], "gold": 0}, "perplexity": {"text": "ciao"}}


def parquet(rows) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


# name: (file name, bytes after the good first line or None for the whole file, message, per-row?)
CASES = {
    "invalid UTF-8": ("d.jsonl", b'{"text": "caf\xe9"}\n', r"d\.jsonl:2: not UTF-8 text", True),
    "gzip as .jsonl": ("d.jsonl", gzip.compress(b'{"text": "x"}\n'), r"d\.jsonl: holds gzip-compressed data", False),
    "parquet as .jsonl": ("d.jsonl", parquet([{"text": "x"}]), r"d\.jsonl: holds parquet data", False),
    "binary as .jsonl": ("d.jsonl", b"\x00\x01\x02" * 100, r"d\.jsonl: binary data", False),
    "deep JSON": ("d.jsonl", b"[" * 100_000 + b"\n", r"d\.jsonl:2: not usable JSON: nested too deeply", True),
    "lone surrogate": ("d.jsonl", b'{"text": "\\ud800", "context": "\\ud800"}\n', r"d\.jsonl:2: .*lone UTF-16 surrogate",
                       True),
    "huge line": ("d.jsonl", b'{"text": "' + b"a" * (MAX_ROW_BYTES + 10) + b'"}\n', r"d\.jsonl:2: a row of 8\.0 MiB",
                  True),
    "unknown binary": ("d.bin", b"\x00\x01garbage" * 50, r"d\.bin: a binary file of unknown kind", False),
    "damaged parquet": ("d.parquet", b"PAR1" + b"\x00" * 64 + b"PAR1", r"d\.parquet:row 0: not a readable parquet", False),
}
COMMANDS = {"sft": ["sft", "--output", "OUT"], "dpo": ["dpo", "--output", "OUT"],
            "task": ["eval", "--task"], "perplexity": ["eval", "--perplexity"]}


def write_case(tmp_path, command: str, case: str):
    name, data, _, per_row = CASES[case]
    path = tmp_path / name
    path.write_bytes(json.dumps(GOOD[command]).encode() + b"\n" + data if per_row else data)
    return path


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", CASES)
def test_bad_bytes_are_one_line_naming_the_place(tmp_path, tiny_run_model, capsys, command, case):
    path = write_case(tmp_path, command, case)
    out = tmp_path / "out"
    argv = [a.replace("OUT", str(out)) for a in COMMANDS[command]]
    argv = argv + ["--data", str(path)] if command in ("sft", "dpo") else argv + [str(path)]
    assert main([*argv, "--model", str(tiny_run_model)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err[:300]
    assert __import__("re").search(CASES[case][2], err), err[:300]
    assert not out.exists()


@pytest.mark.parametrize("case", [c for c, (_, _, _, per_row) in CASES.items() if per_row])
def test_per_row_problems_are_skipped_with_skip_bad_rows(tmp_path, byte_tokenizer, case):
    path = write_case(tmp_path, "sft", case)
    with open(path, "ab") as f:
        f.write(b'{"text": "fine"}\n')
    examples, report = load_examples(path, byte_tokenizer, max_length=32, skip_bad_rows=True)
    assert (len(examples), report.skipped_bad, report.bad_lines) == (2, 1, [2])


def test_a_row_that_fits_no_format_names_its_columns_and_the_formats(tmp_path, tiny_run_model, capsys):
    (tmp_path / "q.parquet").write_bytes(parquet([{"question": "q", "answer": "a"}]))
    assert main(["sft", "--model", str(tiny_run_model), "--data", str(tmp_path / "q.parquet"),
                 "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "q.parquet:row 0: columns question, answer fit no format; expected messages (messages); sharegpt " \
           "(conversations); alpaca (instruction, output); prompt-completion (prompt, completion); text (text)" in err


def test_an_offline_hub_miss_names_the_dataset_and_the_download_command(tmp_path, tiny_run_model, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["dpo", "--model", str(tiny_run_model), "--data", "someone/missing-prefs",
                 "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "someone/missing-prefs: dataset not in the Hugging Face cache" in err
    assert "huggingface-cli download --repo-type dataset someone/missing-prefs" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--columns", "prompt"], "must be NAME=COLUMN"),
    (["--columns", "question=prompt"], "'question' is not a column anita reads"),
    (["--max-rows", "0"], "'max_rows' must be at least 1"),
    (["--data-config", "x"], "train.jsonl: a single file has no configs (config 'x' given)"),
    (["--data-split", "test"], "train.jsonl: a single file has no splits (split 'test' given)"),
    (["--data-split", "train"], "train.jsonl: a single file has no splits (split 'train' given)"),
    (["--eval-data", "FILE", "--eval-split", "test"], "train.jsonl: a single file has no splits (split 'test' given)"),
    (["--data-split", "nope", "--data", "DIR"], "no data file for split 'nope'; it has train"),
])
def test_bad_source_flags(tmp_path, tiny_run_model, capsys, flags, message):
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "ciao"}\n')
    flags = [{"DIR": str(folder), "FILE": str(folder / "train.jsonl")}.get(f, f) for f in flags]
    data = [] if "--data" in flags else ["--data", str(folder / "train.jsonl")]
    assert main(["sft", "--model", str(tiny_run_model), *data, "--output", str(tmp_path / "out"), *flags]) == 2
    assert message in capsys.readouterr().err
