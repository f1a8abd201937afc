"""The DPO loss family as pure functions of four sequence log-prob tensors.

`dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, ...)`
returns per-example `(losses, chosen_rewards, rejected_rewards)`, the shape of Mitchell's reference
DPO implementation (github.com/eric-mitchell/direct-preference-optimization, `trainers.py`). Each
loss type is one short function below, registered in `LOSSES`; the definitions follow TRL 1.16's
`DPOTrainer` (the tests check agreement with it) and each docstring cites the paper and equation.

Notation (docs/dpo.md derives it): for a prompt x, chosen answer y_w and rejected answer y_l,
  log-ratios   ρ_w = log πθ(y_w|x) − log π_ref(y_w|x),   ρ_l = log πθ(y_l|x) − log π_ref(y_l|x)
  margin       h = ρ_w − ρ_l
  rewards      r_w = β ρ_w, r_l = β ρ_l   (DPO's implicit reward, Rafailov et al. 2023 Eq. 5)
Reference-free mode (ref log-probs None) sets log π_ref = 0, so ρ is the policy log-prob itself.

Shapes: B batch (preference pairs), T time (tokens). Every per-example tensor here is [B].
dtypes: inputs may be fp16, bf16, fp32 (the math is fp32) or fp64 (the math is fp64).
"""

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from anita.dtypes import math_dtype
from anita.errors import AnitaError, check_number


@dataclass(frozen=True)
class PreferenceBatch:
    """What every loss reads: the four sequence log-probs [B] in the compute dtype, and the knobs."""

    policy_chosen: torch.Tensor  # [B] log πθ(y_w|x)
    policy_rejected: torch.Tensor  # [B] log πθ(y_l|x)
    ref_chosen: torch.Tensor  # [B] log π_ref(y_w|x), zeros in reference-free mode
    ref_rejected: torch.Tensor  # [B] log π_ref(y_l|x)
    chosen_lengths: torch.Tensor | None  # [B] completion tokens of y_w, at least 1
    rejected_lengths: torch.Tensor | None  # [B] completion tokens of y_l, at least 1
    beta: float
    label_smoothing: float
    discopop_tau: float

    @property
    def chosen_logratio(self) -> torch.Tensor:
        return self.policy_chosen - self.ref_chosen  # ρ_w [B]

    @property
    def rejected_logratio(self) -> torch.Tensor:
        return self.policy_rejected - self.ref_rejected  # ρ_l [B]

    @property
    def margin(self) -> torch.Tensor:
        return self.chosen_logratio - self.rejected_logratio  # h [B]


def _smoothed_logistic(z: torch.Tensor, eps: float) -> torch.Tensor:
    """−(1 − ε) log σ(z) − ε log σ(−z): the logistic loss with the label flipped with probability ε."""
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def sigmoid_loss(b: PreferenceBatch, logits: torch.Tensor) -> torch.Tensor:
    """DPO: −log σ(β h). Rafailov et al. 2023, arXiv 2305.18290, Eq. 7.

    With label smoothing ε it is conservative DPO (cDPO, Mitchell 2023, "A note on DPO with noisy
    preferences"): −(1 − ε) log σ(β h) − ε log σ(−β h). TRL 1.16's "sigmoid" ignores ε.
    """
    return _smoothed_logistic(logits, b.label_smoothing)


def hinge_loss(b: PreferenceBatch, logits: torch.Tensor) -> torch.Tensor:
    """max(0, 1 − β h): the hinge loss on the normalised likelihood margin.

    SLiC-HF (Zhao et al. 2023, arXiv 2305.10425, the calibration loss with margin 1/β) as
    normalised by RSO (Liu et al. 2024, arXiv 2309.06657, the "hinge-norm" loss).
    """
    return torch.relu(1.0 - logits)


def ipo_loss(b: PreferenceBatch, logits: torch.Tensor) -> torch.Tensor:
    """IPO: (h − 1/(2τ))², τ = β. Azar et al. 2023, arXiv 2310.12036, Eq. 17.

    Given lengths, each log-ratio is first divided by its answer's token count (TRL's form, which
    the IPO authors confirmed matches their experiments); without lengths it is the paper's form.
    """
    h = b.margin
    if b.chosen_lengths is not None:
        h = b.chosen_logratio / b.chosen_lengths - b.rejected_logratio / b.rejected_lengths
    return (h - 1.0 / (2.0 * b.beta)) ** 2


def exo_pair_loss(b: PreferenceBatch, logits: torch.Tensor) -> torch.Tensor:
    """EXO-pref: KL(p_θ ‖ p_ε) over {y_w, y_l}. Ji et al. 2024, arXiv 2402.00856, Eq. 16 (K = 2).

    p_θ = softmax(β ρ_w, β ρ_l) = (σ(β h), σ(−β h)); p_ε = (1 − ε, ε) smooths the label, ε > 0.
    """
    z, eps = logits, b.label_smoothing
    kl_w = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))  # p_θ(y_w) log(p_θ(y_w) / (1 − ε))
    kl_l = torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))  # p_θ(y_l) log(p_θ(y_l) / ε)
    return kl_w + kl_l


def nca_pair_loss(b: PreferenceBatch, logits: torch.Tensor) -> torch.Tensor:
    """NCA: −log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l).

    Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards",
    arXiv 2402.05369, the NCA loss for pairwise preferences: unlike DPO it pushes up the chosen
    reward r_w in absolute terms, not only relative to r_l.
    """
    r_w, r_l = b.beta * b.chosen_logratio, b.beta * b.rejected_logratio
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


def robust_loss(b: PreferenceBatch, logits: torch.Tensor) -> torch.Tensor:
    """rDPO: [(1 − ε) L(h) − ε L(−h)] / (1 − 2ε), L(h) = −log σ(β h), ε < ½ the label-flip rate.

    Chowdhury et al. 2024, "Provably Robust DPO", arXiv 2403.00409: an unbiased estimate of the
    clean DPO loss when each preference label is flipped with probability ε.
    """
    z, eps = logits, b.label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def bco_pair_loss(b: PreferenceBatch, logits: torch.Tensor) -> torch.Tensor:
    """BCO: −log σ(r_w) − log σ(−r_l). Jung et al. 2024, arXiv 2404.04656.

    A binary classifier with y_w as positive and y_l as negative. The paper also shifts both rewards
    by a running mean of past rewards; TRL 1.16's "bco_pair" drops that shift, and so does anita (a
    pure function of one batch cannot keep a running mean).
    """
    r_w, r_l = b.beta * b.chosen_logratio, b.beta * b.rejected_logratio
    return -F.logsigmoid(r_w) - F.logsigmoid(-r_l)


def sppo_hard_loss(b: PreferenceBatch, logits: torch.Tensor) -> torch.Tensor:
    """SPPO with hard probabilities: (ρ_w − 1/(2β))² + (ρ_l + 1/(2β))².

    Wu et al. 2024, "Self-Play Preference Optimization", arXiv 2405.00675, Eq. 4.7 of Algorithm 1
    with the win probability P̂ set to 1 for y_w and 0 for y_l, and η = 1/β.
    """
    return (b.chosen_logratio - 0.5 / b.beta) ** 2 + (b.rejected_logratio + 0.5 / b.beta) ** 2


def aot_loss(b: PreferenceBatch, logits: torch.Tensor) -> torch.Tensor:
    """AOT (paired): smoothed logistic loss on sorted(πθ margins) − sorted(π_ref margins).

    Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport",
    arXiv 2406.05882: first-order stochastic dominance of the policy's log-likelihood margins
    log πθ(y_w) − log πθ(y_l) over the reference's, in 1-D optimal transport (sorting the batch).
    losses[i] belongs to the i-th quantile, not to pair i.
    """
    policy, _ = torch.sort(b.policy_chosen - b.policy_rejected, dim=0)  # [B] ascending
    ref, _ = torch.sort(b.ref_chosen - b.ref_rejected, dim=0)  # [B] ascending
    return _smoothed_logistic(b.beta * (policy - ref), b.label_smoothing)


def aot_unpaired_loss(b: PreferenceBatch, logits: torch.Tensor) -> torch.Tensor:
    """AOT (unpaired): smoothed logistic loss on sorted(ρ_w) − sorted(ρ_l). Melnyk et al. 2024, arXiv 2406.05882.

    Dominance of the chosen log-ratio distribution over the rejected one; the pairs need not match.
    losses[i] belongs to the i-th quantile, not to pair i.
    """
    chosen, _ = torch.sort(b.chosen_logratio, dim=0)  # [B] ascending
    rejected, _ = torch.sort(b.rejected_logratio, dim=0)  # [B] ascending
    return _smoothed_logistic(b.beta * (chosen - rejected), b.label_smoothing)


def apo_zero_loss(b: PreferenceBatch, logits: torch.Tensor) -> torch.Tensor:
    """APO-zero: (1 − σ(r_w)) + σ(r_l). D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7.

    For answers better than the model's own: raise the chosen likelihood, lower the rejected one.
    """
    return (1.0 - torch.sigmoid(b.beta * b.chosen_logratio)) + torch.sigmoid(b.beta * b.rejected_logratio)


def apo_down_loss(b: PreferenceBatch, logits: torch.Tensor) -> torch.Tensor:
    """APO-down: σ(r_w) + (1 − σ(β h)). D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 8.

    For answers worse than the model's own: lower both likelihoods, the rejected one more.
    """
    return torch.sigmoid(b.beta * b.chosen_logratio) + (1.0 - torch.sigmoid(logits))


def discopop_loss(b: PreferenceBatch, logits: torch.Tensor) -> torch.Tensor:
    """DiscoPOP (log-ratio modulated loss): (1 − m)·(−log σ(β h)) + m·exp(−β h), m = σ(β h / τ).

    Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for LLMs",
    arXiv 2406.08414, Eq. 5; τ = `discopop_tau` (0.05 in the paper and TRL).
    """
    z = logits
    m = torch.sigmoid(z / b.discopop_tau)
    # m·exp(−z) as exp(log m − z): equal, but finite where m underflows to 0 and exp(−z) to inf
    return (1.0 - m) * -F.logsigmoid(z) + torch.exp(F.logsigmoid(z / b.discopop_tau) - z)


def sigmoid_norm_loss(b: PreferenceBatch, logits: torch.Tensor) -> torch.Tensor:
    """Length-normalised DPO: −log σ(β (ρ_w/|y_w| − ρ_l/|y_l|)).

    SimPO's length normalisation (Meng et al. 2024, arXiv 2405.14734, Eq. 6, here with γ = 0 and
    the reference kept; reference-free mode gives SimPO with γ = 0), as in Tülu 3's
    length-normalised DPO (Lambert et al. 2024, arXiv 2411.15124). Needs the lengths.
    """
    h = b.chosen_logratio / b.chosen_lengths - b.rejected_logratio / b.rejected_lengths
    return -F.logsigmoid(b.beta * h)


# A loss reads the batch and its logits β h [B] (`dpo_loss` computes them); it returns the losses [B].
LossFn = Callable[[PreferenceBatch, torch.Tensor], torch.Tensor]
LOSSES: dict[str, LossFn] = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "robust": robust_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "aot": aot_loss,
    "aot_unpaired": aot_unpaired_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "sigmoid_norm": sigmoid_norm_loss,
}
LOSS_TYPES = tuple(LOSSES)
# The loss types that read label_smoothing, and the range each accepts for it.
_SMOOTHING_RANGE = {
    "sigmoid": "[0, 1]",
    "aot": "[0, 1]",
    "aot_unpaired": "[0, 1]",
    "robust": "[0, 0.5)",
    "exo_pair": "(0, 1)",
}
_SMOOTHING_OK = {
    "[0, 1]": lambda e: 0.0 <= e <= 1.0,
    "[0, 0.5)": lambda e: 0.0 <= e < 0.5,
    "(0, 1)": lambda e: 0.0 < e < 1.0,
}


def implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward β (log πθ(y|x) − log π_ref(y|x)), detached. [B] -> [B]"""
    return (beta * (policy_logps - ref_logps)).detach()


def rpo_nll(chosen_token_logps: torch.Tensor, chosen_mask: torch.Tensor) -> torch.Tensor:
    """The NLL term of RPO: −(mean log-prob over every chosen completion token in the batch). -> scalar

    chosen_token_logps [B, T], chosen_mask [B, T]. RPO (Pang et al. 2024, "Iterative Reasoning
    Preference Optimization", arXiv 2404.19733) adds α times a length-normalised NLL of y_w to the
    DPO loss; this is TRL 1.16's "sft" loss type, which averages over all chosen tokens of the batch.
    The trainer adds α · rpo_nll(...) to the mean DPO loss.
    """
    if chosen_token_logps.shape != chosen_mask.shape or chosen_token_logps.dim() != 2:
        raise AnitaError(
            f"rpo_nll: `chosen_token_logps` {tuple(chosen_token_logps.shape)} and `chosen_mask` "
            f"{tuple(chosen_mask.shape)} must both be [B, T]"
        )
    keep = chosen_mask.bool()
    logps = chosen_token_logps.to(math_dtype(chosen_token_logps, what="rpo_nll"))
    return -torch.where(keep, logps, torch.zeros_like(logps)).sum() / keep.sum().clamp(min=1)


# ------------------------------------------------------------------------------ checking
LOGP_NAMES = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
DISCOPOP_TAU = 0.05  # the paper's and TRL's τ


def check_loss_args(loss_type: str, beta: float, label_smoothing: float = 0.0, discopop_tau: float = DISCOPOP_TAU,
                    logps: tuple | None = None, lengths: tuple | None = None, where: str = "dpo_loss") -> None:
    """Raise `AnitaError` naming the first argument of `dpo_loss` that does not fit, after `where: `.

    The knobs are checked against the loss type (a knob given to a loss that would ignore it is an
    error). `logps`, when given, is the four log-prob arguments: [B] float tensors of one shape, the
    reference pair both None (reference-free) or both tensors. `lengths` is (chosen, rejected):
    both None or both [B] tensors; sigmoid_norm needs them. A run's settings are checked with the
    knobs alone, once, before any tensor exists (`anita.dpo.config.DPOSettings`, `where` naming
    their source); the knobs share their names with `anita dpo`'s flags and config keys.
    """
    if loss_type not in LOSSES:
        raise AnitaError(f"{where}: unknown loss type {loss_type!r}; expected one of {list(LOSS_TYPES)}")
    check_number(f"{where}: beta", beta, 0, low_open=True)  # beta = inf makes every loss NaN
    check_number(f"{where}: discopop_tau", discopop_tau, 0, low_open=True)
    if loss_type != "discopop" and discopop_tau != DISCOPOP_TAU:
        raise AnitaError(f"{where}: discopop_tau is only used by loss 'discopop', not {loss_type!r}")
    interval = _SMOOTHING_RANGE.get(loss_type)
    if interval is None and label_smoothing != 0.0:
        raise AnitaError(f"{where}: loss {loss_type!r} does not use label_smoothing (got {label_smoothing}); "
                         f"only {sorted(_SMOOTHING_RANGE)} do")
    if interval is not None and not _SMOOTHING_OK[interval](label_smoothing):
        raise AnitaError(f"{where}: label_smoothing for loss {loss_type!r} must lie in {interval}, "
                         f"got {label_smoothing}")
    shape = None
    if logps is not None:
        if (logps[2] is None) != (logps[3] is None):
            raise AnitaError(f"{where}: give both reference log-probs, or neither (reference-free mode)")
        shape = check_vector(LOGP_NAMES[0], logps[0], where=where)
        for name, t in zip(LOGP_NAMES[1:], logps[1:]):
            if t is not None:
                check_vector(name, t, shape, where=where)
    if lengths is not None:
        if (lengths[0] is None) != (lengths[1] is None):
            raise AnitaError(f"{where}: give both `chosen_lengths` and `rejected_lengths`, or neither")
        if lengths[0] is None and loss_type == "sigmoid_norm":
            raise AnitaError(f"{where}: loss 'sigmoid_norm' needs `chosen_lengths` and `rejected_lengths`")
        if lengths[0] is not None:
            shape = check_vector("chosen_lengths", lengths[0], shape, floating=False, where=where)
            check_vector("rejected_lengths", lengths[1], shape, floating=False, where=where)


def check_vector(name: str, t, shape: tuple | None = None, floating: bool = True, where: str = "dpo_loss") -> tuple:
    """`t` must be a 1-D [B] tensor (of `shape` when given), of a float dtype unless told otherwise."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or (shape is not None and tuple(t.shape) != shape):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise AnitaError(f"{where}: `{name}` must be a 1-D [B] tensor{f' of shape {shape}' if shape else ''}, got {got}")
    if floating:
        math_dtype(t, what=f"{where}: `{name}`")
    return tuple(t.shape)


# ------------------------------------------------------------------------------ the loss
def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    discopop_tau: float = DISCOPOP_TAU,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example preference loss and implicit rewards. -> (losses [B], chosen_rewards [B], rejected_rewards [B])

    The four log-probs are summed over each answer's completion tokens, [B] each. The reference
    ones are constants (detached); both None = reference-free (log π_ref = 0). `loss_type` is one
    of LOSS_TYPES; `label_smoothing` is read by sigmoid (cDPO), robust, exo_pair, aot and
    aot_unpaired only, `discopop_tau` by discopop only. `chosen_lengths` / `rejected_lengths`
    (completion token counts, [B]) are needed by sigmoid_norm and switch ipo to its per-token form.
    Losses are not reduced (aot's are per quantile); rewards are β (policy − ref), detached. The
    math is fp32 (fp64 for fp64 inputs). `check_loss_args` says what is accepted; `validate=False`
    skips that check (the trainer's step, whose settings were checked once, up front).
    """
    b = preference_batch(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                         beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, chosen_lengths=chosen_lengths,
                         rejected_lengths=rejected_lengths, discopop_tau=discopop_tau, validate=validate)
    pi_logratios = b.policy_chosen - b.policy_rejected  # log πθ(y_w|x) − log πθ(y_l|x)  [B]
    ref_logratios = b.ref_chosen - b.ref_rejected  # log π_ref(y_w|x) − log π_ref(y_l|x)  [B]
    logits = beta * (pi_logratios - ref_logratios)  # β h, what σ reads in Eq. 7  [B]
    losses = LOSSES[loss_type](b, logits)  # e.g. sigmoid −log σ(logits), hinge max(0, 1 − logits)  [B]
    chosen_rewards = implicit_rewards(b.policy_chosen, b.ref_chosen, beta)  # r_w = β ρ_w (Eq. 5)  [B]
    rejected_rewards = implicit_rewards(b.policy_rejected, b.ref_rejected, beta)  # r_l = β ρ_l  [B]
    return losses, chosen_rewards, rejected_rewards


def preference_batch(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                     beta: float, loss_type: str, label_smoothing: float = 0.0, chosen_lengths=None,
                     rejected_lengths=None, discopop_tau: float = DISCOPOP_TAU, validate: bool = True) -> PreferenceBatch:
    """`dpo_loss`'s arguments, checked (unless `validate=False`: the trainer's, checked once by its
    `DPOSettings`), in the compute dtype, references detached (zeros when None), lengths clamped at 1:
    what every loss (and `anita.dpo.gradients`) reads."""
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if validate:
        check_loss_args(loss_type, beta, label_smoothing, discopop_tau, logps, (chosen_lengths, rejected_lengths))
    dtype = math_dtype(*(t for t in logps if t is not None))
    policy_chosen, policy_rejected = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    if ref_chosen_logps is None:  # reference-free: log π_ref = 0
        ref_chosen, ref_rejected = torch.zeros_like(policy_chosen), torch.zeros_like(policy_rejected)
    else:
        ref_chosen, ref_rejected = ref_chosen_logps.detach().to(dtype), ref_rejected_logps.detach().to(dtype)
    if chosen_lengths is not None:  # token counts, at least 1 (as TRL)
        chosen_lengths, rejected_lengths = chosen_lengths.to(dtype).clamp(min=1), rejected_lengths.to(dtype).clamp(min=1)
    return PreferenceBatch(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths,
                           rejected_lengths, beta, label_smoothing, discopop_tau)
