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
