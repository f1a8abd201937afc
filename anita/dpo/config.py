"""`DPOConfig`: the training loop's `TrainConfig` plus the DPO knobs.

Every field is a flag of `anita dpo` and a key of its `--config` file (TOML or YAML). The defaults
are a bare TRL DPOTrainer's (beta 0.1, sigmoid loss, max_length 1024, no prompt limit, no
accumulation or warm-up) with a LoRA learning rate; the authors' DPO values are the recipe
anita/recipes/anita_2_dpo.toml (docs/recipe.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from anita.dpo.loss import DISCOPOP_TAU, LOSS_TYPES, check_loss_args
from anita.errors import AnitaError
from anita.train.config import TrainConfig, flag

REFERENCES = ("auto", "adapters-off", "adapter", "precomputed", "none")


@dataclass
class DPOConfig(TrainConfig):
    # ------------------------------------------------------------ the loop's fields, for DPO
    data: str | None = flag(None, "preference JSONL: {'prompt', 'chosen', 'rejected'}, strings or message lists "
                                  "(required)")
    eval_data: str | None = flag(None, "held-out preference JSONL; its loss and reward accuracy/margins are logged")
    lr: float = flag(5e-5, "peak learning rate (a LoRA rate; TRL's 1e-6 default is for full fine-tuning)")
    batch_size: int = flag(8, "preference pairs per micro-batch (per process)")
    max_length: int = flag(1024, "longest prompt + answer in tokens (TRL's max_length)")
    # ---------------------------------------------------------------------------- DPO's own
    adapter: str | None = flag(None, "SFT adapter (PEFT format) to continue from; then it is also the reference")
    beta: float = flag(0.1, "DPO beta: how tightly the policy is tied to the reference")
    loss: str = flag("sigmoid", "preference loss type (TRL's names)", choices=list(LOSS_TYPES))
    label_smoothing: float = flag(0.0, "label smoothing for sigmoid (cDPO), robust, exo_pair, aot, aot_unpaired")
    discopop_tau: float = flag(DISCOPOP_TAU, "temperature tau of the discopop loss")
    reference: str = flag("auto", "the reference model: adapters-off (the base), adapter (the frozen --adapter), "
                                "precomputed (either, computed once and cached), none (reference-free); "
                                "auto = adapter with --adapter, else adapters-off", choices=list(REFERENCES))
    reference_cache: str | None = flag(None, "directory of precomputed reference log-probs "
                                           "(default: $ANITA_CACHE/dpo-reference)")
    rpo_alpha: float | None = flag(None, "weight of the chosen answers' NLL added to the loss (RPO); none by default")
    max_prompt_length: int | None = flag(None, "prompt tokens kept (from its start) when prompt + answer is too long; "
                                               "default none, as TRL 1.16: the prompt is kept whole and the "
                                               "answers cut to fit max_length")

    def validate(self, source: str = "config", given: set[str] = frozenset()) -> "DPOConfig":
        super().validate(source, given)
        if self.packing:
            raise AnitaError(f"{source}: 'packing' is not supported by DPO (each pair is one row)")
        try:
            check_loss_args(self.loss, self.beta, self.label_smoothing, self.discopop_tau)
        except AnitaError as e:  # the message names dpo_loss's arguments; here the field is `loss`
            raise AnitaError(f"{source}: {str(e).removeprefix('dpo_loss: ').replace('loss_type', 'loss')}") from None
        if "discopop_tau" in given and self.loss != "discopop":  # even at its default value
            raise AnitaError(f"{source}: discopop_tau is only used by loss 'discopop', not {self.loss!r}")
        if self.rpo_alpha is not None and not self.rpo_alpha >= 0:
            raise AnitaError(f"{source}: 'rpo_alpha' must be >= 0, got {self.rpo_alpha}")
        if self.reference == "adapters-off" and self.adapter:
            raise AnitaError(f"{source}: --reference adapters-off with --adapter would score the policy against "
                             "the bare base, not the SFT model it starts from; use --reference adapter")
        if self.reference == "adapter" and not self.adapter:
            raise AnitaError(f"{source}: --reference adapter needs --adapter (the SFT adapter to freeze)")
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
            raise AnitaError(f"{source}: 'max_prompt_length' must be in [1, max_length = {self.max_length}), "
                             f"got {self.max_prompt_length}")
        return self

    def reference_kind(self) -> str:
        """The reference actually used: 'auto' resolved."""
        if self.reference != "auto":
            return self.reference
        return "adapter" if self.adapter else "adapters-off"
