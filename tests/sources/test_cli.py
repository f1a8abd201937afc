"""The recipe's kinds of data, straight from a huggingface-hub cache or a local file, train two steps
through the command line with HF_HUB_OFFLINE=1 and no conversion step; the run's summary names the
format it recognised, and a second run reuses the tokenized cache and says so."""

from __future__ import annotations

import gzip

import pytest

from anita.cli import main
from tests.sources.conftest import (alpaca_rows, hub_dataset, jsonl_text, mc4_rows, parquet_bytes, readme,
                                    sharegpt_rows, ultrachat_rows, ultrafeedback_rows)

COMMON = ["--optimizer", "adamw", "--lora-r", "4", "--lora-alpha", "8", "--no-progress", "--batch-size", "2",
          "--max-length", "64", "--max-steps", "2", "--save-steps", "2"]


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty HF_HOME, offline: only what a test puts in its cache exists."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf"


def train(command: str, model, data: str, out, *extra) -> int:
    return main([command, "--model", str(model), "--data", data, "--output", str(out), *COMMON, *extra])


def test_ultrafeedback_binarized_from_the_hub_cache_trains_dpo(offline_hub, tmp_path, tiny_run_model, capsys):
    files = {"README.md": readme({"default": {"train_prefs": "data/train_prefs-*", "test_prefs": "data/test_prefs-*"}}).encode(),
             "data/train_prefs-00000-of-00001.parquet": parquet_bytes(ultrafeedback_rows(6), tmp_path / "a.parquet"),
             "data/test_prefs-00000-of-00001.parquet": parquet_bytes(ultrafeedback_rows(2), tmp_path / "b.parquet")}
    hub_dataset(offline_hub, "HuggingFaceH4/ultrafeedback_binarized", files)
    assert train("dpo", tiny_run_model, "HuggingFaceH4/ultrafeedback_binarized", tmp_path / "run",
                 "--data-split", "train_prefs", "--eval-data", "HuggingFaceH4/ultrafeedback_binarized",
                 "--eval-split", "test_prefs") == 0
    out = capsys.readouterr().out
    assert "HuggingFaceH4/ultrafeedback_binarized [train_prefs]: 6 preference pairs (preference (implicit prompt)" in out
    assert "[test_prefs]: 2 preference pairs" in out
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_ultrachat_200k_from_the_hub_cache_trains_sft_and_reuses_its_tokens(offline_hub, tmp_path, tiny_run_model,
                                                                              capsys):
    files = {"README.md": readme({"default": {"train_sft": "data/train_sft-*", "test_sft": "data/test_sft-*"}}).encode(),
             "data/train_sft-00000-of-00001.parquet": parquet_bytes(ultrachat_rows(6), tmp_path / "a.parquet"),
             "data/test_sft-00000-of-00001.parquet": parquet_bytes(ultrachat_rows(2), tmp_path / "b.parquet")}
    hub_dataset(offline_hub, "HuggingFaceH4/ultrachat_200k", files)
    for run in ("first", "second"):
        assert train("sft", tiny_run_model, "HuggingFaceH4/ultrachat_200k", tmp_path / run,
                     "--data-split", "train_sft", "--max-rows", "5") == 0
    out = capsys.readouterr().out
    assert "HuggingFaceH4/ultrachat_200k [train_sft]: 5 examples, format messages" in out
    assert out.count("newly cached in") == 1 and out.count("reused from the cache") == 1


def test_alpaca_json_array_from_the_hub_cache_trains_sft(offline_hub, tmp_path, tiny_run_model, capsys):
    import json

    hub_dataset(offline_hub, "yahma/alpaca-cleaned", {"alpaca_data_cleaned.json": json.dumps(alpaca_rows(6)).encode()})
    assert train("sft", tiny_run_model, "yahma/alpaca-cleaned", tmp_path / "run") == 0
    assert "[train]: 6 examples, format alpaca" in capsys.readouterr().out


def test_sharegpt_jsonl_gz_directory_trains_sft(tmp_path, tiny_run_model, capsys):
    folder = tmp_path / "sharegpt"
    folder.mkdir()
    (folder / "train.jsonl.gz").write_bytes(gzip.compress(jsonl_text(sharegpt_rows(6)).encode()))
    (folder / "test.jsonl.gz").write_bytes(gzip.compress(jsonl_text(sharegpt_rows(2)).encode()))
    assert train("sft", tiny_run_model, str(folder), tmp_path / "run", "--eval-data", str(folder),
                 "--eval-split", "test") == 0
    out = capsys.readouterr().out
    assert "sharegpt [train]: 6 examples, format sharegpt" in out and "[test]: 2 examples, format sharegpt" in out


def test_mc4_style_csv_trains_continued_pretraining_with_a_text_field(tmp_path, tiny_run_model, capsys):
    import pyarrow as pa
    import pyarrow.csv

    rows = [{"body": r["text"], "timestamp": r["timestamp"], "url": r["url"]} for r in mc4_rows(6)]
    pyarrow.csv.write_csv(pa.Table.from_pylist(rows), tmp_path / "mc4.csv")
    assert train("sft", tiny_run_model, str(tmp_path / "mc4.csv"), tmp_path / "run", "--text-field", "body",
                 "--packing") == 0
    assert "mc4.csv: 6 examples, format text" in capsys.readouterr().out


def test_columns_rename_a_preference_set(tmp_path, tiny_run_model, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": f"q{i}?", "good": f"si {i}", "bad": f"no {i}"} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    assert train("dpo", tiny_run_model, str(tmp_path / "p.parquet"), tmp_path / "run", "--max-steps", "1",
                 "--columns", "prompt=question,chosen=good,rejected=bad") == 0
    assert "p.parquet: 4 preference pairs (preference (explicit prompt)" in capsys.readouterr().out
