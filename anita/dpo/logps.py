"""Sequence log-probs of a preference batch in one forward: what the DPO step and every reference
model (`anita.dpo.reference`) score. `concatenated_logps` takes either layout of `anita.dpo.data`:

- two-row (`two_row_logps`, the plain one, read it first): Mitchell's reference implementation
  (github.com/eric-mitchell/direct-preference-optimization, `trainers.py`: `concatenated_forward`,
  `_get_batch_logps`) has the same shape: one forward of the 2B rows, per-token log-probs of the
  answer tokens (`anita.model.logprobs`), summed per row (`completion_logps`, which KTO also calls
  on its unpaired rows).
- shared-prompt (`shared_prompt_logps`): one forward of rows [prompt; chosen; rejected] (packed or
  not) with the attention of `anita.model.masks.segment_mask`'s mask, computed from the rows'
  `Spans` without building it (`anita.model.llama.attend_spans`), each prompt computed once (Wang
  et al. 2024, arXiv 2410.20305). A token's log-prob is read from the hidden state of the token that
  predicts it (`source`): the previous token of its answer, or the prompt's last token for an
  answer's first token, which both answers share. The same numbers as two_row_logps up to rounding.

Shapes: B batch (pairs), N rows, T time, D model dim, V vocab, M answer tokens of a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anita.model.logprobs import (
    DEFAULT_CHUNK_SIZE,
    IGNORE_INDEX,
    next_token_labels,
    output_head_weight,
    sequence_logps,
    token_logps,
)


@dataclass
class PairLogps:
    """What one forward of a concatenated batch gives, split into its chosen and rejected halves."""

    chosen: torch.Tensor  # [B] log π(y_w|x): summed over the answer tokens
    rejected: torch.Tensor  # [B] log π(y_l|x)
    chosen_lengths: torch.Tensor  # [B] answer tokens scored
    rejected_lengths: torch.Tensor  # [B]
    chosen_token_logps: torch.Tensor  # [B, T] per-token log-probs of the chosen rows (for RPO's NLL)
    chosen_scored: torch.Tensor  # [B, T] bool, where chosen_token_logps counts
    chosen_mean_logit: float  # TRL's logits/chosen
    rejected_mean_logit: float  # TRL's logits/rejected


@dataclass
class RowLogps:
    """Per-row answer log-probs of N right-padded rows."""

    sums: torch.Tensor  # [N] log π(y|x): summed over the answer tokens
    lengths: torch.Tensor  # [N] answer tokens scored
    token_logps: torch.Tensor  # [N, T] per-token log-probs (0 where not scored)
    scored: torch.Tensor  # [N, T] bool, where token_logps counts
    logit_sums: torch.Tensor  # [N] Σ over scored tokens of the token's mean (over V) logit, detached


def completion_logps(model, input_ids: torch.Tensor, completion_mask: torch.Tensor,
                     chunk_size: int = DEFAULT_CHUNK_SIZE) -> RowLogps:
    """Answer log-probs of each row of input_ids [N, T] (completion_mask [N, T]: 1 on answer tokens).

    The rows are right-padded, so causal attention never lets a real token see the pads after it:
    no attention mask is needed, and the labels (-100 on prompt and padding) pick the answer tokens.
    """
    labels = next_token_labels(input_ids, completion_mask)  # [N, T], label t = token t+1
    hidden = model.hidden_states(input_ids)  # [N, T, D]
    with torch.autocast(hidden.device.type, enabled=False):  # the head and log-softmax in fp32
        logps, mean_logits = token_logps(hidden, output_head_weight(model), labels, chunk_size=chunk_size,
                                         return_mean_logits=True,
                                         head_dtype=getattr(model, "head_dtype", None))  # [N, T] each
    scored = labels != IGNORE_INDEX  # [N, T]
    sums, _ = sequence_logps(logps, scored)  # [N]
    return RowLogps(sums, scored.sum(dim=-1), logps, scored, mean_logits.detach().sum(dim=-1))


def concatenated_logps(model, batch: dict, chunk_size: int = DEFAULT_CHUNK_SIZE) -> PairLogps:
    """Summed answer log-probs of a preference batch of either layout (`anita.dpo.data`) in one forward."""
    if "branch" in batch:
        return shared_prompt_logps(model, batch, chunk_size)
    return two_row_logps(model, batch, chunk_size)


def two_row_logps(model, batch: dict, chunk_size: int = DEFAULT_CHUNK_SIZE) -> PairLogps:
    """Summed answer log-probs of both halves of `batch` (see `anita.dpo.data.collate_pairs`) in one forward."""
    rows = completion_logps(model, batch["input_ids"], batch["completion_mask"], chunk_size)  # [2B] each
    B = batch["input_ids"].shape[0] // 2
    lengths, logit_sums = rows.lengths, rows.logit_sums
    return PairLogps(
        chosen=rows.sums[:B], rejected=rows.sums[B:], chosen_lengths=lengths[:B], rejected_lengths=lengths[B:],
        chosen_token_logps=rows.token_logps[:B], chosen_scored=rows.scored[:B],
        chosen_mean_logit=(logit_sums[:B].sum() / lengths[:B].sum().clamp(min=1)).item(),
        rejected_mean_logit=(logit_sums[B:].sum() / lengths[B:].sum().clamp(min=1)).item(),
    )


def shared_prompt_logps(model, batch: dict, chunk_size: int = DEFAULT_CHUNK_SIZE) -> PairLogps:
    """Summed answer log-probs of a shared-prompt batch (`anita.dpo.data.collate_shared`) in one forward."""
    ids, segment, branch, source = batch["input_ids"], batch["segment"], batch["branch"], batch["source"]  # [N, T]
    N, T = ids.shape
    B = batch["index"].shape[0]
    hidden = model.hidden_states(ids, attention_mask=batch["spans"],  # no [N, T, T] mask
                                 position_ids=batch["position_ids"])  # [N, T, D]
    scored = (source >= 0).reshape(-1).nonzero().squeeze(1)  # [M] flat index of each answer token
    predictor = scored.div(T, rounding_mode="floor") * T + source.reshape(-1)[scored]  # [M] flat index
    h = hidden.reshape(N * T, -1)[predictor]  # [M, D]
    with torch.autocast(hidden.device.type, enabled=False):  # the head and log-softmax in fp32
        logps, mean_logits = token_logps(h[None], output_head_weight(model), ids.reshape(-1)[scored][None],
                                         chunk_size=chunk_size, return_mean_logits=True,
                                         head_dtype=getattr(model, "head_dtype", None))  # [1, M] each
    logps, mean_logits = logps[0], mean_logits[0].detach()  # [M]
    slot = (branch.reshape(-1)[scored] - 1) * B + segment.reshape(-1)[scored]  # [M] chosen 0..B-1, rejected B..2B-1
    sums = logps.new_zeros(2 * B).index_add(0, slot, logps)  # [2B]
    lengths = torch.bincount(slot, minlength=2 * B)  # [2B]
    logit_sums = mean_logits.new_zeros(2 * B).index_add(0, slot, mean_logits)  # [2B]
    chosen_token_logps, chosen_scored = chosen_token_table(logps[slot < B], slot[slot < B], lengths[:B])
    return PairLogps(
        chosen=sums[:B], rejected=sums[B:], chosen_lengths=lengths[:B], rejected_lengths=lengths[B:],
        chosen_token_logps=chosen_token_logps, chosen_scored=chosen_scored,
        chosen_mean_logit=(logit_sums[:B].sum() / lengths[:B].sum().clamp(min=1)).item(),
        rejected_mean_logit=(logit_sums[B:].sum() / lengths[B:].sum().clamp(min=1)).item(),
    )


def chosen_token_table(logps: torch.Tensor, pair: torch.Tensor, lengths: torch.Tensor):
    """The chosen answers' token log-probs, in order per pair ([Mc] each, pair ids sorted), as a
    [B, L] table (L the longest answer) and its mask: the two-row form's shape, for RPO's NLL."""
    starts = lengths.cumsum(0) - lengths  # [B] where each pair's tokens begin in the flat order
    offset = torch.arange(len(pair), device=pair.device) - starts[pair]  # [Mc] place in its answer
    shape = (len(lengths), int(lengths.max()) if len(lengths) else 0)
    table = logps.new_zeros(shape).index_put((pair, offset), logps)  # [B, L]
    scored = torch.zeros(shape, dtype=torch.bool, device=logps.device).index_put((pair, offset),
                                                                                 torch.ones_like(pair, dtype=torch.bool))
    return table, scored
