"""Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290) and its variants.

`loss.py` holds the DPO loss family as pure functions of sequence log-probs, `beyond_dpo.py` ORPO,
SimPO and KTO; importing `anita.dpo` loads only those two (and torch), so
`from anita.dpo import dpo_loss, orpo_loss` is cheap. `gradients.py` (lazy) holds every loss's
closed-form gradient. The DPO loop builds on
the training stack (`anita.train`) and is loaded on first use of its names: preference data
(`data.py`), sequence log-probs of a [chosen; rejected] batch (`logps.py`), the reference model
(`reference.py`), the step and its metrics (`trainer.py`), `DPOConfig` (`config.py`), `run_dpo`
(`run.py`), `anita dpo` (`cli.py`). docs/dpo.md derives DPO.
"""

import importlib

from anita.dpo.beyond_dpo import (
    ALL_LOSS_TYPES,
    check_preference_args,
    kto_kl,
    kto_loss,
    orpo_log_odds_ratio,
    orpo_loss,
    simpo_loss,
)
from anita.dpo.loss import LOSS_TYPES, LOSSES, PreferenceBatch, check_loss_args, dpo_loss, implicit_rewards, rpo_nll

# name -> module, imported when the name is first used (PEP 562), so the loss never pulls in the loop.
LAZY_EXPORTS = {
    "GRADIENTS": "anita.dpo.gradients",
    "Gradients": "anita.dpo.gradients",
    "dpo_loss_gradients": "anita.dpo.gradients",
    "kto_gradients": "anita.dpo.gradients",
    "orpo_gradients": "anita.dpo.gradients",
    "simpo_gradients": "anita.dpo.gradients",
    "DPOConfig": "anita.dpo.config",
    "run_dpo": "anita.dpo.run",
    "PreferenceBatches": "anita.dpo.data",
    "PreferenceData": "anita.dpo.data",
    "read_preferences": "anita.dpo.data",
    "concatenated_logps": "anita.dpo.logps",
    "AdaptersOff": "anita.dpo.reference",
    "FrozenAdapter": "anita.dpo.reference",
    "Precomputed": "anita.dpo.reference",
    "ReferenceFree": "anita.dpo.reference",
    "precompute_reference": "anita.dpo.reference",
    "DPOObjective": "anita.dpo.trainer",
    "DPOSettings": "anita.dpo.config",
    "dpo_step": "anita.dpo.trainer",
}

__all__ = ["LOSS_TYPES", "LOSSES", "PreferenceBatch", "check_loss_args", "dpo_loss", "implicit_rewards", "rpo_nll",
           "ALL_LOSS_TYPES", "check_preference_args", "kto_kl", "kto_loss", "orpo_log_odds_ratio", "orpo_loss",
           "simpo_loss", *LAZY_EXPORTS]


def __getattr__(name: str):
    if name in LAZY_EXPORTS:
        return getattr(importlib.import_module(LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'anita.dpo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(LAZY_EXPORTS))
