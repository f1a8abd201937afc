"""Row formats recognised from column names; implicit prompts found as TRL's extract_prompt finds them
(checked against TRL live when installed, and against hand-written expectations always)."""

from __future__ import annotations

import pytest

from anita.dpo.data import read_preferences
from anita.errors import AnitaError
from anita.sources.formats import FormatError, extract_prompt, parse_columns, preference_parts, rename, sft_row
from tests.sources.conftest import jsonl_text, ultrafeedback_rows, write_parquet

CHAT_CHOSEN = [{"role": "user", "content": "Cielo?"}, {"role": "assistant", "content": "Blu."}]
CHAT_REJECTED = [{"role": "user", "content": "Cielo?"}, {"role": "assistant", "content": "Verde."}]
EXTRACT_CASES = [
    (CHAT_CHOSEN, CHAT_REJECTED, (CHAT_CHOSEN[:1], CHAT_CHOSEN[1:], CHAT_REJECTED[1:])),
    ("The sky is blue.", "The sky is green.", ("The sky is", " blue.", " green.")),  # the space goes to the answers
    ("Q: x? A: yes", "Q: x? A: no", ("Q: x? A:", " yes", " no")),
]


@pytest.mark.parametrize("chosen, rejected, expected", EXTRACT_CASES)
def test_extract_prompt(chosen, rejected, expected):
    assert extract_prompt(chosen, rejected) == expected


@pytest.mark.parametrize("chosen, rejected, expected", EXTRACT_CASES)
def test_extract_prompt_agrees_with_trl(chosen, rejected, expected):
    trl = pytest.importorskip("trl.data_utils")
    theirs = trl.extract_prompt({"chosen": chosen, "rejected": rejected})
    assert extract_prompt(chosen, rejected) == (theirs["prompt"], theirs["chosen"], theirs["rejected"])


def test_implicit_prompt_pairs_tokenize_like_explicit_ones(tmp_path, byte_tokenizer):
    """UltraFeedback rows (parquet, prompt inside chosen/rejected) == the same pairs with the prompt given."""
    rows = ultrafeedback_rows(5)
    implicit = read_preferences(write_parquet(tmp_path / "uf.parquet", rows), byte_tokenizer, max_length=64)
    explicit_rows = [{"prompt": r["chosen"][:1], "chosen": r["chosen"][1:], "rejected": r["rejected"][1:]} for r in rows]
    (tmp_path / "ex.jsonl").write_text(jsonl_text(explicit_rows))
    explicit = read_preferences(tmp_path / "ex.jsonl", byte_tokenizer, max_length=64)
    strip = lambda data: [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in data.pairs]  # noqa: E731
    assert strip(implicit) == strip(explicit) and len(strip(implicit)) == 5
    assert implicit.formats == {"preference (implicit prompt)": 5}
    assert explicit.formats == {"preference (explicit prompt)": 5}
    assert [p.line for p in implicit.pairs] == [0, 1, 2, 3, 4]  # parquet rows, 0-based


def test_a_prompt_column_must_match_the_implicit_prompt(tmp_path, byte_tokenizer):
    row = {"prompt": "Mare?", "chosen": CHAT_CHOSEN, "rejected": CHAT_REJECTED}
    with pytest.raises(ValueError, match="'prompt' .* is not the last user message"):
        preference_parts(row)
    assert preference_parts({**row, "prompt": " Cielo? "})[3] is True


@pytest.mark.parametrize("row, fmt, messages", [
    ({"messages": CHAT_CHOSEN, "prompt": "Cielo?", "prompt_id": "0"}, "messages", CHAT_CHOSEN),  # UltraChat
    ({"conversations": [{"from": "human", "value": "Cielo?"}, {"from": "gpt", "value": "Blu."}]}, "sharegpt",
     CHAT_CHOSEN),
    ({"instruction": "Cielo?", "input": "", "output": "Blu."}, "alpaca", CHAT_CHOSEN),
    ({"instruction": "Traduci", "input": "cane", "output": "dog"}, "alpaca",
     [{"role": "user", "content": "Traduci\n\ncane"}, {"role": "assistant", "content": "dog"}]),
])
def test_sft_formats_become_messages(row, fmt, messages):
    assert sft_row(row) == (fmt, {"messages": messages} if fmt != "messages" else row)


def test_text_field_and_columns():
    row = {"body": "ciao", "url": "u", "text": "no"}
    assert sft_row(row, text_field="body") == ("text", {"text": "ciao"})
    with pytest.raises(FormatError, match="no column 'corpo' .*columns found: body, url, text"):
        sft_row(row, text_field="corpo")
    mapping = parse_columns("prompt=question, completion=answer")
    assert rename({"question": "q", "answer": "a", "id": 1}, mapping) == {"id": 1, "prompt": "q", "completion": "a"}
    with pytest.raises(AnitaError, match="NAME=COLUMN"):
        parse_columns(["prompt"])
