"""Tests for anita/dpo/unpaired.py: KTO's unpaired rows, paired rows unpaired as TRL does, the
mismatched pairs of a batch, and bad rows with line numbers.

The byte tokenizer of tests/train/conftest.py makes ids hand-derivable (a string's ids are its
UTF-8 bytes, 260 is <|eot_id|>, 257 the pad); TRL's `unpair_preference_dataset` is the oracle for
the unpairing when trl (and datasets) are installed.
"""

import pytest
import torch

from anita.dpo.unpaired import UnpairedBatches, collate_unpaired, read_unpaired
from anita.errors import AnitaError
from tests.train.conftest import byte_tokenizer, tiny_run_model, write_jsonl  # noqa: F401 (fixtures)

EOT, PAD = 260, 257
PAIRS = [{"prompt": "a", "chosen": "si", "rejected": "no"}, {"prompt": "b", "chosen": "ok", "rejected": "mai"},
         {"prompt": "c", "chosen": "bene", "rejected": "male"}]


def ids(text: str) -> tuple[int, ...]:
    return tuple(text.encode()) + (EOT,)


def test_unpaired_rows_keep_their_order_and_labels(tmp_path, byte_tokenizer):
    rows = [{"prompt": "a", "completion": "si", "label": True}, {"prompt": "b", "completion": "no", "label": False},
            {"prompt": [{"role": "user", "content": "c"}], "completion": [{"role": "assistant", "content": "ok"}],
             "label": True}]
    data = read_unpaired(write_jsonl(tmp_path / "u.jsonl", rows), byte_tokenizer, max_length=100)
    assert [(e.line, e.completion_ids, e.label) for e in data.examples] == [
        (1, ids("si"), True), (2, ids("no"), False), (3, ids("ok"), True)]
    assert not data.from_pairs and data.desirable == 2
    assert "3 unpaired examples (2 desirable, 1 undesirable" in data.summary()


def test_pairs_are_unpaired_as_trl_does(tmp_path, byte_tokenizer):
    """Every chosen answer (label true) first, in file order, then every rejected one (false): the
    order of TRL's `unpair_preference_dataset`, compared live when trl is installed."""
    data = read_unpaired(write_jsonl(tmp_path / "p.jsonl", PAIRS), byte_tokenizer, max_length=100)
    ours = [(e.completion_ids, e.label) for e in data.examples]
    assert ours == [(ids("si"), True), (ids("ok"), True), (ids("bene"), True),
                    (ids("no"), False), (ids("mai"), False), (ids("male"), False)]
    assert data.from_pairs and [e.line for e in data.examples] == [1, 2, 3, 1, 2, 3]
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from trl.data_utils import unpair_preference_dataset

    theirs = unpair_preference_dataset(datasets.Dataset.from_list(PAIRS))
    assert [(ids(r["completion"]), r["label"]) for r in theirs] == ours
    assert [r["prompt"] for r in theirs] == ["a", "b", "c"] * 2


def test_mismatched_pairs_rotate_the_batch_completions_by_one(tmp_path, byte_tokenizer):
    """TRL's rotation: (x_1, y_1), (x_2, y_2), (x_3, y_3) also give (x_1, y_3), (x_2, y_1), (x_3, y_2),
    laid out as [matched; mismatched] rows, right-padded, with the completion mask on the answers."""
    data = read_unpaired(write_jsonl(tmp_path / "p.jsonl", PAIRS), byte_tokenizer, max_length=100)
    batch = collate_unpaired(data.examples[:3], PAD, max_length=100)
    B, prompt = 3, len(data.examples[0].prompt_ids)
    answers = [batch["input_ids"][i][batch["completion_mask"][i].bool()].tolist() for i in range(2 * B)]
    assert answers == [list(ids(w)) for w in ("si", "ok", "bene", "bene", "si", "ok")]
    assert batch["input_ids"][1, :prompt].tolist() == batch["input_ids"][B + 1, :prompt].tolist()  # same prompt x_2
    assert batch["label"].tolist() == [True] * 3 and batch["index"].tolist() == [0, 1, 2]
    short = collate_unpaired(data.examples[:3], PAD, max_length=prompt + 3)  # y_3 = "bene" cut to 3 tokens for x_1
    assert short["input_ids"][B][short["completion_mask"][B].bool()].tolist() == list(ids("bene"))[:3]


def test_batches_shuffle_and_never_leave_an_example_alone(tmp_path, byte_tokenizer):
    """7 examples in batches of 2: a last batch of one joins the one before it (alone, its
    mismatched pair would be itself); every example appears once per epoch."""
    rows = [{"prompt": f"p{i}", "completion": f"c{i}", "label": i % 2 == 0} for i in range(7)]
    data = read_unpaired(write_jsonl(tmp_path / "u.jsonl", rows), byte_tokenizer, max_length=100)
    batches = UnpairedBatches(data, 2, PAD, max_length=100, seed=0)
    sizes = [len(b["index"]) for b in batches]
    assert sizes == [2, 2, 3] and sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(7))


def test_bad_rows_name_file_and_line(tmp_path, byte_tokenizer):
    def read(rows, **kw):
        return read_unpaired(write_jsonl(tmp_path / "bad.jsonl", rows), byte_tokenizer, max_length=100, **kw)

    good = {"prompt": "a", "completion": "b", "label": True}
    with pytest.raises(AnitaError, match=r"bad.jsonl:2: field 'label' must be true .* got 'yes'"):
        read([good, {"prompt": "a", "completion": "b", "label": "yes"}])
    with pytest.raises(AnitaError, match=r"bad.jsonl:2: missing field 'completion' .*expected an unpaired row"):
        read([good, PAIRS[0]])
    with pytest.raises(AnitaError, match=r"bad.jsonl:2: missing field 'chosen'.*expected a preference pair"):
        read([PAIRS[0], good])
    with pytest.raises(AnitaError, match="KTO needs at least 2 usable examples"):
        read([good])
    data = read([good, "{not json", good], skip_bad_rows=True)
    assert len(data) == 2 and [n for n, _ in data.skipped] == [2]
