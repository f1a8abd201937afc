"""Tests for anita/train/data.py: rendering of the three row formats, bad rows, truncation,
packing and collation.

The byte tokenizer of tests/train/conftest.py makes expected ids hand-derivable: a string's ids
are its UTF-8 bytes, specials are 256 (<|begin_of_text|>), 257 (<|end_of_text|>, also eos and
pad), 258/259 (header start/end) and 260 (<|eot_id|>).
"""

import re

import pytest
import torch

from anita.errors import AnitaError
from anita.model.logprobs import IGNORE_INDEX as X
from anita.model.masks import Spans
from anita.train.data import MicroBatches, budget_batches, collate, load_examples, make_example, pack_rows
from tests.train.conftest import write_jsonl

BOT, EOS, SH, EH, EOT = 256, 257, 258, 259, 260


def ids(text: str) -> list[int]:
    return list(text.encode())


def test_messages_train_only_the_assistant_turn(tmp_path, byte_tokenizer):
    """Llama 3 format: BOT, header(user), "hi", EOT, header(assistant), "yo", EOT. The labels are
    the next tokens where those are assistant tokens ("yo" and its EOT), -100 elsewhere."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "yo"}]}])
    [ex], report = load_examples(path, byte_tokenizer, max_length=100)
    header = lambda role: [SH] + ids(role) + [EH] + ids("\n\n")  # noqa: E731
    want = [BOT] + header("user") + ids("hi") + [EOT] + header("assistant") + ids("yo") + [EOT]
    assert ex.input_ids.tolist() == want
    n = len(want)
    assert ex.labels.tolist() == [X] * (n - 4) + [ord("y"), ord("o"), EOT, X]
    assert (report.kept, report.trained_tokens, report.tokens) == (1, 3, n)


def test_prompt_completion_and_text_rows(tmp_path, byte_tokenizer):
    """Prompt-completion: the completion and the appended eos are trained, the prompt is not.
    Text: every token is trained (each position predicts the next), eos appended."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2+2=", "completion": "4"}, {"text": "abc"}])
    [pc, text], _ = load_examples(path, byte_tokenizer, max_length=100)
    assert pc.input_ids.tolist() == ids("2+2=4") + [EOS]
    assert pc.labels.tolist() == [X, X, X, ord("4"), EOS, X]
    assert text.input_ids.tolist() == ids("abc") + [EOS]
    assert text.labels.tolist() == [ord("b"), ord("c"), EOS, X]


def test_conversational_prompt_completion(tmp_path, byte_tokenizer):
    row = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}
    [ex], _ = load_examples(write_jsonl(tmp_path / "d.jsonl", [row]), byte_tokenizer, max_length=100)
    trained = ex.labels[ex.labels != X].tolist()
    assert trained == ids("yo") + [EOT]


BAD_ROWS = [
    ('{"messages": [', "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ({"prompt": "only a prompt"}, "missing field 'completion'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}, "has role 'robot'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "empty"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "missing field 'content'"),
    ({"text": 5}, "must be a string"),
    ({"question": "q", "answer": "a"}, "columns question, answer fit no format; expected messages (messages); "
                                       "sharegpt (conversations); alpaca (instruction, output)"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS)
def test_bad_row_is_an_error_naming_file_and_line(tmp_path, byte_tokenizer, row, message):
    good = {"text": "ok"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, "", good, row, good])  # the bad row is on line 4
    with pytest.raises(AnitaError, match=rf"d\.jsonl:4: .*{re.escape(message)}"):
        load_examples(path, byte_tokenizer, max_length=100)


def test_skip_bad_rows_skips_and_counts(tmp_path, byte_tokenizer):
    rows = [{"text": "ok"}] + [r for r, _ in BAD_ROWS] + [{"text": "fine"}]
    examples, report = load_examples(write_jsonl(tmp_path / "d.jsonl", rows), byte_tokenizer, 100, skip_bad_rows=True)
    assert len(examples) == 2
    assert report.skipped_bad == len(BAD_ROWS)
    assert report.bad_lines == list(range(2, 2 + len(BAD_ROWS)))
    assert f"{len(BAD_ROWS)} malformed rows skipped" in report.summary()


def test_truncation_drops_rows_left_with_nothing_to_train(tmp_path, byte_tokenizer):
    """max_length 6: "2+2=4"+eos (6 tokens) fits; a 10-byte prompt leaves only prompt tokens and
    is dropped; a long text is cut but still trained."""
    rows = [{"prompt": "2+2=", "completion": "4"}, {"prompt": "0123456789", "completion": "x"},
            {"text": "abcdefghij"}]
    examples, report = load_examples(write_jsonl(tmp_path / "d.jsonl", rows), byte_tokenizer, max_length=6)
    assert [len(e.input_ids) for e in examples] == [6, 6]
    assert (report.kept, report.dropped_truncated, report.truncated) == (2, 1, 1)
    assert "1 dropped" in report.summary()
    assert examples[1].labels.tolist() == ids("bcdef") + [X]  # the cut row's last token predicts nothing


def test_file_of_only_unusable_rows_is_an_error(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "0123456789", "completion": "x"}])
    with pytest.raises(AnitaError, match="no usable rows"):
        load_examples(path, byte_tokenizer, max_length=4)
    with pytest.raises(AnitaError, match="no such data file"):
        load_examples(tmp_path / "missing.jsonl", byte_tokenizer, max_length=4)


def test_pack_rows_keeps_order_and_respects_max_length():
    lengths = [3, 4, 2, 5, 1]
    assert pack_rows(lengths, [0, 1, 2, 3, 4], 6, packing=False) == [[0], [1], [2], [3], [4]]
    assert pack_rows(lengths, [0, 1, 2, 3, 4], 6, packing=True) == [[0], [1, 2], [3, 4]]
    assert pack_rows(lengths, [4, 3, 2, 1, 0], 7, packing=True) == [[4, 3], [2, 1], [0]]


def test_collate_packed_rows_restart_positions_and_block_attention():
    a, _ = make_example([1, 2, 3], [0, 1, 1], 10)
    b, _ = make_example([4, 5], [1, 1], 10)
    c, _ = make_example([6, 7, 8, 9], [0, 0, 1, 1], 10)
    batch = collate([[a, b], [c]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch["labels"].tolist() == [[2, 3, X, 5, X], [X, 8, 9, X, X]]  # a's last token never predicts b's first
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["num_tokens"].item() == 9
    assert batch["attention_mask"] == Spans((((0, 3), (3, 5)), ((0, 4),)))  # each example alone: no mask
    m = batch["attention_mask"].mask(5)  # the block-diagonal mask those spans stand for
    assert m.shape == (2, 5, 5) and m.dtype == torch.bool
    assert m[0].int().tolist() == [[1, 1, 1, 0, 0]] * 3 + [[0, 0, 0, 1, 1]] * 2
    assert m[1, :4].int().tolist() == [[1, 1, 1, 1, 0]] * 4 and not m[1, 4].any()  # padding attends nothing


def test_collate_unpacked_rows_use_a_padding_mask():
    a, _ = make_example([1, 2, 3], [1, 1, 1], 10)
    b, _ = make_example([4], [1], 10)
    batch = collate([[a], [b]], pad_id=0)
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[2, 3, X], [X, X, X]]


def test_micro_batch_stream_is_deterministic_and_reshuffled_per_epoch():
    examples = [make_example([i, i + 1], [1, 1], 10)[0] for i in range(6)]
    stream = MicroBatches(examples, batch_size=2, max_length=10, packing=False, pad_id=0, seed=3)
    again = MicroBatches(examples, batch_size=2, max_length=10, packing=False, pad_id=0, seed=3)
    assert stream.per_epoch == 3
    epoch0 = [stream[i]["input_ids"][:, 0].tolist() for i in range(3)]
    epoch1 = [stream[i]["input_ids"][:, 0].tolist() for i in range(3, 6)]
    assert sorted(sum(epoch0, [])) == sorted(sum(epoch1, [])) == list(range(6))  # each epoch sees all
    assert epoch0 != epoch1
    assert [again[i]["input_ids"][:, 0].tolist() for i in (4, 0)] == [epoch1[1], epoch0[0]]  # random access
    in_order = MicroBatches(examples, 2, 10, False, 0, shuffle=False)
    assert [b["input_ids"][:, 0].tolist() for b in in_order] == [[0, 1], [2, 3], [4, 5]]


# ------------------------------------------------------------------------ token-budget batches
def test_budget_batches_group_by_length_within_windows_and_fill_the_budget():
    """Worked by hand. lengths 3 4 2 5 1 6 in order, budget 10, windows of 3 items:
    window [3, 4, 2] sorted longest first 4 3 2: rows [1], [0] cost 2·4 = 8; + [2] would be 3·4 = 12 > 10;
    window [5, 1, 6] -> 6 5 1: [5] alone (2·6 = 12 > 10), then [3], [4] cost 2·5 = 10.
    Packing first-fit into rows of at most 10: window 1 -> 4 + 3 + 2 = 9 in one row; window 2 ->
    6 (row a), 5 (6 + 5 > 10: row b), 1 (fits row a)."""
    lengths, order = [3, 4, 2, 5, 1, 6], [0, 1, 2, 3, 4, 5]
    assert budget_batches(lengths, order, 10, packing=False, window=3) == [[[1], [0]], [[2]], [[5]], [[3], [4]]]
    assert budget_batches(lengths, order, 10, packing=True, window=3) == [[[1, 0, 2]], [[5, 4]], [[3]]]


def sft_examples(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 12, (n,), generator=g).tolist()
    return [make_example(list(range(1, k + 1)), [1] * k, 16)[0] for k in lengths]


@pytest.mark.parametrize("packing", [False, True])
def test_token_budget_micro_batches_respect_the_budget_and_see_every_example_once(packing):
    examples = sft_examples(50)
    stream = MicroBatches(examples, batch_size=1, max_length=16, packing=packing, pad_id=0, seed=2, max_tokens=24)
    total = sum(len(e.input_ids) for e in examples)
    for epoch in range(2):
        tokens = 0
        for i in range(epoch * stream.per_epoch, (epoch + 1) * stream.per_epoch):
            batch = stream[i]
            assert batch["input_ids"].numel() <= 24
            if packing:  # one padding-free row; positions restart at every example
                assert batch["input_ids"].shape[0] == 1 and batch["num_tokens"] == batch["input_ids"].numel()
                starts = (batch["position_ids"][0] == 0).sum().item()
                assert isinstance(batch["attention_mask"], Spans) or starts == 1
            tokens += batch["num_tokens"].item()
        assert tokens == total  # every example once per epoch; num_tokens counts real tokens only


def test_token_budget_stream_is_deterministic_resumable_and_reordered_per_epoch():
    examples = sft_examples(40, seed=1)
    make = lambda seed=5: MicroBatches(examples, 1, 16, True, 0, seed=seed, max_tokens=32)  # noqa: E731
    a, b = make(), make()
    n = a.per_epoch
    for i in (0, n - 1, n + 1, 4 * n + 2):  # a fresh object finds any micro-batch by its index
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"])
    epoch0, epoch1 = ([a[i]["input_ids"].tolist() for i in range(k * n, (k + 1) * n)] for k in (0, 1))
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)  # same batches, another order
    assert [make(6)[i]["input_ids"].tolist() for i in range(n)] != epoch0


def test_an_example_longer_than_the_budget_is_an_error():
    with pytest.raises(AnitaError, match="example 0 takes 11 tokens, more than --max-tokens 10"):
        MicroBatches([make_example(list(range(11)), [1] * 11, 16)[0]], 1, 16, True, 0, max_tokens=10)


def test_an_example_longer_than_the_budget_names_its_file_and_line(tmp_path, byte_tokenizer):
    rows = [{"text": "ciao"}, {"text": "mare"}, {"text": "una riga lunga, piu lunga del budget"}, {"text": "sole"}]
    examples, _ = load_examples(write_jsonl(tmp_path / "d.jsonl", rows), byte_tokenizer, max_length=100)
    too_long = examples.lengths[2]
    with pytest.raises(AnitaError, match=rf"d\.jsonl:3: this example takes {too_long} tokens, more than --max-tokens"):
        MicroBatches(examples, 1, 100, False, 0, max_tokens=20)
