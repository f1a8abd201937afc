"""Tests for anita/dpo/gradients.py: the hand-derived gradient of every one of the 17 losses.

The closed forms (written in each function's docstring and derived in docs/preference_losses.md)
are checked against autograd for the policy log-probs and against central finite differences
(fp64) for the reference log-probs, which `dpo_loss` detaches. Then the limits the papers state:
DPO is logistic regression on the margin h, IPO's fixed point is h* = 1/(2β), cDPO's and EXO's
stationary points sit at σ(βh) = 1 − ε. (float64 gradcheck of the 14 DPO losses is in
test_loss.py, of ORPO, SimPO and KTO in test_beyond_dpo.py.)
"""

import pytest
import torch
import torch.nn.functional as F

from anita.dpo import (
    ALL_LOSS_TYPES,
    GRADIENTS,
    LOSS_TYPES,
    dpo_loss,
    dpo_loss_gradients,
    kto_gradients,
    kto_loss,
    orpo_gradients,
    orpo_loss,
    simpo_gradients,
    simpo_loss,
)

SMOOTHING = {"sigmoid": 0.1, "robust": 0.2, "exo_pair": 0.1, "aot": 0.15, "aot_unpaired": 0.15}
D = torch.float64


def _random(seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    logps = [-torch.rand(n, generator=g, dtype=D) * 12 for _ in range(4)]
    lengths = [torch.randint(1, 9, (n,), generator=g) for _ in range(2)]
    return logps, lengths


def _finite_difference(f, x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """∂f/∂x_i by central differences, one coordinate at a time."""
    grad = torch.zeros_like(x)
    for i in range(len(x)):
        e = torch.zeros_like(x)
        e[i] = h
        grad[i] = (f(x + e) - f(x - e)) / (2 * h)
    return grad


def test_every_loss_has_a_closed_form():
    assert set(GRADIENTS) == set(LOSS_TYPES) and len(ALL_LOSS_TYPES) == 17


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_dpo_family_gradients_match_autograd_and_finite_differences(loss_type, beta):
    """∂Σ losses/∂ all four log-probs == the closed form (policy: autograd; reference: finite differences)."""
    (pc, pr, rc, rr), (lc, lr) = _random(LOSS_TYPES.index(loss_type))
    kw = dict(beta=beta, loss_type=loss_type, label_smoothing=SMOOTHING.get(loss_type, 0.0),
              chosen_lengths=lc, rejected_lengths=lr)
    expected = dpo_loss_gradients(pc, pr, rc, rr, **kw)
    a, b = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    g_c, g_r = torch.autograd.grad(dpo_loss(a, b, rc, rr, **kw)[0].sum(), (a, b))
    assert torch.allclose(g_c, expected.policy_chosen, rtol=1e-10, atol=1e-12)
    assert torch.allclose(g_r, expected.policy_rejected, rtol=1e-10, atol=1e-12)
    fd_c = _finite_difference(lambda x: dpo_loss(pc, pr, x, rr, **kw)[0].sum().item(), rc)
    fd_r = _finite_difference(lambda x: dpo_loss(pc, pr, rc, x, **kw)[0].sum().item(), rr)
    assert torch.allclose(fd_c, expected.ref_chosen, atol=1e-6)
    assert torch.allclose(fd_r, expected.ref_rejected, atol=1e-6)


def test_ipo_paper_form_gradient_without_lengths():
    (pc, pr, rc, rr), _ = _random(99)
    a = pc.clone().requires_grad_()
    auto = torch.autograd.grad(dpo_loss(a, pr, rc, rr, beta=0.3, loss_type="ipo")[0].sum(), a)[0]
    assert torch.allclose(auto, dpo_loss_gradients(pc, pr, rc, rr, beta=0.3, loss_type="ipo").policy_chosen)


def test_orpo_simpo_kto_gradients_match_autograd():
    """The three new closed forms; KTO with 4 desirable and 2 undesirable examples and z₀ > 0."""
    (pc, pr, rc, rr), (lc, lr) = _random(7)
    l_w, l_l = (pc / lc).requires_grad_(), (pr / lr).requires_grad_()
    for loss, closed in [(lambda a, b: orpo_loss(a, b, 0.25), orpo_gradients(l_w, l_l, 0.25)),
                         (lambda a, b: simpo_loss(a, b, 2.5, 1.2, 0.1), simpo_gradients(l_w, l_l, 2.5, 1.2, 0.1))]:
        g_w, g_l = torch.autograd.grad(loss(l_w, l_l)[0].sum(), (l_w, l_l))
        assert torch.allclose(g_w, closed.policy_chosen, rtol=1e-10) and torch.allclose(g_l, closed.policy_rejected)
    a, b = pc[:4].clone().requires_grad_(), pr[:2].clone().requires_grad_()
    closed = kto_gradients(a, b, rc[:4], rr[:2], 0.8, 0.5, 1.3, 0.7)
    g_w, g_l = torch.autograd.grad(kto_loss(a, b, rc[:4], rr[:2], 0.8, 0.5, 1.3, 0.7)[0].sum(), (a, b))
    assert torch.allclose(g_w, closed.policy_chosen, rtol=1e-10) and torch.allclose(g_l, closed.policy_rejected)
    fd = _finite_difference(lambda x: kto_loss(a.detach(), b.detach(), x, rr[:2], 0.8, 0.5, 1.3, 0.7)[0].sum().item(),
                            rc[:4].clone())
    assert torch.allclose(fd, closed.ref_chosen, atol=1e-6)


def test_dpo_is_logistic_regression_on_the_margin():
    """Rafailov et al. §4: the DPO loss is the negative log-likelihood of a logistic regression with
    feature h, weight β and label "y_w wins" (cDPO: soft label 1 − ε). So dpo_loss equals
    binary_cross_entropy_with_logits(βh, 1 − ε), and its gradient vanishes where σ(βh) = 1 − ε."""
    (pc, pr, rc, rr), _ = _random(11)
    h = (pc - rc) - (pr - rr)
    for eps in (0.0, 0.1, 0.3):
        losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.4, label_smoothing=eps)
        target = torch.full_like(h, 1.0 - eps)
        assert torch.allclose(losses, F.binary_cross_entropy_with_logits(0.4 * h, target, reduction="none"))
    h_star = torch.logit(torch.tensor(0.9, dtype=D)) / 0.4  # σ(β h*) = 1 − ε with ε = 0.1
    for loss_type in ("sigmoid", "exo_pair"):  # EXO's minimiser is cDPO's: the same soft label
        g = dpo_loss_gradients(h_star.view(1), torch.zeros(1, dtype=D), None, None, beta=0.4, loss_type=loss_type,
                               label_smoothing=0.1)
        assert g.policy_chosen.abs().item() < 1e-14, loss_type


def test_ipo_fixed_point_is_half_over_beta():
    """Azar et al. §5.2: IPO regresses the margin to h* = 1/(2β) (the root of its gradient), where
    its loss is 0; gradient descent on h reaches it from either side, for every β."""
    for beta in (0.1, 0.5, 2.0):
        for start in (-3.0, 12.0):
            h = torch.tensor([start], dtype=D, requires_grad=True)
            optimizer = torch.optim.SGD([h], lr=0.25)
            for _ in range(60):
                optimizer.zero_grad()
                dpo_loss(h, torch.zeros(1, dtype=D), None, None, beta=beta, loss_type="ipo")[0].sum().backward()
                optimizer.step()
            assert h.item() == pytest.approx(1 / (2 * beta), abs=1e-9)
        at_fixed_point = dpo_loss_gradients(torch.tensor([1 / (2 * beta)], dtype=D), torch.zeros(1, dtype=D), None,
                                            None, beta=beta, loss_type="ipo")
        assert at_fixed_point.policy_chosen.item() == 0.0
