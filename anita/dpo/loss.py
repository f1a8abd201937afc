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

from anita.errors import AnitaError

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    bco_delta: torch.Tensor  # 0-dim, detached

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


def sigmoid_loss(b: PreferenceBatch) -> torch.Tensor:
    """DPO: −log σ(β h). Rafailov et al. 2023, arXiv 2305.18290, Eq. 7.

    With label smoothing ε it is conservative DPO (cDPO, Mitchell 2023, "A note on DPO with noisy
    preferences"): −(1 − ε) log σ(β h) − ε log σ(−β h). TRL 1.16's "sigmoid" ignores ε.
    """
    return _smoothed_logistic(b.beta * b.margin, b.label_smoothing)


def hinge_loss(b: PreferenceBatch) -> torch.Tensor:
    """max(0, 1 − β h): the hinge loss on the normalised likelihood margin.

    SLiC-HF (Zhao et al. 2023, arXiv 2305.10425, the calibration loss with margin 1/β) as
    normalised by RSO (Liu et al. 2024, arXiv 2309.06657, the "hinge-norm" loss).
    """
    return torch.relu(1.0 - b.beta * b.margin)


def ipo_loss(b: PreferenceBatch) -> torch.Tensor:
    """IPO: (h − 1/(2τ))², τ = β. Azar et al. 2023, arXiv 2310.12036, Eq. 17.

    Given lengths, each log-ratio is first divided by its answer's token count (TRL's form, which
    the IPO authors confirmed matches their experiments); without lengths it is the paper's form.
    """
    h = b.margin
    if b.chosen_lengths is not None:
        h = b.chosen_logratio / b.chosen_lengths - b.rejected_logratio / b.rejected_lengths
    return (h - 1.0 / (2.0 * b.beta)) ** 2


def exo_pair_loss(b: PreferenceBatch) -> torch.Tensor:
    """EXO-pref: KL(p_θ ‖ p_ε) over {y_w, y_l}. Ji et al. 2024, arXiv 2402.00856, Eq. 16 (K = 2).

    p_θ = softmax(β ρ_w, β ρ_l) = (σ(β h), σ(−β h)); p_ε = (1 − ε, ε) smooths the label, ε > 0.
    """
    z, eps = b.beta * b.margin, b.label_smoothing
    kl_w = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))  # p_θ(y_w) log(p_θ(y_w) / (1 − ε))
    kl_l = torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))  # p_θ(y_l) log(p_θ(y_l) / ε)
    return kl_w + kl_l


def nca_pair_loss(b: PreferenceBatch) -> torch.Tensor:
    """NCA: −log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l).

    Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards",
    arXiv 2402.05369, the NCA loss for pairwise preferences: unlike DPO it pushes up the chosen
    reward r_w in absolute terms, not only relative to r_l.
    """
    r_w, r_l = b.beta * b.chosen_logratio, b.beta * b.rejected_logratio
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


def robust_loss(b: PreferenceBatch) -> torch.Tensor:
    """rDPO: [(1 − ε) L(h) − ε L(−h)] / (1 − 2ε), L(h) = −log σ(β h), ε < ½ the label-flip rate.

    Chowdhury et al. 2024, "Provably Robust DPO", arXiv 2403.00409: an unbiased estimate of the
    clean DPO loss when each preference label is flipped with probability ε.
    """
    z, eps = b.beta * b.margin, b.label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def bco_pair_loss(b: PreferenceBatch) -> torch.Tensor:
    """BCO: −log σ(r_w − δ) − log σ(−(r_l − δ)). Jung et al. 2024, arXiv 2404.04656.

    A binary classifier with y_w as positive and y_l as negative. The paper's reward shift δ is a
    running mean of the rewards (`bco_running_mean`); a pure function cannot keep it, so it is the
    `bco_delta` argument. δ = 0 is TRL 1.16's "bco_pair" (it dropped the running mean).
    """
    r_w, r_l = b.beta * b.chosen_logratio, b.beta * b.rejected_logratio
    return -F.logsigmoid(r_w - b.bco_delta) - F.logsigmoid(-(r_l - b.bco_delta))


def sppo_hard_loss(b: PreferenceBatch) -> torch.Tensor:
    """SPPO with hard probabilities: (ρ_w − 1/(2β))² + (ρ_l + 1/(2β))².

    Wu et al. 2024, "Self-Play Preference Optimization", arXiv 2405.00675, Eq. 4.7 of Algorithm 1
    with the win probability P̂ set to 1 for y_w and 0 for y_l, and η = 1/β.
    """
    return (b.chosen_logratio - 0.5 / b.beta) ** 2 + (b.rejected_logratio + 0.5 / b.beta) ** 2


def aot_loss(b: PreferenceBatch) -> torch.Tensor:
    """AOT (paired): smoothed logistic loss on sorted(πθ margins) − sorted(π_ref margins).

    Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport",
    arXiv 2406.05882: first-order stochastic dominance of the policy's log-likelihood margins
    log πθ(y_w) − log πθ(y_l) over the reference's, in 1-D optimal transport (sorting the batch).
    losses[i] belongs to the i-th quantile, not to pair i.
    """
    policy, _ = torch.sort(b.policy_chosen - b.policy_rejected, dim=0)  # [B] ascending
    ref, _ = torch.sort(b.ref_chosen - b.ref_rejected, dim=0)  # [B] ascending
    return _smoothed_logistic(b.beta * (policy - ref), b.label_smoothing)


def aot_unpaired_loss(b: PreferenceBatch) -> torch.Tensor:
    """AOT (unpaired): smoothed logistic loss on sorted(ρ_w) − sorted(ρ_l). Melnyk et al. 2024, arXiv 2406.05882.

    Dominance of the chosen log-ratio distribution over the rejected one; the pairs need not match.
    losses[i] belongs to the i-th quantile, not to pair i.
    """
    chosen, _ = torch.sort(b.chosen_logratio, dim=0)  # [B] ascending
    rejected, _ = torch.sort(b.rejected_logratio, dim=0)  # [B] ascending
    return _smoothed_logistic(b.beta * (chosen - rejected), b.label_smoothing)


def apo_zero_loss(b: PreferenceBatch) -> torch.Tensor:
    """APO-zero: (1 − σ(r_w)) + σ(r_l). D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7.

    For answers better than the model's own: raise the chosen likelihood, lower the rejected one.
    """
    return (1.0 - torch.sigmoid(b.beta * b.chosen_logratio)) + torch.sigmoid(b.beta * b.rejected_logratio)


def apo_down_loss(b: PreferenceBatch) -> torch.Tensor:
    """APO-down: σ(r_w) + (1 − σ(β h)). D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 8.

    For answers worse than the model's own: lower both likelihoods, the rejected one more.
    """
    return torch.sigmoid(b.beta * b.chosen_logratio) + (1.0 - torch.sigmoid(b.beta * b.margin))


def discopop_loss(b: PreferenceBatch) -> torch.Tensor:
    """DiscoPOP (log-ratio modulated loss): (1 − m)·(−log σ(β h)) + m·exp(−β h), m = σ(β h / τ).

    Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for LLMs",
    arXiv 2406.08414, Eq. 5; τ = `discopop_tau` (0.05 in the paper and TRL).
    """
    z = b.beta * b.margin
    m = torch.sigmoid(z / b.discopop_tau)
    # m·exp(−z) as exp(log m − z): equal, but finite where m underflows to 0 and exp(−z) to inf
    return (1.0 - m) * -F.logsigmoid(z) + torch.exp(F.logsigmoid(z / b.discopop_tau) - z)


def sigmoid_norm_loss(b: PreferenceBatch) -> torch.Tensor:
    """Length-normalised DPO: −log σ(β (ρ_w/|y_w| − ρ_l/|y_l|)).

    SimPO's length normalisation (Meng et al. 2024, arXiv 2405.14734, Eq. 6, here with γ = 0 and
    the reference kept; reference-free mode gives SimPO with γ = 0), as in Tülu 3's
    length-normalised DPO (Lambert et al. 2024, arXiv 2411.15124). Needs the lengths.
    """
    h = b.chosen_logratio / b.chosen_lengths - b.rejected_logratio / b.rejected_lengths
    return -F.logsigmoid(b.beta * h)


LossFn = Callable[[PreferenceBatch], torch.Tensor]
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


def bco_running_mean(
    mean: float | torch.Tensor, steps: int, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """BCO's reward shift δ: the running mean over steps of each batch's mean reward. -> (δ, steps + 1)

    Jung et al. 2024 (arXiv 2404.04656) shift the rewards by the mean reward seen so far (the
    earlier TRL updated it with the current batch's mean of [r_w; r_l] before computing the loss).
    Start with mean = 0, steps = 0; call once per step, then pass δ as `dpo_loss(bco_delta=δ)`.
    """
    batch_mean = torch.cat([chosen_rewards, rejected_rewards]).detach().mean()
    new_mean = mean + (batch_mean - mean) / (steps + 1)
    return new_mean, steps + 1


def sft_loss(chosen_token_logps: torch.Tensor, chosen_mask: torch.Tensor) -> torch.Tensor:
    """The NLL term of RPO: −(mean log-prob over every chosen completion token in the batch). -> scalar

    chosen_token_logps [B, T], chosen_mask [B, T]. RPO (Pang et al. 2024, "Iterative Reasoning
    Preference Optimization", arXiv 2404.19733) adds α times a length-normalised NLL of y_w to the
    DPO loss; this is TRL 1.16's "sft" loss type, which averages over all chosen tokens of the batch.
    The trainer adds α · sft_loss(...) to the mean DPO loss.
    """
    if chosen_token_logps.shape != chosen_mask.shape or chosen_token_logps.dim() != 2:
        raise AnitaError(
            f"sft_loss: `chosen_token_logps` {tuple(chosen_token_logps.shape)} and `chosen_mask` "
            f"{tuple(chosen_mask.shape)} must both be [B, T]"
        )
    keep = chosen_mask.bool()
    logps = chosen_token_logps.to(torch.promote_types(chosen_token_logps.dtype, torch.float32))
    return -torch.where(keep, logps, torch.zeros_like(logps)).sum() / keep.sum().clamp(min=1)


def _as_compute(name: str, t: torch.Tensor, like: tuple, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Check that `t` is a [B] tensor (same shape as `like`) and cast it to the compute dtype."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or tuple(t.shape) != like:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise AnitaError(f"dpo_loss: `{name}` must be a 1-D [B] tensor of shape {like}, got {shape}")
    if dtype is not None and t.dtype not in _FLOAT_DTYPES:
        raise AnitaError(f"dpo_loss: `{name}` has dtype {t.dtype}; expected one of {_FLOAT_DTYPES}")
    return t.to(dtype) if dtype is not None else t


def _check_knobs(loss_type: str, beta: float, label_smoothing: float, bco_delta, discopop_tau: float) -> None:
    """Raise for unknown loss types, bad β/ε/τ, and knobs given to a loss that would ignore them."""
    if loss_type not in LOSSES:
        raise AnitaError(f"dpo_loss: unknown loss_type {loss_type!r}; expected one of {list(LOSS_TYPES)}")
    if not beta > 0:
        raise AnitaError(f"dpo_loss: beta must be > 0, got {beta}")
    if not discopop_tau > 0:
        raise AnitaError(f"dpo_loss: discopop_tau must be > 0, got {discopop_tau}")
    interval = _SMOOTHING_RANGE.get(loss_type)
    if interval is None and label_smoothing != 0.0:
        raise AnitaError(
            f"dpo_loss: loss_type {loss_type!r} does not use label_smoothing (got {label_smoothing}); "
            f"only {sorted(_SMOOTHING_RANGE)} do"
        )
    if interval is not None and not _SMOOTHING_OK[interval](label_smoothing):
        raise AnitaError(f"dpo_loss: label_smoothing for {loss_type!r} must lie in {interval}, got {label_smoothing}")
    if torch.as_tensor(bco_delta).numel() != 1:
        raise AnitaError(f"dpo_loss: bco_delta must be a scalar, got shape {tuple(torch.as_tensor(bco_delta).shape)}")
    if loss_type != "bco_pair" and float(bco_delta) != 0.0:
        raise AnitaError(f"dpo_loss: bco_delta is only used by loss_type 'bco_pair', not {loss_type!r}")


def _lengths(chosen_lengths, rejected_lengths, shape: tuple, dtype: torch.dtype, loss_type: str):
    """Both lengths as [B] compute-dtype tensors clamped to ≥ 1 (as TRL does), or both None."""
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise AnitaError("dpo_loss: give both `chosen_lengths` and `rejected_lengths`, or neither")
    if chosen_lengths is None:
        if loss_type == "sigmoid_norm":
            raise AnitaError("dpo_loss: loss_type 'sigmoid_norm' needs `chosen_lengths` and `rejected_lengths`")
        return None, None
    c = _as_compute("chosen_lengths", chosen_lengths, shape).to(dtype).clamp(min=1.0)
    r = _as_compute("rejected_lengths", rejected_lengths, shape).to(dtype).clamp(min=1.0)
    return c, r


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
    discopop_tau: float = 0.05,
    bco_delta: float | torch.Tensor = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example preference loss and implicit rewards. -> (losses [B], chosen_rewards [B], rejected_rewards [B])

    The four log-probs are summed over each answer's completion tokens, [B] each. The reference
    ones are constants (detached); both None = reference-free (log π_ref = 0). `loss_type` is one
    of LOSS_TYPES; `label_smoothing` is read by sigmoid (cDPO), robust, exo_pair, aot and
    aot_unpaired only. `chosen_lengths` / `rejected_lengths` (completion token counts, [B]) are
    needed by sigmoid_norm and switch ipo to its per-token form. Losses are not reduced (aot's are
    per quantile); rewards are β (policy − ref), detached. The math is fp32 (fp64 for fp64 inputs).
    """
    _check_knobs(loss_type, beta, label_smoothing, bco_delta, discopop_tau)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise AnitaError("dpo_loss: give both reference log-probs, or neither (reference-free mode)")
    if not isinstance(policy_chosen_logps, torch.Tensor) or policy_chosen_logps.dim() != 1:
        got = getattr(policy_chosen_logps, "shape", type(policy_chosen_logps).__name__)
        raise AnitaError(f"dpo_loss: `policy_chosen_logps` must be a 1-D [B] tensor, got {got}")
    shape = tuple(policy_chosen_logps.shape)
    inputs = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    fp64 = any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in inputs)
    dtype = torch.float64 if fp64 else torch.float32
    policy_chosen = _as_compute("policy_chosen_logps", policy_chosen_logps, shape, dtype)
    policy_rejected = _as_compute("policy_rejected_logps", policy_rejected_logps, shape, dtype)
    if ref_chosen_logps is None:
        ref_chosen, ref_rejected = torch.zeros_like(policy_chosen), torch.zeros_like(policy_rejected)
    else:
        ref_chosen = _as_compute("ref_chosen_logps", ref_chosen_logps, shape, dtype)
        ref_rejected = _as_compute("ref_rejected_logps", ref_rejected_logps, shape, dtype)
    lengths = _lengths(chosen_lengths, rejected_lengths, shape, dtype, loss_type)
    batch = PreferenceBatch(
        policy_chosen, policy_rejected, ref_chosen.detach(), ref_rejected.detach(), *lengths,
        beta=beta, label_smoothing=label_smoothing, discopop_tau=discopop_tau,
        bco_delta=torch.as_tensor(bco_delta, dtype=dtype, device=policy_chosen.device).detach().reshape(()),
    )
    losses = LOSSES[loss_type](batch)
    chosen_rewards = implicit_rewards(policy_chosen, batch.ref_chosen, beta)
    rejected_rewards = implicit_rewards(policy_rejected, batch.ref_rejected, beta)
    return losses, chosen_rewards, rejected_rewards
