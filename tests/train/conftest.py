"""Shared fixtures of the training tests: a tiny Llama 3 checkpoint *with* a tokenizer.

The tokenizer is byte-level (one token per UTF-8 byte, ids 0-255) plus Llama 3's special tokens
(256-260), so the Llama 3 chat format applies and every test string tokenizes predictably:
"ab" is [97, 98]. The model is the suite's tiny Llama with a 261-token vocabulary.
"""

from __future__ import annotations

import json

import pytest
import torch

from anita.model import save_pretrained
from tests.conftest import tiny_model

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
VOCAB = 256 + len(SPECIALS)


def write_byte_tokenizer(path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: bytes_of(c))
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def bytes_of(char: str) -> int:
    """The byte that GPT-2's byte-to-unicode table maps to `char` (so id == byte value)."""
    code = ord(char)
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def make_tiny_run_model(path, seed: int = 0):
    """A tiny Llama 3 (no rope scaling) and the byte tokenizer, saved in `path`."""
    path.mkdir(parents=True, exist_ok=True)
    save_pretrained(tiny_model("llama3", seed=seed, vocab_size=VOCAB, bos_token_id=256, eos_token_id=257), path)
    write_byte_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_run_model(tmp_path_factory):
    return make_tiny_run_model(tmp_path_factory.mktemp("tiny-train-model"))


@pytest.fixture(scope="session")
def byte_tokenizer(tiny_run_model):
    from anita.model import Tokenizer

    return Tokenizer.from_pretrained(tiny_run_model)


def write_jsonl(path, rows) -> str:
    """Rows (dicts, or raw strings written as they are) as a JSONL file; returns its path."""
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """n short, varied question/answer chats (lengths differ, so batches need padding)."""
    g = torch.Generator().manual_seed(seed)
    words = ["ciao", "casa", "mare", "sole", "pane", "vino", "luna", "gatto", "cane", "fiore"]
    rows = []
    for i in range(n):
        k = int(torch.randint(1, 5, (1,), generator=g))
        q = " ".join(words[int(j)] for j in torch.randint(0, 10, (k,), generator=g))
        rows.append({"messages": [{"role": "user", "content": f"{i}: {q}?"},
                                  {"role": "assistant", "content": q.upper()[: 3 + i % 7]}]})
    return rows



@pytest.fixture(scope="session")
def whole_run(tmp_path_factory, tiny_run_model):
    """(data, out): the uninterrupted run of tests/train/runs.py that killed, stopped and damaged
    runs must equal once resumed."""
    from anita.cli import main
    from tests.train.runs import sft_args

    tmp = tmp_path_factory.mktemp("whole-run")
    data = write_jsonl(tmp / "train.jsonl", chat_rows(16))  # 4 steps per epoch: 4 epochs
    assert main(sft_args(tiny_run_model, data, tmp / "whole")) == 0
    return data, tmp / "whole"
