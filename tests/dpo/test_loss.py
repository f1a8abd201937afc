"""Tests for anita/dpo/loss.py: the DPO loss family.

Four kinds of evidence, each independent of the code under test:
  * hand-derived values (each docstring shows the arithmetic);
  * closed-form gradients against autograd, and gradcheck in fp64 for every loss type;
  * limits and symmetries (ε = 0 is plain DPO, swapping chosen/rejected, step 0 gives ln 2,
    rDPO's unbiasedness), partly as hypothesis property tests;
  * agreement with TRL 1.16's own DPOTrainer loss code, called live when trl is installed and
    through tests/dpo/fixtures/trl_losses.json (TRL's outputs on fixed inputs) when it is not.

TRL 1.16 has no standalone loss function: the losses live inside `DPOTrainer._compute_loss(model,
inputs, return_outputs)`. `_trl_losses` calls that method on a minimal stand-in for the trainer
(`precompute_ref_logps=True`, so the reference log-probs come from `inputs`) and a stand-in model
whose per-token log-probs sum to the given sequence log-probs. It returns the batch mean, so
per-example values come from one call per example (aot/aot_unpaired sort across the batch: they
are compared on the batch mean). Where TRL differs by design it is not used as the oracle and the
formula is: "sigmoid" with label smoothing (TRL 1.16 ignores ε there; cDPO is checked by hand).

Regenerate the fixture with `python tests/dpo/test_loss.py` (needs trl).
"""

import json
import math
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from anita.dpo import LOSS_TYPES, check_loss_args, dpo_loss, rpo_nll
from anita.errors import AnitaError

FIXTURE = Path(__file__).parent / "fixtures" / "trl_losses.json"
SMOOTHING = {"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"}  # loss types that read label_smoothing
BATCHWISE = {"aot", "aot_unpaired"}  # losses[i] depends on the whole batch (sorting)


def _t(*xs, dtype=torch.float64):
    return torch.tensor(xs, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# TRL as an oracle
# ---------------------------------------------------------------------------------------------


class _Accelerator:
    """The three accelerate methods `_compute_loss` calls, for one CPU process."""

    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x


def _trl_losses(loss_type, token_logps, shift_mask, ref_chosen, ref_rejected, beta, eps=0.0, tau=0.05):
    """TRL 1.16's DPO loss for a batch [chosen; rejected] of per-token log-probs. -> (mean loss, metrics)

    token_logps [2B, T-1] (0 outside the completion), shift_mask [2B, T-1] marks completion tokens.
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    two_b, t_minus_1 = token_logps.shape
    outputs = types.SimpleNamespace(
        log_probs=token_logps.float(),
        entropy=torch.zeros(two_b, t_minus_1),
        mean_logits=torch.zeros(two_b, t_minus_1),
        is_top1=torch.zeros(two_b, t_minus_1, dtype=torch.bool),
    )
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=eps,
        use_weighting=False,
        args=types.SimpleNamespace(discopop_tau=tau),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    completion_mask = F.pad(shift_mask.long(), (1, 0))  # [2B, T] the completion tokens themselves
    inputs = {
        "input_ids": torch.zeros_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen.float(),
        "ref_rejected_logps": ref_rejected.float(),
    }
    loss = DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, False)
    return loss.item(), {k: v[0] for k, v in trainer._metrics["train"].items()}


def _as_tokens(chosen, rejected, chosen_lengths, rejected_lengths):
    """Per-token log-probs whose sums are the given sequence log-probs: all of it on the first
    completion token, 0 on the others. -> token_logps [2B, T-1], shift_mask [2B, T-1]"""
    logps = torch.cat([chosen, rejected])  # [2B]
    lengths = torch.cat([chosen_lengths, rejected_lengths])  # [2B]
    width = int(lengths.max())
    shift_mask = torch.arange(width)[None, :] < lengths[:, None]  # [2B, T-1]
    token_logps = torch.zeros(len(logps), width, dtype=logps.dtype)
    token_logps[:, 0] = logps
    return token_logps, shift_mask


def _trl_case(inputs, case):
    """TRL's outputs for one case on the fixture inputs: per-example losses (or None), mean, rewards."""
    pc, pr, rc, rr = (torch.tensor(inputs[k], dtype=torch.float32) for k in ("pc", "pr", "rc", "rr"))
    lc, lr = torch.tensor(inputs["lc"]), torch.tensor(inputs["lr"])
    if not case["lengths"]:  # TRL always divides by lengths where it uses them: 1 gives the paper's form
        lc, lr = torch.ones_like(lc), torch.ones_like(lr)
    knobs = dict(beta=case["beta"], eps=case["label_smoothing"], tau=case["discopop_tau"])
    mean, _ = _trl_losses(case["loss_type"], *_as_tokens(pc, pr, lc, lr), rc, rr, **knobs)
    per_example, chosen_rewards, rejected_rewards = [], [], []
    for i in range(len(pc)):
        one = slice(i, i + 1)
        loss, metrics = _trl_losses(case["loss_type"], *_as_tokens(pc[one], pr[one], lc[one], lr[one]),
                                    rc[one], rr[one], **knobs)
        per_example.append(loss)
        chosen_rewards.append(metrics["rewards/chosen"])
        rejected_rewards.append(metrics["rewards/rejected"])
    if case["loss_type"] in BATCHWISE:
        per_example = None
    return {"per_example": per_example, "mean": mean, "chosen_rewards": chosen_rewards,
            "rejected_rewards": rejected_rewards}


FIXTURE_INPUTS = {  # 6 pairs: ordinary, policy == ref, a large positive and a large negative margin
    "pc": [-12.5, -30.0, -7.25, -55.0, -3.0, -20.0],
    "pr": [-14.0, -28.0, -7.25, -95.0, -1.0, -21.5],
    "rc": [-13.0, -29.0, -7.25, -60.0, -20.0, -19.0],
    "rr": [-13.5, -29.5, -7.25, -60.0, -2.0, -22.0],
    "lc": [5, 12, 3, 20, 1, 8],
    "lr": [7, 9, 3, 31, 2, 8],
}


def _fixture_cases():
    """Every loss type at two betas, with the label smoothing values each accepts."""
    smoothing = {"robust": [0.0, 0.1, 0.3], "exo_pair": [1e-3, 0.2], "aot": [0.0, 0.1], "aot_unpaired": [0.0, 0.1]}
    cases = []
    for loss_type in LOSS_TYPES:
        for beta in (0.1, 0.5):
            for eps in smoothing.get(loss_type, [0.0]):
                for lengths in ([True, False] if loss_type == "ipo" else [True]):
                    cases.append({"loss_type": loss_type, "beta": beta, "label_smoothing": eps,
                                  "discopop_tau": 0.05, "lengths": lengths})
    cases.append({"loss_type": "discopop", "beta": 0.1, "label_smoothing": 0.0, "discopop_tau": 0.5, "lengths": True})
    return cases


def _sft_case():
    """A fixed per-token batch for TRL's "sft" term (the RPO NLL)."""
    g = torch.Generator().manual_seed(0)
    token_logps = -torch.rand(4, 6, generator=g) * 5  # [2B, T-1], B = 2
    shift_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    return token_logps * shift_mask, shift_mask.bool()


def build_fixture() -> dict:
    """TRL's outputs for every fixture case (needs trl)."""
    import trl

    token_logps, shift_mask = _sft_case()
    zeros = torch.zeros(2)
    sft, _ = _trl_losses("sft", token_logps, shift_mask, zeros, zeros, beta=0.1)
    cases = [{**case, **_trl_case(FIXTURE_INPUTS, case)} for case in _fixture_cases()]
    return {"trl_version": trl.__version__, "inputs": FIXTURE_INPUTS, "cases": cases,
            "sft": {"token_logps": token_logps.tolist(), "mask": shift_mask.tolist(), "loss": sft}}


def _ours(inputs, case):
    """anita's dpo_loss on the fixture inputs for one case."""
    pc, pr, rc, rr = (torch.tensor(inputs[k], dtype=torch.float32) for k in ("pc", "pr", "rc", "rr"))
    lengths = {}
    if case["lengths"]:
        lengths = {"chosen_lengths": torch.tensor(inputs["lc"]), "rejected_lengths": torch.tensor(inputs["lr"])}
    return dpo_loss(pc, pr, rc, rr, beta=case["beta"], loss_type=case["loss_type"],
                    label_smoothing=case["label_smoothing"], discopop_tau=case["discopop_tau"], **lengths)


def _assert_case_matches(ours, expected, case):
    losses, chosen_rewards, rejected_rewards = ours
    tol = dict(rel=1e-5, abs=1e-5)
    assert losses.mean().item() == pytest.approx(expected["mean"], **tol), case
    if expected["per_example"] is not None:
        assert losses.tolist() == pytest.approx(expected["per_example"], **tol), case
    assert chosen_rewards.tolist() == pytest.approx(expected["chosen_rewards"], **tol), case
    assert rejected_rewards.tolist() == pytest.approx(expected["rejected_rewards"], **tol), case


def test_fixture_covers_every_loss_type():
    """The fixture was made by TRL and holds at least one case for each of anita's loss types."""
    fixture = json.loads(FIXTURE.read_text())
    assert fixture["trl_version"].startswith("1.16")
    assert {case["loss_type"] for case in fixture["cases"]} == set(LOSS_TYPES)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_trl_fixture(loss_type):
    """anita == TRL 1.16's stored outputs, per example where TRL's loss is per example (no trl needed)."""
    fixture = json.loads(FIXTURE.read_text())
    cases = [case for case in fixture["cases"] if case["loss_type"] == loss_type]
    assert cases
    for case in cases:
        _assert_case_matches(_ours(fixture["inputs"], case), case, case)


def test_rpo_nll_matches_trl_fixture():
    """rpo_nll == TRL's "sft" loss type (the NLL term RPO adds) on the stored per-token batch."""
    sft = json.loads(FIXTURE.read_text())["sft"]
    token_logps, mask = torch.tensor(sft["token_logps"]), torch.tensor(sft["mask"])
    chosen_logps, chosen_mask = token_logps[:2], mask[:2]  # the batch is [chosen; rejected]
    assert rpo_nll(chosen_logps, chosen_mask).item() == pytest.approx(sft["loss"], rel=1e-6)


def test_fixture_is_current_trl_output(trl_available):
    """Recomputing the fixture with the installed TRL reproduces the stored numbers."""
    stored, fresh = json.loads(FIXTURE.read_text()), build_fixture()
    assert fresh["sft"]["loss"] == pytest.approx(stored["sft"]["loss"], rel=1e-6)
    for old, new in zip(stored["cases"], fresh["cases"], strict=True):
        assert {k: old[k] for k in ("loss_type", "beta", "label_smoothing")} == {
            k: new[k] for k in ("loss_type", "beta", "label_smoothing")
        }
        assert new["mean"] == pytest.approx(old["mean"], rel=1e-6, abs=1e-6)
        assert new["chosen_rewards"] == pytest.approx(old["chosen_rewards"], rel=1e-6, abs=1e-6)
        assert new["rejected_rewards"] == pytest.approx(old["rejected_rewards"], rel=1e-6, abs=1e-6)
        if old["per_example"] is not None:
            assert new["per_example"] == pytest.approx(old["per_example"], rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_live_trl_on_random_inputs(trl_available, loss_type):
    """anita == TRL 1.16 called live, on random log-probs and lengths (seeded), β = 0.2."""
    g = torch.Generator().manual_seed(LOSS_TYPES.index(loss_type))
    inputs = {k: (-torch.rand(5, generator=g) * 40).tolist() for k in ("pc", "pr", "rc", "rr")}
    inputs |= {k: torch.randint(1, 30, (5,), generator=g).tolist() for k in ("lc", "lr")}
    eps = {"exo_pair": 0.05, "robust": 0.2, "aot": 0.15, "aot_unpaired": 0.15}.get(loss_type, 0.0)
    case = {"loss_type": loss_type, "beta": 0.2, "label_smoothing": eps, "discopop_tau": 0.05, "lengths": True}
    _assert_case_matches(_ours(inputs, case), _trl_case(inputs, case), case)


def test_rpo_nll_matches_live_trl(trl_available):
    """rpo_nll == TRL's "sft" loss type on random per-token log-probs with ragged masks."""
    g = torch.Generator().manual_seed(7)
    shift_mask = torch.rand(6, 9, generator=g) < 0.7  # [2B, T-1], B = 3
    token_logps = -torch.rand(6, 9, generator=g) * 8 * shift_mask
    expected, _ = _trl_losses("sft", token_logps, shift_mask, torch.zeros(3), torch.zeros(3), beta=0.1)
    assert rpo_nll(token_logps[:3], shift_mask[:3]).item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Hand-derived values
# ---------------------------------------------------------------------------------------------


def test_step_zero_rewards_are_zero_and_sigmoid_loss_is_ln2():
    """At step 0 the policy is the reference: ρ_w = ρ_l = 0, so rewards are exactly 0 and the
    sigmoid loss is −log σ(0) = ln 2 exactly, for any β and any log-probs."""
    logps = _t(-17.25, -3.5, -120.0, dtype=torch.float32)
    other = _t(-9.0, -44.125, -0.5, dtype=torch.float32)
    for beta in (0.01, 0.1, 1.0):
        losses, chosen, rejected = dpo_loss(logps, other, logps.clone(), other.clone(), beta=beta)
        assert torch.equal(chosen, torch.zeros(3)) and torch.equal(rejected, torch.zeros(3))
        assert torch.equal(losses, torch.full((3,), math.log(2.0)))


def test_sigmoid_and_cdpo_hand_values():
    """β = 0.5, ρ_w = ln 3, ρ_l = −ln 3: h = 2 ln 3, βh = ln 3, σ(βh) = 3/4, σ(−βh) = 1/4.
    DPO: −ln(3/4) = ln(4/3). cDPO with ε = 1/4: (3/4) ln(4/3) + (1/4) ln 4."""
    ln3 = math.log(3.0)
    args = (_t(ln3 - 10), _t(-ln3 - 10), _t(-10.0), _t(-10.0))
    losses, chosen, rejected = dpo_loss(*args, beta=0.5)
    assert losses.item() == pytest.approx(math.log(4 / 3), rel=1e-12)
    assert chosen.item() == pytest.approx(0.5 * ln3) and rejected.item() == pytest.approx(-0.5 * ln3)
    cdpo, _, _ = dpo_loss(*args, beta=0.5, label_smoothing=0.25)
    assert cdpo.item() == pytest.approx(0.75 * math.log(4 / 3) + 0.25 * math.log(4.0), rel=1e-12)


def test_hinge_hand_values():
    """β = 0.1: h = 4 gives max(0, 1 − 0.4) = 0.6; h = 10 sits on the hinge (0); h = 25 gives 0."""
    losses, _, _ = dpo_loss(_t(4.0, 10.0, 25.0), _t(0.0, 0.0, 0.0), _t(0.0, 0.0, 0.0), _t(0.0, 0.0, 0.0),
                            loss_type="hinge")
    assert losses.tolist() == pytest.approx([0.6, 0.0, 0.0], abs=1e-12)


def test_ipo_hand_values_paper_and_per_token_forms():
    """β = 0.5 puts the target margin 1/(2β) at 1.
    Paper form: ρ_w = 5, ρ_l = 2, h = 3 -> (3 − 1)² = 4.
    Per-token form: ρ_w = 6 over 3 tokens, ρ_l = −2 over 2 tokens -> 2 − (−1) = 3 -> 4 again, while
    the paper form of the same pair has h = 8 -> 49."""
    paper, _, _ = dpo_loss(_t(5.0), _t(2.0), _t(0.0), _t(0.0), beta=0.5, loss_type="ipo")
    assert paper.item() == pytest.approx(4.0)
    args = (_t(-4.0), _t(-12.0), _t(-10.0), _t(-10.0))  # ρ_w = 6, ρ_l = −2
    per_token, _, _ = dpo_loss(*args, beta=0.5, loss_type="ipo", chosen_lengths=torch.tensor([3]),
                               rejected_lengths=torch.tensor([2]))
    assert per_token.item() == pytest.approx(4.0)
    assert dpo_loss(*args, beta=0.5, loss_type="ipo")[0].item() == pytest.approx(49.0)


def test_exo_nca_bco_sppo_apo_discopop_at_zero_margin():
    """With ρ_w = ρ_l = 0 (z = 0, σ(0) = ½):
    exo_pair ε = 0.2: ½ ln(½/0.8) + ½ ln(½/0.2) = ½ ln(0.625 · 2.5) = ln 1.25;
    nca_pair: ln 2 + ½ ln 2 + ½ ln 2 = 2 ln 2;  bco_pair (δ = 0): 2 ln 2;
    sppo_hard β = 0.5: (0 − 1)² + (0 + 1)² = 2;  apo_zero: (1 − ½) + ½ = 1;  apo_down: ½ + (1 − ½) = 1;
    discopop: m = σ(0) = ½, ½ ln 2 + ½ e⁰ = (ln 2 + 1)/2;
    robust ε = 0.3: [(1 − ε) ln 2 − ε ln 2]/(1 − 2ε) = ln 2."""
    zero = (_t(-3.0), _t(-8.0), _t(-3.0), _t(-8.0))
    expected = {
        ("exo_pair", 0.2): math.log(1.25),
        ("nca_pair", 0.0): 2 * math.log(2.0),
        ("bco_pair", 0.0): 2 * math.log(2.0),
        ("sppo_hard", 0.0): 2.0,
        ("apo_zero", 0.0): 1.0,
        ("apo_down", 0.0): 1.0,
        ("discopop", 0.0): (math.log(2.0) + 1.0) / 2,
        ("robust", 0.3): math.log(2.0),
    }
    for (loss_type, eps), value in expected.items():
        beta = 0.5 if loss_type == "sppo_hard" else 0.1
        losses, _, _ = dpo_loss(*zero, beta=beta, loss_type=loss_type, label_smoothing=eps)
        assert losses.item() == pytest.approx(value, rel=1e-12), loss_type


def test_bco_pair_hand_value():
    """bco_pair is −log σ(r_w) − log σ(−r_l), each reward on its own (not their margin).
    ρ_w = −3 − (−10) = 7 and ρ_l = −8 − (−7) = −1 at β = 0.1: r_w = 0.7, r_l = −0.1, so the loss is
    −log σ(0.7) − log σ(0.1) = log(1 + e^−0.7) + log(1 + e^−0.1)."""
    args = (_t(-3.0), _t(-8.0), _t(-10.0), _t(-7.0))
    losses, _, _ = dpo_loss(*args, beta=0.1, loss_type="bco_pair")
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.7)) + math.log1p(math.exp(-0.1)), rel=1e-12)


def test_aot_sorts_the_batch():
    """Paired AOT compares sorted margins, not pairs. Policy margins [2, −1], reference margins
    [0, 1]: sorted, (−1 − 0) and (2 − 1), so the losses are −log σ(−β) and −log σ(β) (β = 1).
    With a single pair it is plain DPO."""
    pc, pr = _t(-1.0, -4.0), _t(-3.0, -3.0)  # policy margins [2, −1]
    rc, rr = _t(-5.0, -5.0), _t(-5.0, -6.0)  # reference margins [0, 1]
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=1.0, loss_type="aot")
    assert losses.tolist() == pytest.approx([-math.log(torch.sigmoid(_t(-1.0)).item()),
                                             -math.log(torch.sigmoid(_t(1.0)).item())])
    single = [t[:1] for t in (pc, pr, rc, rr)]
    assert torch.allclose(dpo_loss(*single, loss_type="aot")[0], dpo_loss(*single)[0])
    assert torch.allclose(dpo_loss(*single, loss_type="aot_unpaired")[0], dpo_loss(*single)[0])


def test_sigmoid_norm_is_length_normalised_dpo():
    """Lengths of 1 make sigmoid_norm plain DPO; with lengths (4, 2) and ρ_w = 8, ρ_l = −2 the
    normalised margin is 8/4 + 2/2 = 3, so the loss is −log σ(3β). Reference-free it is SimPO (γ = 0)."""
    pc, pr, rc, rr = _t(-2.0), _t(-12.0), _t(-10.0), _t(-10.0)
    ones = torch.ones(1, dtype=torch.long)
    norm1, _, _ = dpo_loss(pc, pr, rc, rr, loss_type="sigmoid_norm", chosen_lengths=ones, rejected_lengths=ones)
    assert torch.allclose(norm1, dpo_loss(pc, pr, rc, rr)[0])
    lengths = dict(chosen_lengths=torch.tensor([4]), rejected_lengths=torch.tensor([2]))
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="sigmoid_norm", **lengths)
    assert losses.item() == pytest.approx(-F.logsigmoid(_t(0.3)).item(), rel=1e-12)
    simpo, _, _ = dpo_loss(pc, pr, None, None, beta=2.0, loss_type="sigmoid_norm", **lengths)
    assert simpo.item() == pytest.approx(-F.logsigmoid(_t(2.0 * (-2.0 / 4 + 12.0 / 2))).item(), rel=1e-12)


def test_rpo_nll_hand_value():
    """Token log-probs [[−1, −2, (pad)], [−3, (pad), (pad)]]: −(−1 − 2 − 3)/3 = 2."""
    token_logps = _t(-1.0, -2.0, -99.0, -3.0, -99.0, -99.0).view(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert rpo_nll(token_logps, mask).item() == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


def test_sigmoid_gradient_closed_form():
    """d loss / d h = −β σ(−β h) (and cDPO: −β[(1 − ε) σ(−βh) − ε σ(βh)]); h enters as
    +log πθ(y_w) and −log πθ(y_l), so those gradients are ±d loss / d h."""
    torch.manual_seed(0)
    pc, pr = (-torch.rand(7, dtype=torch.float64) * 30).requires_grad_(), (-torch.rand(7, dtype=torch.float64) * 30)
    pr.requires_grad_()
    rc, rr = -torch.rand(7, dtype=torch.float64) * 30, -torch.rand(7, dtype=torch.float64) * 30
    beta = 0.3
    h = (pc - rc - pr + rr).detach()
    for eps in (0.0, 0.2):
        losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
        g_c, g_r = torch.autograd.grad(losses.sum(), (pc, pr))
        expected = -beta * ((1 - eps) * torch.sigmoid(-beta * h) - eps * torch.sigmoid(beta * h))
        assert torch.allclose(g_c, expected, atol=1e-14) and torch.allclose(g_r, -expected, atol=1e-14)


def test_ipo_and_hinge_gradient_closed_form():
    """IPO: d/dh (h − 1/(2β))² = 2(h − 1/(2β)). hinge: d/dh max(0, 1 − βh) = −β where βh < 1, else 0."""
    h = _t(-3.0, 0.5, 2.0, 40.0).requires_grad_()
    zero = torch.zeros(4, dtype=torch.float64)
    beta = 0.1
    ipo, _, _ = dpo_loss(h, zero, zero, zero, beta=beta, loss_type="ipo")
    assert torch.allclose(torch.autograd.grad(ipo.sum(), h)[0], 2 * (h.detach() - 5.0))
    hinge, _, _ = dpo_loss(h, zero, zero, zero, beta=beta, loss_type="hinge")
    assert torch.autograd.grad(hinge.sum(), h)[0].tolist() == [-0.1, -0.1, -0.1, 0.0]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck_every_loss(loss_type):
    """Autograd through each loss equals finite differences (fp64, distinct values so sorts are stable)."""
    torch.manual_seed(1)
    pc, pr = (-torch.rand(4, dtype=torch.float64) * 5).requires_grad_(), (-torch.rand(4, dtype=torch.float64) * 5)
    pr.requires_grad_()
    rc, rr = -torch.rand(4, dtype=torch.float64) * 5, -torch.rand(4, dtype=torch.float64) * 5
    eps = {"exo_pair": 0.1, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1, "sigmoid": 0.1}.get(loss_type, 0.0)
    lengths = dict(chosen_lengths=torch.tensor([3, 1, 5, 2]), rejected_lengths=torch.tensor([2, 4, 1, 6]))
    fn = lambda a, b: dpo_loss(a, b, rc, rr, beta=0.5, loss_type=loss_type, label_smoothing=eps, **lengths)[0]
    assert torch.autograd.gradcheck(fn, (pc, pr))


# ---------------------------------------------------------------------------------------------
# Limits, symmetries, properties
# ---------------------------------------------------------------------------------------------

_logp = st.floats(min_value=-300.0, max_value=0.0, allow_nan=False)


@st.composite
def _batches(draw):
    n = draw(st.integers(1, 6))
    vals = [torch.tensor(draw(st.lists(_logp, min_size=n, max_size=n)), dtype=torch.float64) for _ in range(4)]
    lengths = [torch.tensor(draw(st.lists(st.integers(1, 50), min_size=n, max_size=n))) for _ in range(2)]
    return vals, lengths


@settings(max_examples=60, deadline=None, derandomize=True)
@given(_batches(), st.floats(0.01, 2.0), st.floats(0.0, 0.49))
def test_properties_of_the_sigmoid_family(batch, beta, eps):
    """Over random inputs: ε = 0 is plain −log σ(βh); swapping chosen and rejected swaps the
    rewards and turns cDPO-ε into cDPO-(1 − ε); −log σ(−z) + log σ(z) = z, so plain DPO's loss
    rises by exactly βh on swapping; rDPO is unbiased: (1 − ε) L̃(h) + ε L̃(−h) = −log σ(βh)."""
    (pc, pr, rc, rr), _ = batch
    h = pc - rc - (pr - rr)
    plain, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert torch.allclose(plain, -F.logsigmoid(beta * h), rtol=1e-12, atol=1e-12)
    swapped, chosen_s, rejected_s = dpo_loss(pr, pc, rr, rc, beta=beta)
    assert torch.equal(chosen_s, rejected) and torch.equal(rejected_s, chosen)
    assert torch.allclose(swapped - plain, beta * h, rtol=1e-9, atol=1e-9)
    cdpo, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    cdpo_swapped, _, _ = dpo_loss(pr, pc, rr, rc, beta=beta, label_smoothing=1.0 - eps)
    assert torch.allclose(cdpo, cdpo_swapped, rtol=1e-12, atol=1e-12)
    rob, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="robust", label_smoothing=eps)
    rob_flip, _, _ = dpo_loss(pr, pc, rr, rc, beta=beta, loss_type="robust", label_smoothing=eps)
    assert torch.allclose((1 - eps) * rob + eps * rob_flip, plain, rtol=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(_batches(), st.floats(0.01, 2.0), st.floats(-50.0, 50.0), st.sampled_from(LOSS_TYPES))
def test_properties_of_every_loss(batch, beta, shift, loss_type):
    """Over random inputs, for every loss type: finite fp32 losses even at large margins;
    rewards = β(policy − ref) exactly; shifting a policy log-prob and its reference by the same
    constant changes nothing (only log-ratios matter); per-pair losses do not depend on the rest of
    the batch (except AOT, which sorts it)."""
    (pc, pr, rc, rr), (lc, lr) = batch
    eps = 0.1 if loss_type in {"exo_pair", "robust"} else 0.0
    kw = dict(beta=beta, loss_type=loss_type, label_smoothing=eps, chosen_lengths=lc, rejected_lengths=lr)
    losses, chosen, rejected = dpo_loss(pc.float(), pr.float(), rc.float(), rr.float(), **kw)
    assert losses.dtype == torch.float32 and torch.isfinite(losses).all()
    exact, chosen64, rejected64 = dpo_loss(pc, pr, rc, rr, **kw)
    assert torch.equal(chosen64, beta * (pc - rc)) and torch.equal(rejected64, beta * (pr - rr))
    shifted, _, _ = dpo_loss(pc + shift, pr - shift, rc + shift, rr - shift, **kw)
    assert torch.allclose(shifted, exact, rtol=1e-6, atol=1e-6)
    if loss_type not in BATCHWISE:
        first = dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], **{**kw, "chosen_lengths": lc[:1], "rejected_lengths": lr[:1]})
        assert torch.allclose(first[0], exact[:1], rtol=1e-12, atol=1e-12)


def test_label_smoothing_zero_is_plain_and_reference_free_is_zero_reference():
    """ε = 0 in sigmoid/aot/robust equals plain DPO; ref None equals ref log-probs of 0."""
    torch.manual_seed(2)
    pc, pr, rc, rr = (-torch.rand(5, dtype=torch.float64) * 20 for _ in range(4))
    plain = dpo_loss(pc, pr, rc, rr, beta=0.2)[0]
    assert torch.allclose(dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type="robust")[0], plain, atol=1e-14)
    one = [t[:1] for t in (pc, pr, rc, rr)]
    assert torch.allclose(dpo_loss(*one, beta=0.2, loss_type="aot")[0], plain[:1], atol=1e-14)
    for loss_type in LOSS_TYPES:
        lengths = dict(chosen_lengths=torch.tensor([2] * 5), rejected_lengths=torch.tensor([3] * 5))
        eps = 0.1 if loss_type == "exo_pair" else 0.0
        free = dpo_loss(pc, pr, None, None, loss_type=loss_type, label_smoothing=eps, **lengths)
        zero = dpo_loss(pc, pr, torch.zeros(5), torch.zeros(5), loss_type=loss_type, label_smoothing=eps, **lengths)
        for a, b in zip(free, zero):
            assert torch.allclose(a, b, atol=1e-14), loss_type


def test_bf16_inputs_are_computed_in_fp32_and_rewards_are_detached():
    """bf16 log-probs give fp32 losses and rewards; rewards carry no gradient."""
    pc = _t(-3.0, -5.0, dtype=torch.bfloat16).requires_grad_()
    losses, chosen, _ = dpo_loss(pc, _t(-4.0, -4.0, dtype=torch.bfloat16), _t(-3.5, -4.5, dtype=torch.bfloat16),
                                 _t(-4.0, -4.0, dtype=torch.bfloat16))
    assert losses.dtype == torch.float32 and chosen.dtype == torch.float32
    assert losses.requires_grad and not chosen.requires_grad


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_bad_arguments_raise_anita_error():
    """Unknown types list the valid ones; knobs a loss ignores, bad ranges and bad shapes raise."""
    x = _t(-1.0, -2.0)
    with pytest.raises(AnitaError, match="unknown loss type 'dpo'.*'sigmoid'.*'sigmoid_norm'"):
        dpo_loss(x, x, x, x, loss_type="dpo")
    with pytest.raises(AnitaError, match="does not use label_smoothing"):
        dpo_loss(x, x, x, x, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(AnitaError, match=r"\(0, 1\)"):
        dpo_loss(x, x, x, x, loss_type="exo_pair")
    with pytest.raises(AnitaError, match=r"\[0, 0.5\)"):
        dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(AnitaError, match="needs `chosen_lengths`"):
        dpo_loss(x, x, x, x, loss_type="sigmoid_norm")
    with pytest.raises(AnitaError, match="beta must be a finite number > 0"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(AnitaError, match="discopop_tau is only used by loss 'discopop'"):
        dpo_loss(x, x, x, x, discopop_tau=0.3)
    with pytest.raises(AnitaError, match="discopop_tau must be a finite number > 0"):
        dpo_loss(x, x, x, x, loss_type="discopop", discopop_tau=0.0)
    with pytest.raises(AnitaError, match="`chosen_lengths` must be a 1-D"):
        dpo_loss(x, x, x, x, chosen_lengths=torch.ones(3), rejected_lengths=torch.ones(3))
    with pytest.raises(AnitaError, match="`ref_rejected_logps` must be a 1-D"):
        dpo_loss(x, x, x, _t(-1.0, -2.0, -3.0))
    with pytest.raises(AnitaError, match="or neither"):
        dpo_loss(x, x, x, None)
    with pytest.raises(AnitaError, match="dtype torch.int64"):
        dpo_loss(torch.tensor([1, 2]), x, x, x)
    with pytest.raises(AnitaError, match="must both be"):
        rpo_nll(torch.zeros(2, 3), torch.ones(2, 4))


def test_settings_are_checked_without_tensors():
    """check_loss_args validates a run's knobs before any log-prob exists (DPOConfig and DPOSettings
    call it); with the tensors it is the same check dpo_loss runs first."""
    check_loss_args("robust", 0.1, label_smoothing=0.2)
    check_loss_args("discopop", 0.1, discopop_tau=0.5)
    with pytest.raises(AnitaError, match=r"\[0, 0.5\)"):
        check_loss_args("robust", 0.1, label_smoothing=0.5)
    x = _t(-1.0, -2.0)
    with pytest.raises(AnitaError, match="`policy_rejected_logps` must be a 1-D"):
        check_loss_args("sigmoid", 0.1, logps=(x, _t(1.0), None, None))


if __name__ == "__main__":
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps(build_fixture(), indent=1) + "\n")
    print(f"wrote {FIXTURE}")
