"""Sequence log-probs of a concatenated [chosen; rejected] batch in one forward: what the DPO step
and every reference model (`anita.dpo.reference`) score.

Mitchell's reference implementation (github.com/eric-mitchell/direct-preference-optimization,
`trainers.py`: `concatenated_forward`, `_get_batch_logps`) has the same shape: one forward of the
2B rows, per-token log-probs of the answer tokens (`anita.model.logprobs`), summed per row
(`completion_logps`, which KTO also calls on its unpaired rows).

Shapes: B batch (pairs), N rows, T time, D model dim, V vocab.
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
