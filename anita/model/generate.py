"""Autoregressive generation with a KV cache: greedy, temperature, top-k and top-p sampling,
stop tokens, batches of prompts of different lengths (left padding) and streaming.

Sampling follows the usual order (as transformers' logits warpers): temperature, then top-k,
then top-p (nucleus sampling, Holtzman et al. 2020), then a draw from the softmax.

Shapes: B prompts, T prompt length (padded), V vocab.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterator

import torch

from anita.errors import AnitaError, check_number
from anita.model.llama import KVCache, Llama


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int = 1) -> None:
    """Refuse settings that would sample something other than asked: a NaN, infinite or negative
    temperature, top_k < 1, top_p outside (0, 1] (0 would be greedy in disguise), no new tokens.
    None for top_k / top_p means no cut."""
    check_number("generate: temperature", temperature, 0)
    if top_k is not None:
        check_number("generate: top_k", top_k, 1, integer=True)
    if top_p is not None:
        check_number("generate: top_p", top_p, 0, 1, low_open=True)
    check_number("generate: max_new_tokens", max_new_tokens, 1, integer=True)


def room_in_context(prompt_length: int, max_new_tokens: int, context: int) -> int:
    """How many new tokens fit after a prompt in a context of `context` positions (the model's
    max_position_embeddings): `max_new_tokens`, or fewer at the context's end. A prompt that fills
    the context is refused: positions beyond it were never trained and give garbage or nothing."""
    if prompt_length >= context:
        raise AnitaError(f"generate: the prompt is {prompt_length} tokens, but the model's context "
                         f"(max_position_embeddings) is {context}; shorten it to at most {context - 1} tokens")
    return min(max_new_tokens, context - prompt_length)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token from logits (B, V): argmax when temperature is 0, else a sample."""
    check_sampling(temperature, top_k, top_p)
    if temperature <= 0:
        return logits.argmax(-1)  # (B,)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches p
        drop[:, 0] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack prompts to (B, T) with padding on the left; returns ids and the 0/1 attention mask."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise AnitaError("generate: every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def stream_generate(model: Llama, prompts: list[list[int]], max_new_tokens: int = 128,
                    stop_ids=(), temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, pad_id: int = 0, seed: int | None = None
                    ) -> Iterator[list[int | None]]:
    """Yield, per step, one new token per prompt (None for prompts that have already stopped).

    A prompt stops after emitting one of `stop_ids` (that token is not yielded), after
    `max_new_tokens`, or at the end of the model's context (`room_in_context`; a prompt that fills
    it is refused). Positions of left-padded prompts start at 0 at their first real token.
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    generator = torch.Generator(model.device).manual_seed(seed) if seed is not None else None
    ids, mask = left_pad(prompts, pad_id, model.device)  # (B, T) each
    B, T = ids.shape
    max_new_tokens = room_in_context(T, max_new_tokens, model.config.max_position_embeddings)
    cache = KVCache(model.config, B, T + max_new_tokens, dtype=model.dtype, device=model.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    hidden = model.hidden_states(ids, attention_mask=mask, position_ids=positions, cache=cache)  # (B, T, D)
    logits = model.lm_head(hidden[:, -1])  # (B, V): only the last position's logits are needed
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=model.device)
    done = torch.zeros(B, dtype=torch.bool, device=model.device)
    next_pos = positions[:, -1:] + 1  # (B, 1)
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        done = done | torch.isin(token, stop)
        if done.all():
            return
        yield [None if d else t for t, d in zip(token.tolist(), done.tolist())]
        if step == max_new_tokens - 1:
            return  # the last token needs no forward pass of its own
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)  # (B, S)
        logits = model(token[:, None], attention_mask=mask, position_ids=next_pos, cache=cache)[:, -1]  # (B, V)
        next_pos = next_pos + 1


def generate(model: Llama, prompts, max_new_tokens: int = 128, stop_ids=(), temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, pad_id: int = 0, seed: int | None = None,
             on_token: Callable[[int, int], None] | None = None):
    """Generate continuations of one prompt (a list of ids) or a batch (a list of lists).

    Returns the new ids (without the stop token) per prompt, in the shape given: a list of ids
    for one prompt, a list of lists for a batch. `on_token(index, token)` streams as they come.
    """
    single = bool(prompts) and isinstance(prompts[0], int)
    batch = [list(prompts)] if single else [list(p) for p in prompts]
    out: list[list[int]] = [[] for _ in batch]
    for step in stream_generate(model, batch, max_new_tokens, stop_ids, temperature, top_k, top_p, pad_id, seed):
        for i, token in enumerate(step):
            if token is not None:
                out[i].append(token)
                if on_token is not None:
                    on_token(i, token)
    return out[0] if single else out


def stream_printer(tokenizer, out=None) -> Callable[[int, int], None]:
    """An `on_token` callback that prints text to `out` (default: stdout) as it is generated,
    whole characters only."""
    out = out or sys.stdout
    ids: list[int] = []
    shown = ""

    def on_token(_index: int, token: int) -> None:
        nonlocal shown
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[len(shown):])
            out.flush()
            shown = text

    return on_token
