"""Tokenized data as flat int32 arrays: the same examples from memory, from a new cache and from a
reused one; the cache key follows the settings; the loss mask survives the sign-bit encoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anita.errors import AnitaError
from anita.sources.store import decode_masked, encode_masked
from anita.train.data import load_examples
from tests.train.conftest import chat_rows, write_jsonl


def test_masked_segments_round_trip():
    ids, mask = [0, 5, 260, 7], [0, 1, 1, 0]
    segment = encode_masked(ids, mask)
    assert segment.dtype == np.int32 and segment.tolist() == [-1, 5, 260, -8]
    back_ids, back_mask = decode_masked(segment)
    assert back_ids.tolist() == ids and back_mask.astype(int).tolist() == mask


def test_cached_examples_equal_the_in_memory_ones(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(12))
    plain, report = load_examples(path, byte_tokenizer, max_length=64)
    first, first_report = load_examples(path, byte_tokenizer, max_length=64, cache_dir=tmp_path / "cache")
    again, again_report = load_examples(path, byte_tokenizer, max_length=64, cache_dir=tmp_path / "cache")
    assert report.cache is None and first_report.cache.startswith("newly cached in")
    assert again_report.cache.startswith("reused from the cache")
    assert isinstance(again.store.tokens, np.memmap)
    for a, b, c in zip(plain, first, again):
        for x, y in ((a, b), (a, c)):
            assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
    assert again.lengths == [len(e.input_ids) for e in plain]
    assert again_report.summary().split("; tokens")[0] == report.summary()
    load_examples(path, byte_tokenizer, max_length=48, cache_dir=tmp_path / "cache")  # another key, another folder
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2


def test_a_failed_read_leaves_no_cache(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(2) + ["{bad"])
    with pytest.raises(AnitaError, match=r"d\.jsonl:3: not valid JSON"):
        load_examples(path, byte_tokenizer, max_length=64, cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())


def _damage_truncate(folder):
    tokens = folder / "tokens.int32"
    tokens.write_bytes(tokens.read_bytes()[:-4])


def _damage_odd_size(folder):
    tokens = folder / "tokens.int32"
    tokens.write_bytes(tokens.read_bytes()[:-2])


def _damage_offsets_length(folder):
    np.save(folder / "offsets.npy", np.load(folder / "offsets.npy")[:-1])


def _damage_empty_offsets(folder):
    (folder / "offsets.npy").write_bytes(b"")


def _damage_meta(folder):
    (folder / "meta.json").write_text("{")


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_odd_size, _damage_offsets_length,
                                    _damage_empty_offsets, _damage_meta])
def test_a_damaged_cache_is_rebuilt_not_trusted(tmp_path, byte_tokenizer, damage):
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(6))
    plain, _ = load_examples(path, byte_tokenizer, max_length=64)
    load_examples(path, byte_tokenizer, max_length=64, cache_dir=tmp_path / "cache")
    (folder,) = (tmp_path / "cache").iterdir()
    damage(folder)
    again, report = load_examples(path, byte_tokenizer, max_length=64, cache_dir=tmp_path / "cache")
    assert report.cache.startswith("newly cached in")
    assert [e.input_ids.tolist() for e in again] == [e.input_ids.tolist() for e in plain]


def test_a_rank_that_loses_the_publish_race_uses_the_winners_folder(tmp_path, byte_tokenizer, monkeypatch):
    """Under torchrun two ranks tokenize at once; the second rename finds the folder there (ENOTEMPTY)."""
    import shutil
    from pathlib import Path

    from anita.sources import store

    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(6))
    plain, _ = load_examples(path, byte_tokenizer, max_length=64, cache_dir=tmp_path / "winner")
    (winner,) = (tmp_path / "winner").iterdir()
    real_replace = store.os.replace

    def the_other_rank_publishes_first(src, dst):
        if Path(dst).name == winner.name:  # just before our rename of the folder, the other rank's lands
            shutil.copytree(winner, dst)
        real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", the_other_rank_publishes_first)
    examples, report = load_examples(path, byte_tokenizer, max_length=64, cache_dir=tmp_path / "cache")
    assert report.cache.startswith("newly cached in")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [winner.name]  # our temporary folder is gone
    assert [e.input_ids.tolist() for e in examples] == [e.input_ids.tolist() for e in plain]


def test_temporary_folders_of_dead_processes_are_removed(tmp_path, byte_tokenizer):
    import os
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    host, cache = socket.gethostname(), tmp_path / "cache"
    left = {"dead": cache / f"a.tmp-{host}-{dead}", "alive": cache / f"b.tmp-{host}-{os.getppid()}",
            "other host": cache / f"c.tmp-elsewhere-{dead}"}
    for folder in left.values():
        folder.mkdir(parents=True)
        (folder / "tokens.int32").write_bytes(b"\0" * 64)
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(3))
    _, report = load_examples(path, byte_tokenizer, max_length=64, cache_dir=cache)
    assert "removed 1 unfinished cache folder" in report.cache
    assert not left["dead"].exists() and left["alive"].exists() and left["other host"].exists()
