"""Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290) and its variants.

`loss.py` holds the loss family as pure functions of sequence log-probs; the per-token log-probs
they are summed from come from `anita.train.logprobs` (shared with SFT). docs/dpo.md derives DPO.
"""

from anita.dpo.loss import (
    LOSS_TYPES,
    LOSSES,
    PreferenceBatch,
    bco_running_mean,
    dpo_loss,
    implicit_rewards,
    sft_loss,
)

__all__ = [
    "LOSS_TYPES",
    "LOSSES",
    "PreferenceBatch",
    "bco_running_mean",
    "dpo_loss",
    "implicit_rewards",
    "sft_loss",
]
