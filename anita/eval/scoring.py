"""Log-likelihoods of continuations under a causal LM, the context computed once.

lm-evaluation-harness (EleutherAI, `lm_eval/models/huggingface.py`, `_loglikelihood_tokens`) scores
a (context, continuation) pair by running context + continuation[:-1] through the model and summing
log p(continuation_t | everything before it). All the choices of a multiple-choice question share
their context, so here the context runs once into a KV cache (gpt-fast style), and its choices then
run as one batch against copies of the cached keys and values: C choices of T tokens cost one pass
over the context plus C·T tokens, instead of C·(context + T). For an fp32 model the result is the
sum the harness computes (up to float rounding), without the padding of a mixed-length batch.

Log-probabilities come from `anita.model.logprobs.token_logps` (the one log-prob module, shared with
SFT and DPO): the output head and the log-softmax in fp32 (as every sensitive step), a chunk of positions at a
time, so the fp32 logits of a long continuation or window ([N, V]) never exist at once. For a bf16
or fp16 model this differs from the harness, whose logits and log-softmax stay in the model's
dtype: only the head is more exact here, the hidden states carry the model's own rounding either
way (the tests bound the bf16 scores against the fp32 model's). A LoRA adapter on `lm_head` is
scored through its merged weight W + scale·B·A (scoring needs no gradient).

Shapes: C continuations (rows of a batch), T continuation length, S cache length, D model dim,
V vocab, N scored tokens, n tokens in one chunk.
"""

from __future__ import annotations

from itertools import groupby

import torch

from anita.lora import LoraLinear
from anita.model.llama import KVCache
from anita.model.logprobs import IGNORE_INDEX, output_head_weight, token_logps
from anita.runtime import eval_mode


@torch.no_grad()
def continuation_logps(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[b, t] | hidden[b, t]): hidden (B, T, D), targets (B, T) with IGNORE_INDEX where
    not scored -> (B, T) fp32, 0 at ignored positions."""
    head = model.lm_head
    weight = head.merged_weight() if isinstance(head, LoraLinear) else output_head_weight(model)
    return token_logps(hidden, weight, targets)


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
def score_continuations(model, context: list[int], continuations: list[list[int]], batch_size: int = 8) -> list[float]:
    """Σ_t log p(cont_t | context, cont_<t) for each continuation of one context (lists of token ids).

    The context runs once; the continuations then run `batch_size` at a time against its cache.
    """
    device = model.device
    cache = KVCache(model.config, 1, len(context), dtype=model.dtype, device=device)
    last = model.hidden_states(torch.tensor([context], device=device), cache=cache)[:, -1:]  # (1, 1, D)
    sums: list[float] = []
    for start in range(0, len(continuations), batch_size):
        targets = pad_right(continuations[start:start + batch_size], device)  # (C, T)
        C, T = targets.shape
        hidden = last.expand(C, 1, -1)  # (C, 1, D): the context's last state predicts each first token
        if T > 1:
            # Each row feeds its continuation but the last token. Right padding (id 0) comes after
            # a row's real tokens, so causal attention keeps them from ever seeing it.
            inputs = targets[:, :-1].clamp(min=0)  # (C, T-1)
            rows_cache = expand_cache(model, cache, C, T - 1)
            hidden = torch.cat([hidden, model.hidden_states(inputs, cache=rows_cache)], dim=1)  # (C, T, D)
        sums += continuation_logps(model, hidden, targets).sum(-1).tolist()
    return sums


def score_requests(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 8) -> list[float]:
    """Log-likelihood of each (context ids, continuation ids) request; consecutive requests with the
    same context share its forward pass."""
    sums: list[float] = []
    with eval_mode(model):
        for context, group in groupby(requests, key=lambda r: tuple(r[0])):
            sums += score_continuations(model, list(context), [cont for _, cont in group], batch_size)
    return sums
