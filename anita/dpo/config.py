"""`DPOConfig`: the training loop's `TrainConfig` plus the DPO knobs, with the recipe's DPO defaults.

Every field is a flag of `anita dpo` and a key of its `--config` file (TOML or YAML); the defaults
of the shared fields are the DPO column of shared/RECIPE.md (the authors' TRL DPOTrainer script).
"""

from __future__ import annotations

from dataclasses import dataclass

from anita.dpo.loss import DISCOPOP_TAU, LOSS_TYPES, check_loss_args
from anita.errors import AnitaError
from anita.train.config import TrainConfig, flag

REFERENCES = ("auto", "adapters-off", "adapter", "precomputed", "none")


@dataclass
class DPOConfig(TrainConfig):
    # ---------------------------------------------- the loop's fields, with the recipe's DPO defaults
    data: str | None = flag(None, "preference JSONL: {'prompt', 'chosen', 'rejected'}, strings or message lists "
                                "(required)")
    eval_data: str | None = flag(None, "held-out preference JSONL; its loss and reward accuracy/margins are logged")
    lora_r: int = flag(64, "LoRA rank r of a fresh adapter (with --adapter, the adapter's own is used)")
    lora_alpha: float = flag(16.0, "LoRA alpha of a fresh adapter (scale alpha/sqrt(r) with --rslora)")
    rslora: bool = flag(True, "rank-stabilised LoRA scale alpha/sqrt(r) for a fresh adapter")
    optimizer: str = flag("adamw_8bit", "adamw (torch), adamw_8bit or paged_adamw_8bit (bitsandbytes)",
                        choices=["adamw", "adamw_8bit", "paged_adamw_8bit"])
    lr: float = flag(5e-5, "peak learning rate")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    warmup_ratio: float | None = flag(0.1, "warm-up as a fraction of all steps (rounded up), as in HF")
    batch_size: int = flag(8, "preference pairs per micro-batch (per process)")
    grad_accum: int = flag(12, "micro-batches accumulated per optimizer step (per process)")
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
    max_prompt_length: int | None = flag(512, "prompt tokens kept (from its start) when prompt + answer is too long")

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
