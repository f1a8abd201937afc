"""`DPOConfig`: the training loop's `TrainConfig` plus the DPO knobs (and those of ORPO, SimPO and KTO).

Every field is a flag of `anita dpo` and a key of its `--config` file (TOML or YAML). The defaults
are a bare TRL DPOTrainer's (beta 0.1, sigmoid loss, max_length 1024, no prompt limit, no
accumulation or warm-up) with a LoRA learning rate; the authors' DPO values are the recipe
anita/recipes/anita_2_dpo.toml (docs/recipe.md).
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass

from anita.dpo.beyond_dpo import ALL_LOSS_TYPES, REFERENCE_FREE, SIMPO_GAMMA, check_preference_args
from anita.dpo.loss import DISCOPOP_TAU
from anita.errors import AnitaError, check_number
from anita.model.logprobs import DEFAULT_CHUNK_SIZE
from anita.train.config import TrainConfig, flag

REFERENCES = ("auto", "adapters-off", "adapter", "precomputed", "none")


@dataclass(frozen=True)
class DPOSettings:
    """The knobs of the DPO objective, checked once, here (the rest of a run is `TrainConfig`).

    `DPOConfig.settings()` builds them from a run's config; the names are its fields' (and `anita dpo`'s
    flags and config keys), except `loss_type` (TRL's name), which is the field `loss`. `source` names
    where the values came from (a config file, "command line") at the start of each error message.
    """

    beta: float = 0.1  # β: strength of the KL tie to the reference (Rafailov et al. Eq. 3); the recipe's 0.1
    loss_type: str = "sigmoid"  # one of anita.dpo.beyond_dpo.ALL_LOSS_TYPES; DPO itself is "sigmoid"
    label_smoothing: float = 0.0  # ε for cDPO / robust / exo_pair / aot / simpo
    discopop_tau: float = DISCOPOP_TAU  # τ of discopop
    rpo_alpha: float | None = None  # weight of the chosen answers' NLL (RPO); None = none (ORPO: 1)
    chunk_size: int = DEFAULT_CHUNK_SIZE  # tokens per chunk of the output head
    simpo_gamma: float = SIMPO_GAMMA  # SimPO's target reward margin γ
    desirable_weight: float = 1.0  # KTO's λ_D
    undesirable_weight: float = 1.0  # KTO's λ_U
    source: InitVar[str] = "DPOSettings"

    def __post_init__(self, source: str):
        check_preference_args(self.loss_type, self.beta, label_smoothing=self.label_smoothing,
                              discopop_tau=self.discopop_tau, simpo_gamma=self.simpo_gamma,
                              desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight,
                              where=source)
        if self.rpo_alpha is not None:
            check_number(f"{source}: rpo_alpha", self.rpo_alpha, 0)
        if self.rpo_alpha is not None and self.loss_type == "kto":
            raise AnitaError(f"{source}: rpo_alpha (an NLL of the chosen answers) does not apply to loss 'kto'")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise AnitaError(f"{source}: chunk_size must be a positive integer, got {self.chunk_size!r}")

    @property
    def nll_weight(self) -> float | None:
        """The weight of the chosen answers' NLL: rpo_alpha, or ORPO's L_SFT weight 1 (Hong et al. Eq. 6)."""
        if self.rpo_alpha is None and self.loss_type == "orpo":
            return 1.0
        return self.rpo_alpha


@dataclass
class DPOConfig(TrainConfig):
    # ------------------------------------------------------------ the loop's fields, for DPO
    data: str | None = flag(None, "preference data (required): a .jsonl/.json/.jsonl.gz/.parquet/.csv/.arrow file, a "
                                "Hub-layout directory or a Hub dataset id org/name; {'prompt', 'chosen', "
                                "'rejected'} rows, strings or message lists, or chosen/rejected conversations "
                                "holding the prompt (UltraFeedback); for --loss kto also unpaired {'prompt', "
                                "'completion', 'label'} (docs/data.md)")
    eval_data: str | None = flag(None, "held-out preference data, any source --data takes; its loss and reward "
                                     "accuracy/margins are logged")
    lr: float = flag(5e-5, "peak learning rate (a LoRA rate; TRL's 1e-6 default is for full fine-tuning)")
    batch_size: int = flag(8, "preference pairs per micro-batch (per process)")
    max_length: int = flag(1024, "longest prompt + answer in tokens (TRL's max_length)")
    # ---------------------------------------------------------------------------- DPO's own
    adapter: str | None = flag(None, "SFT adapter (PEFT format) to continue from; then it is also the reference")
    beta: float = flag(0.1, "DPO beta: how tightly the policy is tied to the reference")
    loss: str = flag("sigmoid", "preference loss type (TRL's names): DPO's variants, or orpo, simpo (no "
                                "reference model) and kto (unpaired data)", choices=list(ALL_LOSS_TYPES))
    label_smoothing: float = flag(0.0, "label smoothing for sigmoid (cDPO), robust, exo_pair, aot, aot_unpaired, "
                                       "simpo")
    discopop_tau: float = flag(DISCOPOP_TAU, "temperature tau of the discopop loss")
    simpo_gamma: float = flag(SIMPO_GAMMA, "target reward margin gamma of the simpo loss")
    desirable_weight: float = flag(1.0, "kto: weight lambda_D of the desirable examples' losses")
    undesirable_weight: float = flag(1.0, "kto: weight lambda_U of the undesirable examples' losses")
    reference: str = flag("auto", "the reference model: adapters-off (the base), adapter (the frozen --adapter), "
                                "precomputed (either, computed once and cached), none (reference-free); "
                                "auto = adapter with --adapter, else adapters-off (none for orpo and simpo)",
                        choices=list(REFERENCES))
    reference_cache: str | None = flag(None, "directory of precomputed reference log-probs "
                                           "(default: $ANITA_CACHE/dpo-reference)")
    rpo_alpha: float | None = flag(None, "weight of the chosen answers' NLL added to the loss (RPO; for orpo its "
                                         "L_SFT term, 1 by default); none by default")
    shared_prompt: bool = flag(True, "lay each pair out as one row [prompt; chosen; rejected], so the prompt is "
                                     "computed once (same log-probs as two rows; docs/dpo.md); --no-shared-prompt: "
                                     "TRL's two rows [prompt; chosen], [prompt; rejected]. Not for kto")
    max_prompt_length: int | None = flag(None, "prompt tokens kept (from its start) when prompt + answer is too long; "
                                               "default none, as TRL 1.16: the prompt is kept whole and the "
                                               "answers cut to fit max_length")

    def validate(self, source: str = "config", given: set[str] = frozenset()) -> "DPOConfig":
        super().validate(source, given)
        if self.packing and not (self.shared_prompt and self.max_tokens):
            raise AnitaError(f"{source}: DPO 'packing' fills padding-free rows of the shared-prompt layout up to "
                             "'max_tokens': set --max-tokens and keep --shared-prompt")
        if self.text_field is not None:
            raise AnitaError(f"{source}: 'text_field' is for SFT and continued pre-training; preference rows need "
                             "prompt, chosen and rejected (map other names with columns)")
        self.settings(source)  # the objective's knobs: checked where they live, `DPOSettings`
        if "discopop_tau" in given and self.loss != "discopop":  # even at its default value
            raise AnitaError(f"{source}: discopop_tau is only used by loss 'discopop', not {self.loss!r}")
        self._validate_beyond_dpo(source, given)
        if self.reference == "adapters-off" and self.adapter:
            raise AnitaError(f"{source}: --reference adapters-off with --adapter would score the policy against "
                             "the bare base, not the SFT model it starts from; use --reference adapter")
        if self.reference == "adapter" and not self.adapter:
            raise AnitaError(f"{source}: --reference adapter needs --adapter (the SFT adapter to freeze)")
        if self.fsdp and self.reference_kind() in ("adapter", "precomputed"):
            raise AnitaError(f"{source}: fsdp works with reference adapters-off (or none, for ORPO and SimPO), not "
                             f"{self.reference_kind()} (it reads the whole adapter or base on one process); set "
                             "--reference adapters-off or drop --fsdp")
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
            raise AnitaError(f"{source}: 'max_prompt_length' must be in [1, max_length = {self.max_length}), "
                             f"got {self.max_prompt_length}")
        return self

    def _validate_beyond_dpo(self, source: str, given: set[str] = frozenset()) -> None:
        """ORPO and SimPO take no reference; KTO needs one computed live, mismatched pairs and no RPO term."""
        if self.loss in REFERENCE_FREE and self.reference not in ("auto", "none"):
            raise AnitaError(f"{source}: --loss {self.loss} uses no reference model; drop --reference {self.reference}")
        if self.loss != "kto":
            return
        if self.reference == "none":
            raise AnitaError(f"{source}: --loss kto needs a reference model (its rewards are log-ratios); "
                             "use --reference auto, adapters-off or adapter")
        if self.reference == "precomputed":
            raise AnitaError(f"{source}: --loss kto cannot use --reference precomputed: its mismatched pairs are "
                             "formed within each shuffled micro-batch (anita/dpo/unpaired.py)")
        unpaired = [n for n in ("packing", "max_tokens", "shared_prompt")
                    if n in given or (n != "shared_prompt" and getattr(self, n) not in (None, False))]
        if unpaired:
            raise AnitaError(f"{source}: {', '.join(unpaired)}: --loss kto batches unpaired rows two-row style "
                             "(matched and mismatched, anita/dpo/unpaired.py); drop them")
        if self.batch_size < 2:
            raise AnitaError(f"{source}: --loss kto needs batch_size >= 2 to form mismatched pairs (TRL's rule), "
                             f"got {self.batch_size}")

    def settings(self, source: str = "config") -> DPOSettings:
        """The objective's knobs (`DPOSettings`, checked as they are built; errors start with `source`)."""
        return DPOSettings(beta=self.beta, loss_type=self.loss, label_smoothing=self.label_smoothing,
                           discopop_tau=self.discopop_tau, rpo_alpha=self.rpo_alpha, chunk_size=self.chunk_size,
                           simpo_gamma=self.simpo_gamma, desirable_weight=self.desirable_weight,
                           undesirable_weight=self.undesirable_weight, source=source)

    def reference_kind(self) -> str:
        """The reference actually used: 'auto' resolved (none for the reference-free ORPO and SimPO)."""
        if self.reference != "auto":
            return self.reference
        if self.loss in REFERENCE_FREE:
            return "none"
        return "adapter" if self.adapter else "adapters-off"
