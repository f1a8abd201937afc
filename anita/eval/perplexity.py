"""Perplexity of text under a causal LM, with a strided sliding window.

Every token of every document is predicted exactly once. A document is prefixed with BOS (EOS when
the vocabulary has none), as lm-evaluation-harness's `loglikelihood_rolling` does, so its first
token is scored too. A document longer than the window is read in windows of `window` tokens that
start `stride` tokens apart (Hugging Face's "Perplexity of fixed-length models" guide); each window
scores only the tokens no earlier window scored, so every prediction after the first window sees
at least window − stride tokens of context. The model reads all of a window but its last token
(whose prediction nobody scores).

With `full_last`, the last window is slid back to end at the document's end and hold `window`
tokens, so its predictions see as much context as the model allows. lm-evaluation-harness's
rolling windows (`utils.get_rolling_token_windows` with context_len 1, then
`make_disjoint_window`) are exactly these windows with window = max_length + 1 (the model reads
max_length tokens), stride = max_length and `full_last` (`harness_windows`).

A window is scored as a (context, continuation) pair — the tokens before its first scored one,
and the scored ones — through `anita.eval.scoring.score_requests`, the path multiple choice and
the harness model use, batched across windows and documents.

    perplexity    = exp(Σ NLL / Σ tokens)          over all documents: token-weighted, not a mean
                                                   of per-document perplexities
    bits_per_byte = Σ NLL / (ln 2 · Σ UTF-8 bytes)  (the harness's tokenizer-independent figure)

Input: a plain text file is one document; a data source of `anita.sources` (a .jsonl, .parquet, .csv,
.json or .arrow file, a dataset directory, a Hub id) has one `{"text": str}` document per row.
"""

from __future__ import annotations

import math
from pathlib import Path

from anita.errors import AnitaError
from anita.eval.scoring import score_requests
from anita.sources import open_source
from anita.sources.files import SUFFIXES


def read_texts(path) -> list[str]:
    """The documents of a text file (one) or of a data source (one `{"text": str}` per row)."""
    file = Path(path)
    if file.is_file() and not file.name.lower().endswith(tuple(SUFFIXES)):
        data = file.read_bytes()
        if b"\x00" in data:
            raise AnitaError(f"{file}: a binary file of unknown kind (NUL bytes), not UTF-8 text")
        try:
            return [data.decode("utf-8")]
        except UnicodeDecodeError as e:
            raise AnitaError(f"{file}: not UTF-8 text (byte {e.start})") from None
    texts = []
    for rec in open_source(path, what="text file").records():
        if rec.error:
            raise AnitaError(f"{rec.where}: {rec.error}")
        if not isinstance(rec.row.get("text"), str):
            raise AnitaError(f'{rec.where}: expected an object with a string "text" field')
        texts.append(rec.row["text"])
    return texts


def windows(length: int, window: int, stride: int, full_last: bool = False) -> list[tuple[int, int, int]]:
    """(begin, end, first) per window over `length` tokens: the window holds tokens [begin, end)
    and scores tokens [first, end); token 0 (the BOS prefix) is never scored."""
    spans, first, begin = [], 1, 0
    while first < length:
        end = min(begin + window, length)
        spans.append((max(0, end - window) if full_last else begin, end, first))
        first, begin = end, begin + stride
    return spans


def harness_windows(length: int, max_length: int) -> list[tuple[int, int, int]]:
    """The harness's rolling windows for a model of `max_length` tokens (module docstring)."""
    return windows(length, max_length + 1, max_length, full_last=True)


def window_requests(ids: list[int], spans) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) of each window: the tokens it reads before its first scored
    one, and the scored ones."""
    return [(ids[begin:first], ids[first:end]) for begin, end, first in spans]


def rolling_nlls(model, documents: list[list[int]], spans_of, batch_size: int = 1,
                 progress: bool = False) -> list[float]:
    """Σ −log p(ids[t] | ids[<t]) for t ≥ 1 of each document (ids, BOS first), its windows given by
    `spans_of(len(ids))`, all windows of all documents scored `batch_size` at a time."""
    requests, owner = [], []
    for d, ids in enumerate(documents):
        for request in window_requests(ids, spans_of(len(ids))):
            requests.append(request)
            owner.append(d)
    nlls = [0.0] * len(documents)
    for d, score in zip(owner, score_requests(model, requests, batch_size, progress=progress)):
        nlls[d] -= score.logprob
    return nlls


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
                        stride: int | None = None, batch_size: int = 1, progress: bool = False) -> dict:
    """perplexity, nll_per_token, bits_per_byte, tokens, bytes and documents over `texts`;
    `batch_size` windows per forward pass; `progress` shows a bar of windows."""
    window, stride = check_window(model, window, stride)
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if prefix is None:
        raise AnitaError("perplexity: the tokenizer has neither a BOS nor an EOS token to start a document with")
    documents = [[prefix] + tokenizer.encode(text, add_special_tokens=False) for text in texts]
    tokens = sum(len(ids) - 1 for ids in documents)
    if tokens == 0:
        raise AnitaError("perplexity: the text has no tokens to score")
    nll = sum(rolling_nlls(model, documents, lambda n: windows(n, window, stride), batch_size, progress))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"perplexity": math.exp(nll / tokens), "nll_per_token": nll / tokens,
            "bits_per_byte": nll / (math.log(2) * n_bytes), "tokens": tokens, "bytes": n_bytes,
            "documents": len(texts)}
