"""Tests for anita/dpo/data.py: rendering preference rows, TRL-style truncation, bad rows with line
numbers, the concatenated [chosen; rejected] batch and the micro-batch stream.

The byte tokenizer of tests/train/conftest.py makes expected ids hand-derivable: a string's ids
are its UTF-8 bytes, specials are 256 (<|begin_of_text|>), 257 (<|end_of_text|>, also pad),
258/259 (header start/end) and 260 (<|eot_id|>); the chat format is Llama 3's.
"""

import re

import pytest
import torch

from anita.dpo.data import (PreferenceBatches, PreferencePair, check_lengths, collate_pairs, read_preferences,
                            truncate_pair)
from anita.errors import AnitaError
from tests.train.conftest import byte_tokenizer, tiny_run_model, write_jsonl  # noqa: F401 (fixtures)


BOT, PAD, SH, EH, EOT = 256, 257, 258, 259, 260


def ids(text: str) -> list[int]:
    return list(text.encode())


def header(role: str) -> list[int]:
    return [SH] + ids(role) + [EH] + ids("\n\n")


def test_string_and_conversational_rows_render_in_the_chat_format(tmp_path, byte_tokenizer):
    """A string prompt is one user turn, rendered with the generation prompt; each answer is the
    assistant turn after it and ends with <|eot_id|>. A conversational row with a system turn
    renders the same way, the system turn first."""
    rows = [{"prompt": "hi", "chosen": "yo", "rejected": "no"},
            {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}],
             "chosen": [{"role": "assistant", "content": "yes"}],
             "rejected": [{"role": "assistant", "content": "nope"}]}]
    data = read_preferences(write_jsonl(tmp_path / "p.jsonl", rows), byte_tokenizer, max_length=100)
    a, b = data.pairs
    assert list(a.prompt_ids) == [BOT] + header("user") + ids("hi") + [EOT] + header("assistant")
    assert list(a.chosen_ids) == ids("yo") + [EOT] and list(a.rejected_ids) == ids("no") + [EOT]
    assert list(b.prompt_ids) == ([BOT] + header("system") + ids("S") + [EOT] + header("user") + ids("hi") + [EOT]
                                  + header("assistant"))
    assert list(b.chosen_ids) == ids("yes") + [EOT] and list(b.rejected_ids) == ids("nope") + [EOT]
    assert (a.line, b.line, data.truncated, data.dropped, data.skipped) == (1, 2, 0, [], [])


def test_truncation_rules_by_hand():
    """TRL's keep_start rules. Prompt 10 tokens, answers 3 and 5:
    - max_length 20: 10 + 5 fits, nothing is cut;
    - max_length 12, max_prompt_length 8: too long, the prompt keeps its first 8 tokens, then each
      answer keeps its first 12 - 8 = 4 (so 3 and 4);
    - max_length 12, no max_prompt_length: the prompt is kept whole, answers keep 12 - 10 = 2;
    - max_length 10, no max_prompt_length: no answer token fits, the row is dropped (None)."""
    prompt, chosen, rejected = list(range(10)), [100] * 3, [200] * 5
    assert truncate_pair(prompt, chosen, rejected, 20, 8) == (prompt, chosen, rejected)
    assert truncate_pair(prompt, chosen, rejected, 12, 8) == (prompt[:8], chosen, rejected[:4])
    assert truncate_pair(prompt, chosen, rejected, 12, None) == (prompt, chosen[:2], rejected[:2])
    assert truncate_pair(prompt, chosen, rejected, 10, None) is None


def test_read_truncates_keeping_the_start_and_reports_dropped_rows(tmp_path, byte_tokenizer):
    """Row 1 has a 44-token prompt (21 letters plus 23 tokens of chat wrapping):
    with max_length 32 and max_prompt_length 24 its prompt keeps the first 24 tokens and the
    answers the first 8. Without max_prompt_length the same row cannot keep an answer token: it
    is dropped, counted and named in the summary, while the short row 2 is kept."""
    rows = [{"prompt": "abcdefghijklmnopqrstu", "chosen": "0123456789", "rejected": "zyx"},
            {"prompt": "hi", "chosen": "yo", "rejected": "no"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    data = read_preferences(path, byte_tokenizer, max_length=32, max_prompt_length=24)
    full_prompt = [BOT] + header("user") + ids("abcdefghijklmnopqrstu") + [EOT] + header("assistant")
    first = data.pairs[0]
    assert list(first.prompt_ids) == full_prompt[:24]
    assert list(first.chosen_ids) == ids("01234567") and list(first.rejected_ids) == ids("zyx") + [EOT]
    assert data.truncated == 1 and len(data) == 2
    dropped = read_preferences(path, byte_tokenizer, max_length=44, max_prompt_length=None)
    assert dropped.dropped == [1] and [p.line for p in dropped.pairs] == [2]
    assert "1 dropped: no answer token fits max_length (lines 1)" in dropped.summary()


def test_a_file_with_no_usable_pair_is_an_error(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi" * 40, "chosen": "a", "rejected": "b"}])
    with pytest.raises(AnitaError, match="no usable preference pairs.*dropped"):
        read_preferences(path, byte_tokenizer, max_length=30, max_prompt_length=None)


def test_length_settings_are_checked():
    for max_length, max_prompt_length in [(1, None), (10, 10), (10, 0), ("8", None)]:
        with pytest.raises(AnitaError, match="max_(prompt_)?length"):
            check_lengths(max_length, max_prompt_length)


BAD_ROWS = [
    ('{"prompt": "a", "chosen": "b"', "not valid JSON"),
    ('["a", "b"]', "expected a JSON object"),
    ({"prompt": "a", "chosen": "b"}, "missing field 'rejected'"),
    ({"chosen": "b", "rejected": "c"}, "share no beginning, so there is no implicit prompt"),
    ({"prompt": "a", "chosen": "", "rejected": "c"}, "field 'chosen' is empty"),
    ({"prompt": "a", "chosen": "b", "rejected": "  \n"}, "field 'rejected' is empty"),
    ({"prompt": " ", "chosen": "b", "rejected": "c"}, "field 'prompt' is empty"),
    ({"prompt": "a", "chosen": "same", "rejected": "same"}, "identical"),
    ({"prompt": "a", "chosen": "same", "rejected": [{"role": "assistant", "content": "same"}]}, "identical"),
    ({"prompt": "a", "chosen": [{"role": "user", "content": "b"}], "rejected": "c"}, "assistant messages only"),
    ({"prompt": "a", "chosen": 5, "rejected": "c"}, "'chosen' must be a string or a non-empty list"),
    ({"prompt": "a", "chosen": [], "rejected": "c"}, "'chosen' must be a string or a non-empty list"),
    ({"prompt": [{"role": "user"}], "chosen": "b", "rejected": "c"}, "'prompt': message 0 must be a dict"),
]


@pytest.mark.parametrize("bad,message", BAD_ROWS)
def test_bad_rows_name_file_and_line(tmp_path, byte_tokenizer, bad, message):
    """The bad row is on line 3 (after a good row and a blank line): the error names path:3."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "chosen": "yo", "rejected": "no"}, "", bad])
    with pytest.raises(AnitaError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
        read_preferences(path, byte_tokenizer, max_length=100)


def test_bad_rows_can_be_skipped_and_counted(tmp_path, byte_tokenizer):
    good = {"prompt": "hi", "chosen": "yo", "rejected": "no"}
    rows = [good] + [bad for bad, _ in BAD_ROWS] + [good]
    data = read_preferences(write_jsonl(tmp_path / "p.jsonl", rows), byte_tokenizer, max_length=100,
                            skip_bad_rows=True)
    assert [p.line for p in data.pairs] == [1, len(rows)]
    assert [line for line, _ in data.skipped] == list(range(2, len(rows)))
    assert f"{len(BAD_ROWS)} bad rows skipped" in data.summary()


def test_collate_by_hand():
    """TRL's DataCollatorForPreference docstring example: chosen rows first, then rejected rows,
    right-padded; the completion mask covers the answer tokens only."""
    pairs = [PreferencePair(1, (1, 2, 3), (4, 5), (6,)), PreferencePair(2, (7, 8), (9,), (10, 11))]
    batch = collate_pairs(pairs, pad_id=0, indices=[5, 9])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0], [1, 2, 3, 6, 0], [7, 8, 10, 11, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 0]]
    assert batch["index"].tolist() == [5, 9] and int(batch["num_tokens"]) == 16


def test_collate_matches_live_trl_collator():
    """The same pairs through TRL 1.16's own collator give the same three tensors."""
    pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    g = torch.Generator().manual_seed(0)
    rand = lambda lo, hi: tuple(torch.randint(0, 50, (int(torch.randint(lo, hi, (1,), generator=g)),),  # noqa: E731
                                              generator=g).tolist())
    pairs = [PreferencePair(i, rand(1, 6), rand(1, 5), rand(1, 5)) for i in range(4)]
    ours = collate_pairs(pairs, pad_id=99)
    theirs = DataCollatorForPreference(pad_token_id=99)(
        [{"prompt_ids": list(p.prompt_ids), "chosen_ids": list(p.chosen_ids), "rejected_ids": list(p.rejected_ids)}
         for p in pairs])
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(ours[key], theirs[key]), key


def _pairs(n):
    return [PreferencePair(i + 1, (1, 2), (3,) * (1 + i % 3), (4,)) for i in range(n)]


def test_batches_are_a_deterministic_stream_of_epochs():
    """7 pairs in batches of 3: 3 micro-batches per epoch (the last holds 1). Each epoch visits
    every pair once, in an order that depends only on seed + epoch; batch i of the stream is
    batch i mod 3 of epoch i // 3, so an index is the whole data position."""
    from anita.dpo.data import PreferenceData

    data = PreferenceData("toy", _pairs(7))
    stream = PreferenceBatches(data, batch_size=3, pad_id=0, seed=1)
    assert stream.per_epoch == len(stream) == 3
    epoch0 = [stream[i]["index"].tolist() for i in range(3)]
    assert [len(b) for b in epoch0] == [3, 3, 1]
    assert sorted(sum(epoch0, [])) == list(range(7))
    epoch1 = sum((stream[i]["index"].tolist() for i in range(3, 6)), [])
    assert sorted(epoch1) == list(range(7)) and epoch1 != sum(epoch0, [])
    again = PreferenceBatches(data, batch_size=3, pad_id=0, seed=1)
    assert [again[i]["index"].tolist() for i in (4, 0)] == [stream[4]["index"].tolist(), epoch0[0]]
    in_order = PreferenceBatches(data, batch_size=3, pad_id=0, shuffle=False)
    assert [b["index"].tolist() for b in in_order] == [[0, 1, 2], [3, 4, 5], [6]]


def test_batches_carry_precomputed_reference_logps_by_index():
    from anita.dpo.data import PreferenceData

    data = PreferenceData("toy", _pairs(5))
    table = (-torch.arange(5.0), -10 - torch.arange(5.0))
    stream = PreferenceBatches(data, batch_size=2, pad_id=0, seed=3, ref_logps=table)
    for i in range(6):
        batch = stream[i]
        assert torch.equal(batch["ref_chosen_logps"], table[0][batch["index"]])
        assert torch.equal(batch["ref_rejected_logps"], table[1][batch["index"]])
    with pytest.raises(AnitaError, match="5 pairs but the reference log-prob table has 4 rows"):
        PreferenceBatches(data, batch_size=2, pad_id=0, ref_logps=(table[0][:4], table[1][:4]))


def test_fingerprint_names_the_tokenized_data():
    from anita.dpo.data import PreferenceData

    a, b = PreferenceData("x", _pairs(3)), PreferenceData("y", _pairs(3))
    c = PreferenceData("x", _pairs(3)[:2] + [PreferencePair(3, (1, 2), (3,), (5,))])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
