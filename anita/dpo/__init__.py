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

# The DPO loop on the shared training loop: preference data (`data.py`), the reference model three
# ways (`reference.py`), the step and its metrics (`trainer.py`), `anita dpo` (`cli.py`).
from anita.dpo.data import PreferenceBatches, PreferenceData, read_preferences  # noqa: E402
from anita.dpo.reference import (AdaptersOff, FrozenAdapter, Precomputed, ReferenceFree,  # noqa: E402
                                 precompute_reference)
from anita.dpo.trainer import DPOObjective, DPOSettings, concatenated_logps, dpo_step  # noqa: E402

__all__ += ["PreferenceBatches", "PreferenceData", "read_preferences", "AdaptersOff", "FrozenAdapter", "Precomputed",
            "ReferenceFree", "precompute_reference", "DPOObjective", "DPOSettings", "concatenated_logps", "dpo_step"]
