"""Preference optimization beyond DPO: ORPO, SimPO and KTO as pure functions of sequence log-probs.

Each returns per-example `(losses, chosen_rewards, rejected_rewards)`, like `dpo_loss`, and each
line cites its paper's equation. The definitions follow TRL 1.16, which the tests check to 1e-6:
  orpo_loss    `trl.experimental.orpo.ORPOTrainer.odds_ratio_loss` (negated: anita returns the loss
               to minimise, TRL the term it subtracts)
  simpo_loss   `trl.experimental.cpo.CPOTrainer.cpo_loss` with loss_type="simpo"
  kto_loss     the formula of `trl.KTOTrainer._compute_loss`

ORPO and SimPO are reference-free and read *length-normalised* log-probs: l = (1/|y|) log πθ(y|x),
the mean over the answer's tokens. KTO reads summed log-probs of unpaired examples and a reference.
`check_preference_args` validates every argument of these three (and, for a run's settings, of all
17 loss types, once: `anita.dpo.config.DPOSettings`); the bodies below are the math alone. docs/preference_losses.md derives each
gradient; `anita.dpo.gradients` holds them as code.

Shapes: B batch (pairs), Bc desirable and Br undesirable examples (KTO). Every tensor here is 1-D.
dtypes: as `dpo_loss`: fp16/bf16/fp32 inputs compute in fp32, fp64 in fp64.
"""

import math

import torch
import torch.nn.functional as F

from anita.dpo.loss import DISCOPOP_TAU, LOSS_TYPES, check_loss_args, check_vector
from anita.dtypes import math_dtype
from anita.errors import AnitaError, check_number

REFERENCE_FREE = ("orpo", "simpo")  # no π_ref, mean per-token log-probs
BEYOND_DPO = (*REFERENCE_FREE, "kto")
ALL_LOSS_TYPES = (*LOSS_TYPES, *BEYOND_DPO)  # what `anita dpo --loss` accepts
SIMPO_GAMMA = 0.5  # TRL's simpo_gamma default (the paper tunes γ per model, 0.5 to 1.6 in its Table 7)


# ------------------------------------------------------------------------------ checking
def check_preference_args(loss_type: str, beta: float, *, label_smoothing: float = 0.0,
                          discopop_tau: float = DISCOPOP_TAU, simpo_gamma: float = SIMPO_GAMMA,
                          desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                          logps: tuple | None = None, kl=None, where: str | None = None) -> None:
    """Raise `AnitaError` naming the first argument that does not fit `loss_type` (any of ALL_LOSS_TYPES).

    As `check_loss_args` does for DPO's 14: a knob given to a loss that would ignore it is an error
    (gamma is SimPO's, the two weights KTO's, label_smoothing SimPO's or the DPO types' that read it).
    `logps`, when given, holds the loss's log-prob tensors: (chosen, rejected) [B] each for ORPO and
    SimPO; (policy_chosen [Bc], policy_rejected [Br], ref_chosen [Bc], ref_rejected [Br]) for KTO,
    whose `kl`, when given, must be a finite number or a one-element float tensor. Each message starts
    with `where` (default: the loss function's name; a run's settings pass their source).
    """
    where = where or (f"{loss_type}_loss" if loss_type in BEYOND_DPO else "dpo_loss")
    if loss_type not in ALL_LOSS_TYPES:
        raise AnitaError(f"{where}: unknown loss type {loss_type!r}; expected one of {list(ALL_LOSS_TYPES)}")
    if loss_type != "simpo" and simpo_gamma != SIMPO_GAMMA:
        raise AnitaError(f"{where}: simpo_gamma is only used by loss 'simpo', not {loss_type!r}")
    if loss_type != "kto" and (desirable_weight, undesirable_weight) != (1.0, 1.0):
        raise AnitaError(f"{where}: desirable_weight and undesirable_weight are only used by loss 'kto', "
                         f"not {loss_type!r}")
    if loss_type in LOSS_TYPES:
        check_loss_args(loss_type, beta, label_smoothing, discopop_tau, where=where)
        return
    check_number(f"{where}: beta", beta, 0, low_open=True)
    if discopop_tau != DISCOPOP_TAU:
        raise AnitaError(f"{where}: discopop_tau is only used by loss 'discopop', not {loss_type!r}")
    if loss_type != "simpo" and label_smoothing != 0.0:
        raise AnitaError(f"{where}: loss {loss_type!r} does not use label_smoothing (got {label_smoothing})")
    if not 0.0 <= label_smoothing <= 1.0:
        raise AnitaError(f"{where}: label_smoothing must lie in [0, 1], got {label_smoothing}")
    if not (math.isfinite(simpo_gamma) and simpo_gamma >= 0):
        raise AnitaError(f"{where}: simpo_gamma (the target reward margin γ) must be >= 0, got {simpo_gamma}")
    if not (0 < desirable_weight < math.inf and 0 < undesirable_weight < math.inf):
        raise AnitaError(f"{where}: desirable_weight and undesirable_weight must be finite numbers > 0, "
                         f"got {desirable_weight} and {undesirable_weight}")
    if logps is not None:
        _check_logps(where, loss_type, logps)
    if (kl is not None or (loss_type == "kto" and logps is not None)) and not _is_scalar(kl):
        raise AnitaError(f"{where}: `kl` must be a finite number or a one-element float tensor, got {kl!r:.60}")


def _is_scalar(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.numel() == 1 and x.is_floating_point() and bool(torch.isfinite(x).all())
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_logps(where: str, loss_type: str, logps: tuple) -> None:
    """ORPO/SimPO: two [B] tensors of one shape. KTO: chosen pair [Bc], rejected pair [Br], not both empty."""
    if loss_type in REFERENCE_FREE:
        shape = check_vector("policy_chosen_logps", logps[0], where=where)
        check_vector("policy_rejected_logps", logps[1], shape, where=where)
        return
    chosen = check_vector("policy_chosen_logps", logps[0], where=where)
    rejected = check_vector("policy_rejected_logps", logps[1], where=where)
    check_vector("ref_chosen_logps", logps[2], chosen, where=where)
    check_vector("ref_rejected_logps", logps[3], rejected, where=where)
    if chosen[0] + rejected[0] == 0:
        raise AnitaError(f"{where}: no examples: both the desirable and the undesirable log-probs are empty")


def as_math(*tensors: torch.Tensor) -> list[torch.Tensor]:
    dtype = math_dtype(*tensors)
    return [t.to(dtype) for t in tensors]


# ------------------------------------------------------------------------------ ORPO
def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, stable on both sides of −ln 2 (Mächler 2012, "Accurately computing log(1 − exp(−|a|))").

    Each branch is fed only the values it is used for: torch.where differentiates both, and the
    unused one must not be −inf there (its NaN gradient would leak through the zero weight).
    """
    cut = x.new_tensor(-math.log(2.0))
    small = torch.log1p(-torch.exp(torch.minimum(x, cut)))  # x ≤ −ln 2
    large = torch.log(-torch.expm1(torch.maximum(x, cut)))  # −ln 2 ≤ x < 0
    return torch.where(x < cut, small, large)


def orpo_log_odds_ratio(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> torch.Tensor:
    """log OR = log odds(y_w) − log odds(y_l), odds(y) = P/(1 − P), P = exp(l). Hong et al. 2024, Eq. 4. [B] -> [B]

    In log space: log odds(y) = l − log(1 − eˡ), so log OR = (l_w − l_l) − (log1mexp(l_w) − log1mexp(l_l)).
    Inputs are mean per-token log-probs l < 0; TRL logs the batch mean of this as `log_odds_chosen`.
    """
    # A mean log-prob of (almost) 0 is an answer the model is certain of: infinite odds. Keep it a
    # hair below 0 so that the loss and its gradient stay finite (TRL's formula gives NaN there).
    chosen_logps, rejected_logps = chosen_logps.clamp(max=-1e-6), rejected_logps.clamp(max=-1e-6)
    return (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))


def orpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
              beta: float, validate: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term β·L_OR = −β log σ(log OR). Hong et al. 2024, arXiv 2403.07691, Eqs. 6-7.

    -> (losses [B], chosen_rewards [B], rejected_rewards [B]). The inputs are mean per-token log-probs
    l_w, l_l [B] (Eq. 1's length-normalised likelihood), no reference. β is the paper's λ, the weight
    of L_OR; the caller adds the chosen answers' NLL L_SFT (Eq. 6: L_ORPO = L_SFT + λ L_OR). Rewards
    are β·l, detached, as TRL logs them.
    Gradient, with z = log OR: ∂L/∂l_w = −β σ(−z) / (1 − e^{l_w}), ∂L/∂l_l = +β σ(−z) / (1 − e^{l_l}).
    """
    if validate:  # `validate=False`: the trainer's step, whose settings were checked once
        check_preference_args("orpo", beta, logps=(policy_chosen_logps, policy_rejected_logps))
    chosen, rejected = as_math(policy_chosen_logps, policy_rejected_logps)
    losses = -beta * F.logsigmoid(orpo_log_odds_ratio(chosen, rejected))  # Eq. 7, weighted by λ = β
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


# ------------------------------------------------------------------------------ SimPO
def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0, validate: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO: −log σ(β l_w − β l_l − γ). Meng et al. 2024, arXiv 2405.14734, Eq. 6.

    -> (losses [B], chosen_rewards [B], rejected_rewards [B]). The inputs are mean per-token log-probs
    [B] (the reward of Eq. 4 is β·l: length-normalised, no reference); γ is the target reward margin.
    Label smoothing ε as cDPO does it: −(1 − ε) log σ(z) − ε log σ(−z), z = β(l_w − l_l) − γ.
    Rewards are β·l, detached. γ = 0 is reference-free length-normalised DPO (`sigmoid_norm`, no reference).
    Gradient: ∂L/∂l_w = −∂L/∂l_l = −β [(1 − ε) σ(−z) − ε σ(z)].
    """
    if validate:
        check_preference_args("simpo", beta, label_smoothing=label_smoothing, simpo_gamma=gamma,
                              logps=(policy_chosen_logps, policy_rejected_logps))
    chosen, rejected = as_math(policy_chosen_logps, policy_rejected_logps)
    z = beta * (chosen - rejected) - gamma  # Eq. 6: the reward margin minus the target margin γ
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


# ------------------------------------------------------------------------------ KTO
def kto_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z₀: the batch mean of log πθ(y'|x) − log π_ref(y'|x) over mismatched pairs
    (x, y'), detached and clamped at 0. Ethayarajh et al. 2024, arXiv 2402.01306, Eq. 8 and §4.1
    ("we estimate z₀ ... with mismatched pairs"); TRL's estimate: [N] [N] -> scalar."""
    return (policy_kl_logps.detach() - ref_kl_logps.detach()).mean().clamp(min=0)


def kto_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, kl, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0, validate: bool = True):
    """KTO. Ethayarajh et al. 2024, arXiv 2402.01306, Eq. 7 (its value function v minus λ_y):

      desirable y_w [Bc]:   w_d · (1 − σ(β(ρ_w − z₀)))       ρ = log πθ(y|x) − log π_ref(y|x)
      undesirable y_l [Br]: w_u · (1 − σ(β(z₀ − ρ_l)))

    -> (losses [Bc + Br], desirable then undesirable; chosen_rewards β ρ_w [Bc]; rejected_rewards β ρ_l [Br]).
    The log-probs are summed over the answer tokens; the two sizes may differ (either may be 0). `kl`
    is the reference point z₀ (see `kto_kl`), a float or 0-dim tensor; it is detached and clamped at 0
    here too, so no gradient flows through it. The weights are the paper's λ_D, λ_U.
    Gradient, with u = β(ρ_w − z₀), v = β(z₀ − ρ_l): ∂L/∂ρ_w = −w_d β σ(u)σ(−u), ∂L/∂ρ_l = +w_u β σ(v)σ(−v).
    """
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if validate:
        check_preference_args("kto", beta, desirable_weight=desirable_weight,
                              undesirable_weight=undesirable_weight, logps=logps, kl=kl)
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = as_math(*logps)
    ref_chosen, ref_rejected = ref_chosen.detach(), ref_rejected.detach()
    z0 = torch.as_tensor(kl, dtype=policy_chosen.dtype, device=policy_chosen.device).detach().reshape(()).clamp(min=0)
    chosen_logratio, rejected_logratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected  # ρ_w, ρ_l
    chosen_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (chosen_logratio - z0)))  # Eq. 7, y desirable
    rejected_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - rejected_logratio)))  # y undesirable
    return (torch.cat([chosen_losses, rejected_losses]), (beta * chosen_logratio).detach(),
            (beta * rejected_logratio).detach())
