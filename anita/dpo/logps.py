"""Sequence log-probs of a concatenated [chosen; rejected] batch in one forward: what the DPO step
and every reference model (`anita.dpo.reference`) score.

Mitchell's reference implementation (github.com/eric-mitchell/direct-preference-optimization,
`trainers.py`: `concatenated_forward`, `_get_batch_logps`) has the same shape: one forward of the
2B rows, per-token log-probs of the answer tokens (`anita.model.logprobs`), summed per row.

Shapes: B batch (pairs), T time, D model dim, V vocab.
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


def concatenated_logps(model, batch: dict, chunk_size: int = DEFAULT_CHUNK_SIZE) -> PairLogps:
    """Summed answer log-probs of both halves of `batch` (see `anita.dpo.data.collate_pairs`) in one forward.

    The batch is right-padded, so causal attention never lets a real token see the pads after it:
    no attention mask is needed, and the labels (-100 on prompt and padding) pick the answer tokens.
    """
    input_ids = batch["input_ids"]  # [2B, T]
    labels = next_token_labels(input_ids, batch["completion_mask"])  # [2B, T], label t = token t+1
    hidden = model.hidden_states(input_ids)  # [2B, T, D]
    with torch.autocast(hidden.device.type, enabled=False):  # the head and log-softmax in fp32
        logps, mean_logits = token_logps(hidden, output_head_weight(model), labels, chunk_size=chunk_size,
                                         return_mean_logits=True)  # [2B, T] each
    scored = labels != IGNORE_INDEX  # [2B, T]
    sums, _ = sequence_logps(logps, scored)  # [2B]
    lengths = scored.sum(dim=-1)  # [2B]
    B = input_ids.shape[0] // 2
    logit_sums = mean_logits.sum(dim=-1)  # [2B] (0 where not scored)
    return PairLogps(
        chosen=sums[:B], rejected=sums[B:], chosen_lengths=lengths[:B], rejected_lengths=lengths[B:],
        chosen_token_logps=logps[:B], chosen_scored=scored[:B],
        chosen_mean_logit=(logit_sums[:B].sum() / lengths[:B].sum().clamp(min=1)).item(),
        rejected_mean_logit=(logit_sums[B:].sum() / lengths[B:].sum().clamp(min=1)).item(),
    )
