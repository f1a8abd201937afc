"""Which files hold a split: README `configs` YAML, the Hub's file-name conventions, config folders."""

from __future__ import annotations

import re

import pytest

from anita.errors import AnitaError
from anita.sources import open_source
from anita.sources.layout import glob_regex, select_files
from tests.sources.conftest import readme

ULTRACHAT = ["README.md", "data/train_sft-00000-of-00003-a.parquet", "data/train_sft-00001-of-00003-b.parquet",
             "data/test_sft-00000-of-00001-c.parquet", "data/train_gen-00000-of-00001-d.parquet"]
CONFIGS = readme({"default": {"train_sft": "data/train_sft-*", "test_sft": "data/test_sft-*",
                              "train_gen": "data/train_gen-*"}})


@pytest.mark.parametrize("paths, text, split, config, expected", [
    (ULTRACHAT, CONFIGS, "train_sft", None, ULTRACHAT[1:3]),
    (ULTRACHAT, CONFIGS, "test_sft", "default", ULTRACHAT[3:4]),
    (["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet", "data/test-00000-of-00001.parquet"],
     None, "train", None, ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]),
    (["train.jsonl", "validation.jsonl"], None, "validation", None, ["validation.jsonl"]),
    (["dev.csv", "train.csv"], None, "validation", None, ["dev.csv"]),  # a synonym
    (["alpaca_data_cleaned.json", "README.md"], None, "train", None, ["alpaca_data_cleaned.json"]),  # no split named
    (["tiny/train/0000.parquet", "tiny/validation/0000.parquet", "full/train/0000.parquet"], None, "train", "tiny",
     ["tiny/train/0000.parquet"]),  # the Hub's parquet conversion
])
def test_select_files(paths, text, split, config, expected):
    assert select_files(paths, text, split, config, "repo") == expected


@pytest.mark.parametrize("paths, text, split, config, message", [
    (ULTRACHAT, CONFIGS, "train", None, "config 'default' has no split 'train'; it has train_sft, test_sft, train_gen"),
    (ULTRACHAT, CONFIGS, "train_sft", "it", "no config 'it'; it has default"),
    (["a.parquet"], readme({"en": {"train": "en/*"}, "it": {"train": "it/*"}}), "train", None,
     "has several configs (en, it); choose one with --data-config"),
    (["train.jsonl"], None, "test", None, "no data file for split 'test'; it has train"),
])
def test_select_files_errors_say_what_exists(paths, text, split, config, message):
    with pytest.raises(AnitaError, match=re.escape(message)):
        select_files(paths, text, split, config, "repo")


def test_globs():
    assert glob_regex("data/train-*").match("data/train-0.parquet")
    assert not glob_regex("data/train-*").match("data/sub/train-0.parquet")
    assert glob_regex("**/*.parquet").match("a/b/c.parquet") and glob_regex("**/*.parquet").match("c.parquet")


def test_a_directory_source_reads_its_shards_in_order(tmp_path):
    (tmp_path / "data").mkdir()
    for i in (1, 0):
        (tmp_path / "data" / f"train-0000{i}-of-00002.jsonl").write_text(f'{{"text": "shard {i}"}}\n')
    source = open_source(tmp_path)
    assert source.label == f"{tmp_path} [train]"
    assert [r.row["text"] for r in source.records()] == ["shard 0", "shard 1"]
    assert [r.where for r in source.records(max_rows=1)] == [f"{tmp_path}/data/train-00000-of-00002.jsonl:1"]
