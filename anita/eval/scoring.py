"""Log-likelihoods of continuations under a causal LM: the one scoring path of `anita eval`'s
multiple choice, its perplexity, and the lm-evaluation-harness model (`anita.eval.harness`).

lm-evaluation-harness (EleutherAI, `lm_eval/models/huggingface.py`, `_loglikelihood_tokens`) scores
a (context, continuation) pair by running context + continuation[:-1] through the model and summing
log p(continuation_t | everything before it); it also reports whether every continuation token is
the argmax of its position ("is_greedy"). Two ways to compute the same sum here:

- `score_pairs`, the plain one: each pair is one row of a right-padded batch, as the harness does.
  Right padding comes after a row's real tokens, so causal attention never lets them see it.
- `score_continuations`, for continuations that share a context (the choices of a multiple-choice
  question; the first window of every document, whose context is only BOS): the context runs once
  into a KV cache (gpt-fast style), and the continuations then run as one batch against copies of
  the cached keys and values. C choices of T tokens cost one pass over the context plus C·T tokens
  instead of C·(context + T). The tests hold it equal to the plain one.

`score_requests` sends each group of requests with the same context to the shared path and the rest,
`batch_size` rows at a time, to the plain one, and returns the scores in the order asked.

Log-probabilities come from `anita.model.logprobs.token_logps` (the one log-prob module, shared with
SFT and DPO): the output head and the log-softmax in fp32 (as every sensitive step), a chunk of
positions at a time, so the fp32 logits of a long continuation or window ([N, V]) never exist at
once. For a bf16
or fp16 model this differs from the harness, whose logits and log-softmax stay in the model's
dtype: only the head is more exact here, the hidden states carry the model's own rounding either
way (the tests bound the bf16 scores against the fp32 model's). A LoRA adapter on `lm_head` is
scored through its merged weight W + scale·B·A (scoring needs no gradient).

Shapes: C continuations (rows of a batch), T continuation length, S cache length, D model dim,
V vocab, N scored tokens, n tokens in one chunk.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from tqdm import tqdm

from anita.lora import LoraLinear
from anita.model.llama import KVCache
from anita.model.logprobs import DEFAULT_CHUNK_SIZE, IGNORE_INDEX, output_head_weight, token_logps
from anita.runtime import eval_mode


class Score(NamedTuple):
    logprob: float  # Σ_t log p(continuation_t | before it)
    greedy: bool | None  # every continuation token is its position's argmax (None: not asked)


def head_weight(model) -> torch.Tensor:
    """The output head as one (V, D) matrix: `lm_head.weight`, or a LoRA head's merged W + scale·B·A
    (scoring needs no gradient through it)."""
    head = model.lm_head
    return head.merged_weight() if isinstance(head, LoraLinear) else output_head_weight(model)


@torch.no_grad()
def continuation_logps(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[b, t] | hidden[b, t]): hidden (B, T, D), targets (B, T) with IGNORE_INDEX where
    not scored -> (B, T) fp32, 0 at ignored positions."""
    return token_logps(hidden, head_weight(model), targets)


def greedy_rows(model, hidden: torch.Tensor, targets: torch.Tensor) -> list[bool]:
    """Per row, whether every scored target is the argmax of the logits at its position (the
    harness's is_greedy). hidden (B, T, D), targets (B, T) -> B booleans."""
    weight = head_weight(model)
    scored = targets != IGNORE_INDEX  # (B, T)
    h, want = hidden[scored], targets[scored]  # (N, D), (N,)
    hits = torch.empty_like(want, dtype=torch.bool)
    for start in range(0, h.shape[0], DEFAULT_CHUNK_SIZE):
        rows = slice(start, start + DEFAULT_CHUNK_SIZE)
        hits[rows] = (h[rows] @ weight.to(h.dtype).T).argmax(-1) == want[rows]  # (n, V) -> (n,)
    per_row = torch.ones_like(scored).masked_scatter(scored, hits)  # (B, T), True where not scored
    return per_row.all(-1).tolist()


def scores(model, hidden, targets, greedy: bool) -> list[Score]:
    sums = continuation_logps(model, hidden, targets).sum(-1).tolist()  # (C,)
    flags = greedy_rows(model, hidden, targets) if greedy else [None] * len(sums)
    return [Score(s, g) for s, g in zip(sums, flags)]


def expand_cache(model, cache: KVCache, rows: int, extra: int) -> KVCache:
    """A cache of `rows` sequences that all start with the single cached one, with room for `extra` more tokens."""
    S = cache.length
    out = KVCache(model.config, rows, S + extra, dtype=cache.k.dtype, device=cache.k.device)
    out.k[:, :, :, :S] = cache.k[:, :1, :, :S]  # (layers, 1, K, S, E) broadcast to every row
    out.v[:, :, :, :S] = cache.v[:, :1, :, :S]
    out.length = S
    return out


def pad_right(sequences: list[list[int]], device) -> torch.Tensor:
    """(C, T) ids, IGNORE_INDEX after each sequence's end."""
    out = torch.full((len(sequences), max(len(s) for s in sequences)), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out.to(device)


@torch.no_grad()
def score_pairs(model, pairs: list[tuple[list[int], list[int]]], greedy: bool = False) -> list[Score]:
    """The plain path: (context ids, continuation ids) pairs as the rows of one right-padded batch."""
    rows = [(ctx + cont)[:-1] for ctx, cont in pairs]  # what the model reads
    inputs = pad_right(rows, model.device)  # (C, T)
    targets = torch.full_like(inputs, IGNORE_INDEX)  # position t predicts token t + 1 of the row
    for i, (ctx, cont) in enumerate(pairs):
        targets[i, len(ctx) - 1:len(rows[i])] = torch.tensor(cont, device=model.device)
    hidden = model.hidden_states(inputs.clamp(min=0))  # (C, T, D); padding id 0, never attended to
    return scores(model, hidden, targets, greedy)


@torch.no_grad()
def score_continuations(model, context: list[int], continuations: list[list[int]], batch_size: int = 8,
                        greedy: bool = False) -> list[Score]:
    """The shared path: the continuations of one context; the context runs once, then the
    continuations `batch_size` at a time against its cache."""
    device = model.device
    cache = KVCache(model.config, 1, len(context), dtype=model.dtype, device=device)
    last = model.hidden_states(torch.tensor([context], device=device), cache=cache)[:, -1:]  # (1, 1, D)
    out: list[Score] = []
    for start in range(0, len(continuations), batch_size):
        targets = pad_right(continuations[start:start + batch_size], device)  # (C, T)
        C, T = targets.shape
        hidden = last.expand(C, 1, -1)  # (C, 1, D): the context's last state predicts each first token
        if T > 1:
            # Each row feeds its continuation but the last token; right padding, never attended to.
            inputs = targets[:, :-1].clamp(min=0)  # (C, T-1)
            rows_cache = expand_cache(model, cache, C, T - 1)
            hidden = torch.cat([hidden, model.hidden_states(inputs, cache=rows_cache)], dim=1)  # (C, T, D)
        out += scores(model, hidden, targets, greedy)
    return out


def group_by_context(requests) -> tuple[dict[tuple, list[int]], list[int]]:
    """{context: request indices} for contexts that two or more requests share, and the indices of
    the requests whose context is their own."""
    groups: dict[tuple, list[int]] = {}
    for i, (context, _) in enumerate(requests):
        groups.setdefault(tuple(context), []).append(i)
    shared = {c: idx for c, idx in groups.items() if len(idx) > 1}
    alone = sorted(idx[0] for idx in groups.values() if len(idx) == 1)
    return shared, alone


def score_requests(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 8,
                   greedy: bool = False, progress: bool = False) -> list[Score]:
    """A `Score` per (context ids, continuation ids) request, in order. Requests that share a
    context share its forward pass; the others run `batch_size` at a time, longest first (as the
    harness sorts them, so a batch holds similar lengths). `progress` shows a bar of requests."""
    out: list[Score | None] = [None] * len(requests)
    shared, alone = group_by_context(requests)
    bar = tqdm(total=len(requests), desc="scoring", unit="request", disable=not progress, dynamic_ncols=True)
    with eval_mode(model):
        for context, idx in shared.items():
            for i, s in zip(idx, score_continuations(model, list(context), [requests[i][1] for i in idx],
                                                     batch_size, greedy)):
                out[i] = s
            bar.update(len(idx))
        alone.sort(key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
        for start in range(0, len(alone), batch_size):
            idx = alone[start:start + batch_size]
            for i, s in zip(idx, score_pairs(model, [requests[i] for i in idx], greedy)):
                out[i] = s
            bar.update(len(idx))
    bar.close()
    return out
