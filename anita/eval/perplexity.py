"""Perplexity of text under a causal LM, with a strided sliding window.

Every token of every document is predicted exactly once. A document is prefixed with BOS (EOS when
the vocabulary has none), as lm-evaluation-harness's `loglikelihood_rolling` does, so its first
token is scored too. A document longer than the window is read in windows of `window` tokens that
start `stride` tokens apart (Hugging Face's "Perplexity of fixed-length models" guide); each window
scores only the tokens no earlier window scored, so every prediction after the first window sees
at least window − stride tokens of context.

    perplexity    = exp(Σ NLL / Σ tokens)          over all documents: token-weighted, not a mean
                                                   of per-document perplexities
    bits_per_byte = Σ NLL / (ln 2 · Σ UTF-8 bytes)  (the harness's tokenizer-independent figure)

Input: a text file is one document; a `.jsonl` file has one `{"text": str}` document per line.

Shapes: T window length, D model dim, V vocab.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from anita.errors import AnitaError
from anita.eval.scoring import continuation_logps
from anita.jsonl import parse_object
from anita.model.logprobs import IGNORE_INDEX
from anita.runtime import eval_mode


def read_texts(path) -> list[str]:
    """The documents of a text file (one) or a JSONL file (one `{"text": str}` per non-blank line)."""
    path = Path(path)
    if not path.is_file():
        raise AnitaError(f"{path}: no such text file")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise AnitaError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if path.suffix != ".jsonl":
        return [content]
    texts = []
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = parse_object(line, 'an object with a string "text" field')
        except ValueError as e:
            raise AnitaError(f"{path}:{lineno}: {e}") from None
        if not isinstance(row.get("text"), str):
            raise AnitaError(f'{path}:{lineno}: expected an object with a string "text" field')
        texts.append(row["text"])
    return texts


def windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first) per window over `length` tokens: the model reads tokens [begin, end) and
    scores tokens [first, end); token 0 (the BOS prefix) is never scored."""
    spans, first, begin = [], 1, 0
    while first < length:
        end = min(begin + window, length)
        spans.append((begin, end, first))
        first, begin = end, begin + stride
    return spans


@torch.no_grad()
def document_nll(model, ids: list[int], window: int, stride: int) -> float:
    """Σ −log p(ids[t] | ids[<t]) for t ≥ 1, window by window."""
    total = 0.0
    for begin, end, first in windows(len(ids), window, stride):
        inputs = torch.tensor([ids[begin:end]], device=model.device)  # (1, T)
        targets = torch.full_like(inputs, IGNORE_INDEX)  # position t predicts token begin + t + 1
        targets[0, first - begin - 1:end - begin - 1] = inputs[0, first - begin:]
        hidden = model.hidden_states(inputs)  # (1, T, D)
        total -= continuation_logps(model, hidden, targets).sum().item()
    return total


def check_window(model, window: int | None, stride: int | None) -> tuple[int, int]:
    """Defaults (the model's full context, half of it as stride) and range checks."""
    max_len = model.config.max_position_embeddings
    window = max_len if window is None else window
    stride = window // 2 if stride is None else stride
    if not 2 <= window <= max_len:
        raise AnitaError(f"window must be between 2 and the model's {max_len} positions, got {window}")
    if not 1 <= stride < window:
        raise AnitaError(f"stride must be at least 1 and smaller than the window ({window}), got {stride}")
    return window, stride


def evaluate_perplexity(model, tokenizer, texts: list[str], window: int | None = None,
                        stride: int | None = None) -> dict:
    """perplexity, nll_per_token, bits_per_byte, tokens, bytes and documents over `texts`."""
    window, stride = check_window(model, window, stride)
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if prefix is None:
        raise AnitaError("perplexity: the tokenizer has neither a BOS nor an EOS token to start a document with")
    nll, tokens = 0.0, 0
    with eval_mode(model):
        for text in texts:
            ids = [prefix] + tokenizer.encode(text, add_special_tokens=False)
            nll += document_nll(model, ids, window, stride)
            tokens += len(ids) - 1
    if tokens == 0:
        raise AnitaError("perplexity: the text has no tokens to score")
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"perplexity": math.exp(nll / tokens), "nll_per_token": nll / tokens,
            "bits_per_byte": nll / (math.log(2) * n_bytes), "tokens": tokens, "bytes": n_bytes,
            "documents": len(texts)}
