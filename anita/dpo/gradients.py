"""Closed-form gradients of every preference loss: the loss-math kit.

For each of the 17 losses (`anita.dpo.loss`'s 14 and `anita.dpo.beyond_dpo`'s 3), the gradient of
Σ losses with respect to each log-prob input, derived by hand (docs/preference_losses.md) and
written out here, so a test can hold any implementation of these losses to them:

    dpo_loss_gradients(pc, pr, rc, rr, loss_type=..., beta=..., ...) -> Gradients(pc, pr, rc, rr)
    orpo_gradients(pc, pr, beta), simpo_gradients(pc, pr, beta, gamma, ε), kto_gradients(...)

Every DPO loss except AOT depends on the log-probs only through the log-ratios ρ = log πθ − log π_ref,
so ∂L/∂log π_ref(y) = −∂L/∂log πθ(y): such a loss is given as (∂L/∂ρ_w, ∂L/∂ρ_l). z = β h is the
scaled margin, σ̄(z) = σ(−z) = 1 − σ(z), σ'(z) = σ(z)σ(−z). (dpo_loss detaches the reference:
autograd gives it no gradient; these are the gradients of the formula, which a test checks by
finite differences.)

Shapes: B batch; every tensor [B] (KTO: [Bc] and [Br]).
"""

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from anita.dpo.beyond_dpo import SIMPO_GAMMA, as_math, check_preference_args, orpo_log_odds_ratio
from anita.dpo.loss import DISCOPOP_TAU, PreferenceBatch, preference_batch

sig = torch.sigmoid


class Gradients(NamedTuple):
    """∂(Σ losses)/∂ each log-prob input ([B] each; None for an input the loss does not take)."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None


def _dz(b: PreferenceBatch, dl_dz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A loss of z = βh alone: ∂L/∂ρ_w = β ∂L/∂z, ∂L/∂ρ_l = −β ∂L/∂z."""
    return b.beta * dl_dz, -b.beta * dl_dz


def _smoothed_logistic_dz(z: torch.Tensor, eps: float) -> torch.Tensor:
    """d/dz [−(1 − ε) log σ(z) − ε log σ(−z)] = −(1 − ε) σ(−z) + ε σ(z)."""
    return -(1.0 - eps) * sig(-z) + eps * sig(z)


def sigmoid_grad(b):
    """DPO/cDPO: ∂L/∂z = −(1 − ε) σ(−z) + ε σ(z): each pair weighted by how wrongly it is ordered."""
    return _dz(b, _smoothed_logistic_dz(b.beta * b.margin, b.label_smoothing))


def hinge_grad(b):
    """hinge: ∂L/∂z = −1 where z < 1, else 0 (at the kink z = 1, 0, as torch.relu)."""
    return _dz(b, -(b.beta * b.margin < 1.0).to(b.margin.dtype))


def ipo_grad(b):
    """IPO: L = (h' − 1/(2β))², h' = ρ_w/n_w − ρ_l/n_l (n = 1 without lengths):
    ∂L/∂ρ_w = 2(h' − 1/(2β))/n_w, ∂L/∂ρ_l = −2(h' − 1/(2β))/n_l."""
    n_w, n_l = (b.chosen_lengths, b.rejected_lengths) if b.chosen_lengths is not None else (1.0, 1.0)
    g = 2.0 * (b.chosen_logratio / n_w - b.rejected_logratio / n_l - 0.5 / b.beta)
    return g / n_w, -g / n_l


def exo_pair_grad(b):
    """EXO: ∂L/∂z = σ(z)σ(−z)·(z − log((1 − ε)/ε)): zero where σ(z) = 1 − ε, the smoothed label."""
    z, eps = b.beta * b.margin, b.label_smoothing
    return _dz(b, sig(z) * sig(-z) * (z - torch.log(torch.tensor((1.0 - eps) / eps, dtype=z.dtype))))


def nca_pair_grad(b):
    """NCA: ∂L/∂ρ_w = β(−σ(−r_w) + ½σ(r_w)), ∂L/∂ρ_l = ½βσ(r_l)."""
    r_w, r_l = b.beta * b.chosen_logratio, b.beta * b.rejected_logratio
    return b.beta * (-sig(-r_w) + 0.5 * sig(r_w)), 0.5 * b.beta * sig(r_l)


def robust_grad(b):
    """rDPO: ∂L/∂z = [−(1 − ε)σ(−z) − εσ(z)] / (1 − 2ε)."""
    z, eps = b.beta * b.margin, b.label_smoothing
    return _dz(b, (-(1.0 - eps) * sig(-z) - eps * sig(z)) / (1.0 - 2.0 * eps))


def bco_pair_grad(b):
    """BCO: ∂L/∂ρ_w = −βσ(−r_w), ∂L/∂ρ_l = βσ(r_l): each reward pushed on its own."""
    return -b.beta * sig(-b.beta * b.chosen_logratio), b.beta * sig(b.beta * b.rejected_logratio)


def sppo_hard_grad(b):
    """SPPO: ∂L/∂ρ_w = 2(ρ_w − 1/(2β)), ∂L/∂ρ_l = 2(ρ_l + 1/(2β)): each log-ratio pulled to ±1/(2β)."""
    return 2.0 * (b.chosen_logratio - 0.5 / b.beta), 2.0 * (b.rejected_logratio + 0.5 / b.beta)


def _sorted_pairing(a: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For AOT: each a_j meets the c of its rank, each c_k the a of its rank. -> (c_at_rank_of_a, a_at_rank_of_c)"""
    c_sorted, a_sorted = torch.sort(c).values, torch.sort(a).values
    return c_sorted[torch.argsort(torch.argsort(a))], a_sorted[torch.argsort(torch.argsort(c))]


def aot_grad(b):
    """AOT (paired), m = πθ margins, q = π_ref margins, quantile losses ℓ(β(m₍ᵢ₎ − q₍ᵢ₎)):
    ∂ΣL/∂log πθ(y_w)_j = β ℓ'(β(m_j − q at m_j's rank)) = −∂ΣL/∂log πθ(y_l)_j;
    ∂ΣL/∂log π_ref(y_w)_k = −β ℓ'(β(m at q_k's rank − q_k)) = −∂ΣL/∂log π_ref(y_l)_k."""
    m, q = b.policy_chosen - b.policy_rejected, b.ref_chosen - b.ref_rejected
    q_for_m, m_for_q = _sorted_pairing(m, q)
    g_policy = b.beta * _smoothed_logistic_dz(b.beta * (m - q_for_m), b.label_smoothing)
    g_ref = -b.beta * _smoothed_logistic_dz(b.beta * (m_for_q - q), b.label_smoothing)
    return Gradients(g_policy, -g_policy, g_ref, -g_ref)


def aot_unpaired_grad(b):
    """AOT (unpaired), quantile losses ℓ(β(ρ_w₍ᵢ₎ − ρ_l₍ᵢ₎)):
    ∂ΣL/∂ρ_w,j = β ℓ'(β(ρ_w,j − ρ_l at its rank)), ∂ΣL/∂ρ_l,k = −β ℓ'(β(ρ_w at its rank − ρ_l,k))."""
    rho_l_for_w, rho_w_for_l = _sorted_pairing(b.chosen_logratio, b.rejected_logratio)
    g_w = b.beta * _smoothed_logistic_dz(b.beta * (b.chosen_logratio - rho_l_for_w), b.label_smoothing)
    g_l = -b.beta * _smoothed_logistic_dz(b.beta * (rho_w_for_l - b.rejected_logratio), b.label_smoothing)
    return g_w, g_l


def apo_zero_grad(b):
    """APO-zero: ∂L/∂ρ_w = −βσ(r_w)σ(−r_w), ∂L/∂ρ_l = βσ(r_l)σ(−r_l)."""
    r_w, r_l = b.beta * b.chosen_logratio, b.beta * b.rejected_logratio
    return -b.beta * sig(r_w) * sig(-r_w), b.beta * sig(r_l) * sig(-r_l)


def apo_down_grad(b):
    """APO-down: ∂L/∂ρ_w = β[σ(r_w)σ(−r_w) − σ(z)σ(−z)], ∂L/∂ρ_l = βσ(z)σ(−z)."""
    r_w, z = b.beta * b.chosen_logratio, b.beta * b.margin
    return b.beta * (sig(r_w) * sig(-r_w) - sig(z) * sig(-z)), b.beta * sig(z) * sig(-z)


def discopop_grad(b):
    """DiscoPOP, m = σ(z/τ), m' = m(1 − m)/τ:
    ∂L/∂z = m'·(e^{−z} + log σ(z)) − (1 − m)σ(−z) − m e^{−z}."""
    z, tau = b.beta * b.margin, b.discopop_tau
    m = sig(z / tau)
    m_exp = torch.exp(F.logsigmoid(z / tau) - z)  # m·e^{−z}, finite where e^{−z} alone overflows
    dm_exp = (1.0 - m) / tau * m_exp  # m'·e^{−z}
    return _dz(b, dm_exp + m * (1.0 - m) / tau * F.logsigmoid(z) - (1.0 - m) * sig(-z) - m_exp)


def sigmoid_norm_grad(b):
    """Length-normalised DPO, h' = ρ_w/n_w − ρ_l/n_l: ∂L/∂ρ_w = −βσ(−βh')/n_w, ∂L/∂ρ_l = βσ(−βh')/n_l."""
    g = -b.beta * sig(-b.beta * (b.chosen_logratio / b.chosen_lengths - b.rejected_logratio / b.rejected_lengths))
    return g / b.chosen_lengths, -g / b.rejected_lengths


GradFn = Callable[[PreferenceBatch], tuple | Gradients]
GRADIENTS: dict[str, GradFn] = {
    "sigmoid": sigmoid_grad, "hinge": hinge_grad, "ipo": ipo_grad, "exo_pair": exo_pair_grad,
    "nca_pair": nca_pair_grad, "robust": robust_grad, "bco_pair": bco_pair_grad, "sppo_hard": sppo_hard_grad,
    "aot": aot_grad, "aot_unpaired": aot_unpaired_grad, "apo_zero": apo_zero_grad, "apo_down": apo_down_grad,
    "discopop": discopop_grad, "sigmoid_norm": sigmoid_norm_grad,
}


def dpo_loss_gradients(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                       beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                       chosen_lengths=None, rejected_lengths=None, discopop_tau: float = DISCOPOP_TAU) -> Gradients:
    """∂(Σ dpo_loss(...).losses)/∂ each of the four log-probs, in closed form (same arguments as dpo_loss)."""
    b = preference_batch(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                         beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                         chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, discopop_tau=discopop_tau)
    with torch.no_grad():
        g = GRADIENTS[loss_type](b)
    if isinstance(g, Gradients):
        return g
    g_w, g_l = g  # a loss of the log-ratios: the reference gets the opposite gradient
    return Gradients(g_w, g_l, -g_w, -g_l)


def orpo_gradients(policy_chosen_logps, policy_rejected_logps, beta: float) -> Gradients:
    """ORPO, z = log OR: ∂L/∂l_w = −βσ(−z)/(1 − e^{l_w}), ∂L/∂l_l = βσ(−z)/(1 − e^{l_l})
    (d log odds(y)/dl = 1 + eˡ/(1 − eˡ) = 1/(1 − eˡ))."""
    check_preference_args("orpo", beta, logps=(policy_chosen_logps, policy_rejected_logps))
    l_w, l_l = (t.detach() for t in as_math(policy_chosen_logps, policy_rejected_logps))
    weight = beta * sig(-orpo_log_odds_ratio(l_w, l_l))
    return Gradients(-weight / -torch.expm1(l_w), weight / -torch.expm1(l_l), None, None)


def simpo_gradients(policy_chosen_logps, policy_rejected_logps, beta: float, gamma: float = SIMPO_GAMMA,
                    label_smoothing: float = 0.0) -> Gradients:
    """SimPO, z = β(l_w − l_l) − γ: ∂L/∂l_w = −∂L/∂l_l = β[−(1 − ε)σ(−z) + εσ(z)]."""
    check_preference_args("simpo", beta, label_smoothing=label_smoothing, simpo_gamma=gamma,
                          logps=(policy_chosen_logps, policy_rejected_logps))
    l_w, l_l = (t.detach() for t in as_math(policy_chosen_logps, policy_rejected_logps))
    g = beta * _smoothed_logistic_dz(beta * (l_w - l_l) - gamma, label_smoothing)
    return Gradients(g, -g, None, None)


def kto_gradients(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, kl,
                  beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> Gradients:
    """KTO, u = β(ρ_w − z₀) [Bc], v = β(z₀ − ρ_l) [Br], z₀ a constant:
    ∂L/∂ρ_w = −w_d βσ(u)σ(−u), ∂L/∂ρ_l = w_u βσ(v)σ(−v); the reference gets the opposite."""
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    check_preference_args("kto", beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                          logps=logps, kl=kl)
    pc, pr, rc, rr = (t.detach() for t in as_math(*logps))
    z0 = torch.as_tensor(kl, dtype=pc.dtype).detach().reshape(()).clamp(min=0)
    u, v = beta * (pc - rc - z0), beta * (z0 - (pr - rr))
    g_w, g_l = -desirable_weight * beta * sig(u) * sig(-u), undesirable_weight * beta * sig(v) * sig(-v)
    return Gradients(g_w, g_l, -g_w, -g_l)
