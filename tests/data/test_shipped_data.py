"""Checks on the Italian data shipped in anita/data (see anita/data/README.md).

Every line of every file must parse and have the exact schema its stage expects: chat messages
for SFT, TRL's standard or conversational preference format for DPO, `{"text"}` for
pre-training, and the lm-evaluation-harness multiple-choice layout `{"context", "choices",
"gold"}`. The tests also check that no prompt appears in both a train file and its held-out
file, that row counts are in the expected ranges, and that rows are short enough for the
CPU demo.

Length bounds are in characters, so the test needs no tokenizer. With the SmolLM2 tokenizer,
this Italian text averages about 2.7 characters per token (measured on pretrain_train.jsonl
when the data was written). So 700 characters is about 256 tokens.
"""

import collections
import json
import re

import pytest

from anita.data import SHIPPED_FILES, data_path, load_shipped
from anita.errors import AnitaError

# The ANITA authors' system prompt, word for word with their typo "un an" (docs/recipe.md).
ANITA_SYSTEM = (
    "Sei un an assistente AI per la lingua Italiana di nome LLaMAntino-3 ANITA (Advanced "
    "Natural-based interaction for the ITAlian language). Rispondi nella lingua usata per la "
    "domanda in modo chiaro, semplice ed esaustivo.")

EXPECTED_COUNTS = {  # inclusive ranges from the data brief: ~300/40, ~300/40, 25-40/~5, ~30/~80
    "sft_train": (250, 350), "sft_heldout": (30, 60),
    "dpo_train": (250, 350), "dpo_heldout": (30, 60),
    "pretrain_train": (25, 45), "pretrain_heldout": (3, 10),
    "mc_train": (20, 40), "mc_heldout": (60, 100),
}

ITALIAN_WORDS = {"il", "lo", "la", "gli", "le", "un", "una", "di", "da", "a", "con", "per", "che",
                 "non", "si", "è", "e", "sono", "ho", "fa", "del", "della", "al", "alla", "ti"}
ENGLISH_WORDS = {"the", "is", "and", "of", "to", "you", "it", "with", "for", "are", "on", "at"}


def _nonempty_str(x):
    return isinstance(x, str) and x.strip() != ""


def _words(text):
    return re.findall(r"[a-zàèéìòù']+", text.lower())


def _looks_english(text):
    """True when English function words outnumber Italian ones (a crude but stable signal)."""
    words = _words(text)
    return sum(w in ENGLISH_WORDS for w in words) > sum(w in ITALIAN_WORDS for w in words)


def _outside_quotes(text):
    """Text with quoted spans removed, so a request to translate an English quote stays Italian."""
    return re.sub(r'"[^"]*"', " ", text)


def _check_messages(messages, where, last="assistant"):
    """An optional system message, then user/assistant turns alternating, ending with `last`."""
    assert isinstance(messages, list) and messages, where
    for m in messages:
        assert isinstance(m, dict) and set(m) == {"role", "content"}, where
        assert _nonempty_str(m["content"]) and m["content"] == m["content"].strip(), where
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    alternating = (["user", "assistant"] * len(body))[:len(body)]
    assert body and body == alternating and body[-1] == last, f"{where}: roles {roles}"


def _dpo_prompt_text(row):
    p = row["prompt"]
    return p if isinstance(p, str) else p[-1]["content"]


def _dpo_is_conversational(row, where):
    """Check a DPO row's schema; return True for TRL's conversational (message-list) form."""
    assert set(row) == {"prompt", "chosen", "rejected"}, where
    if all(isinstance(row[k], str) for k in row):
        assert all(_nonempty_str(row[k]) for k in row), where
        assert row["chosen"] != row["rejected"], where
        return False
    _check_messages(row["prompt"], where, last="user")
    for k in ("chosen", "rejected"):
        assert isinstance(row[k], list) and len(row[k]) == 1, where
        assert set(row[k][0]) == {"role", "content"} and row[k][0]["role"] == "assistant", where
        assert _nonempty_str(row[k][0]["content"]), where
    assert row["chosen"][0]["content"] != row["rejected"][0]["content"], where
    return True


@pytest.mark.parametrize("name", sorted(SHIPPED_FILES))
def test_every_line_is_one_json_object_and_count_in_range(name):
    path = data_path(name)
    raw = path.read_bytes()
    assert raw.endswith(b"\n"), f"{path}: last line must end with a newline"
    lines = raw.decode("utf-8").split("\n")[:-1]
    for i, line in enumerate(lines, start=1):
        assert line.strip(), f"{path}:{i}: blank line"
        assert isinstance(json.loads(line), dict), f"{path}:{i}"
    lo, hi = EXPECTED_COUNTS[name]
    assert lo <= len(lines) <= hi, f"{path}: {len(lines)} rows, expected {lo}..{hi}"
    assert len(load_shipped(name)) == len(lines)


def test_data_path_accepts_short_and_file_names_and_rejects_unknown():
    assert data_path("sft_train") == data_path("sft_train.jsonl")
    assert data_path("mc_heldout").name == "mc_heldout.jsonl"
    with pytest.raises(AnitaError, match="unknown shipped data file 'sft_test'"):
        data_path("sft_test")


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_sft_schema_system_prompts_and_lengths(split):
    rows = load_shipped(f"sft_{split}")
    n_system = n_anita = n_multi = 0
    for i, row in enumerate(rows, start=1):
        where = f"sft_{split}.jsonl:{i}"
        assert set(row) == {"messages"}, where
        msgs = row["messages"]
        _check_messages(msgs, where)
        n_system += msgs[0]["role"] == "system"
        n_anita += msgs[0]["content"] == ANITA_SYSTEM
        n_multi += sum(m["role"] == "user" for m in msgs) > 1
        assert sum(len(m["content"]) for m in msgs) <= 700, f"{where}: too long for the demo"
        for m in msgs:
            if m["role"] == "assistant":
                assert len(m["content"].split()) <= 80, f"{where}: answer over 80 words"
    assert 0.15 <= n_system / len(rows) <= 0.40  # "about a quarter" start with a system message
    assert n_anita >= 3 and n_system - n_anita >= 3  # both the ANITA prompt and short Italian ones
    assert n_multi >= 2


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_dpo_schema_languages_and_lengths(split):
    rows = load_shipped(f"dpo_{split}")
    n_conv = n_english_rejected = 0
    for i, row in enumerate(rows, start=1):
        where = f"dpo_{split}.jsonl:{i}"
        n_conv += _dpo_is_conversational(row, where)
        text = {k: (v if isinstance(v, str) else v[-1]["content"]) for k, v in row.items()}
        for k in ("prompt", "chosen"):
            assert not _looks_english(_outside_quotes(text[k])), f"{where}: {k} is not Italian"
        n_english_rejected += _looks_english(text["rejected"])
        assert len(text["chosen"].split()) <= 80, f"{where}: chosen over 80 words"
        assert len(text["prompt"]) + max(len(text["chosen"]), len(text["rejected"])) <= 500, where
    assert n_conv >= 3  # ~20 conversational rows over both splits
    assert n_english_rejected / len(rows) >= 0.2  # the "not Italian" signal is well represented


def test_dpo_has_both_formats_in_about_twenty_rows():
    conv = sum(_dpo_is_conversational(r, "dpo") for s in ("train", "heldout")
               for r in load_shipped(f"dpo_{s}"))
    assert 15 <= conv <= 30


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_pretrain_rows_are_short_italian_prose(split):
    for i, row in enumerate(load_shipped(f"pretrain_{split}"), start=1):
        where = f"pretrain_{split}.jsonl:{i}"
        assert set(row) == {"text"} and _nonempty_str(row["text"]), where
        assert 40 <= len(row["text"].split()) and len(row["text"]) <= 800, where
        assert not _looks_english(row["text"]), where


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_mc_schema_leading_spaces_and_balanced_gold(split):
    rows = load_shipped(f"mc_{split}")
    for i, row in enumerate(rows, start=1):
        where = f"mc_{split}.jsonl:{i}"
        assert set(row) == {"context", "choices", "gold"}, where
        assert _nonempty_str(row["context"]) and not row["context"].endswith(" "), where
        choices = row["choices"]
        assert isinstance(choices, list) and len(choices) == 4 and len(set(choices)) == 4, where
        for c in choices:  # the continuation is the choice exactly as given: one leading space
            assert _nonempty_str(c) and c.startswith(" ") and not c.startswith("  "), where
        gold = row["gold"]
        assert type(gold) is int and 0 <= gold < len(choices), where
    counts = collections.Counter(r["gold"] for r in rows)
    assert min(counts[g] for g in range(4)) >= 0.2 * len(rows)  # roughly uniform (25% each)


@pytest.mark.parametrize("stage,key", [
    ("sft", lambda r: next(m["content"] for m in r["messages"] if m["role"] == "user")),
    ("dpo", _dpo_prompt_text),
    ("pretrain", lambda r: r["text"]),
    ("mc", lambda r: r["context"]),
])
def test_no_duplicate_prompts_within_or_across_splits(stage, key):
    train = [key(r).strip().lower() for r in load_shipped(f"{stage}_train")]
    held = [key(r).strip().lower() for r in load_shipped(f"{stage}_heldout")]
    assert len(set(train)) == len(train) and len(set(held)) == len(held)
    assert not set(train) & set(held)


def test_trl_agrees_on_which_rows_are_conversational():
    """TRL's own `is_conversational` is the oracle for its preference and chat formats."""
    data_utils = pytest.importorskip("trl.data_utils")
    for split in ("train", "heldout"):
        for i, row in enumerate(load_shipped(f"dpo_{split}"), start=1):
            where = f"dpo_{split}.jsonl:{i}"
            assert data_utils.is_conversational(row) == _dpo_is_conversational(row, where), where
        assert all(data_utils.is_conversational(r) for r in load_shipped(f"sft_{split}"))


def test_load_shipped_names_file_and_line_of_a_bad_row(tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ciao"}\n{"text": \n', encoding="utf-8")
    monkeypatch.setattr("anita.data.data_path", lambda name: bad)
    with pytest.raises(AnitaError, match=r"bad\.jsonl:2: not valid JSON"):
        load_shipped("pretrain_train")
    bad.write_text('["not", "an", "object"]\n', encoding="utf-8")
    with pytest.raises(AnitaError, match=r"bad\.jsonl:1: expected a JSON object, got list"):
        load_shipped("pretrain_train")
