"""Tests for anita/dpo/beyond_dpo.py: ORPO, SimPO and KTO as pure functions.

Evidence independent of the code under test:
  * TRL 1.16's own code, called live on random inputs when trl is installed, and through
    tests/dpo/fixtures/trl_beyond_dpo.json (TRL's outputs on fixed inputs) when it is not:
    ORPO through `ORPOTrainer.odds_ratio_loss`, SimPO through `CPOTrainer.cpo_loss` with
    loss_type="simpo", KTO through `KTOTrainer._compute_loss`. Each method is called on a minimal
    stand-in for its trainer (the attributes it reads), as tests/dpo/test_loss.py does for DPO;
    `_compute_loss` also gets a stand-in model whose per-token log-probs sum to the given sequence
    log-probs, and returns the batch mean, so per-example KTO losses come from one call per example
    (with the whole batch's mismatched log-probs, which fix z₀);
  * hand-derived values, explained in each docstring;
  * the limits the papers state, and float64 gradcheck.

Regenerate the fixture with `python tests/dpo/test_beyond_dpo.py` (needs trl).
"""

import json
import math
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from anita.dpo import dpo_loss, kto_kl, kto_loss, orpo_log_odds_ratio, orpo_loss, simpo_loss
from anita.dpo.beyond_dpo import check_preference_args, log1mexp
from anita.errors import AnitaError
from tests.dpo.test_loss import _Accelerator, _t

FIXTURE = Path(__file__).parent / "fixtures" / "trl_beyond_dpo.json"
TOL = dict(rel=1e-6, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# TRL as an oracle (the minimal accelerator stand-in of tests/dpo/test_loss.py)
# ---------------------------------------------------------------------------------------------


def trl_orpo(chosen, rejected, beta):
    """TRL's odds_ratio_loss -> (losses it *subtracts*, chosen rewards, rejected rewards, mean log σ, mean log OR)."""
    from trl.experimental.orpo import ORPOTrainer

    stub = types.SimpleNamespace(beta=beta, accelerator=_Accelerator())
    return ORPOTrainer.odds_ratio_loss(stub, torch.tensor(chosen), torch.tensor(rejected))


def trl_simpo(chosen, rejected, beta, gamma, eps):
    """TRL's cpo_loss with loss_type="simpo" (alpha = 0: no AlphaPO transform) -> (losses, rewards, rewards)."""
    from trl.experimental.cpo import CPOTrainer

    stub = types.SimpleNamespace(beta=beta, simpo_gamma=gamma, label_smoothing=eps, loss_type="simpo", alpha=0.0,
                                 accelerator=_Accelerator())
    return CPOTrainer.cpo_loss(stub, torch.tensor(chosen), torch.tensor(rejected))


def trl_kto(logps, ref_logps, labels, kl_logps, ref_kl_logps, beta, wd, wu):
    """TRL's KTOTrainer._compute_loss on N unpaired examples -> (mean loss, metrics of the batch)."""
    from trl.trainer.kto_trainer import KTOTrainer

    n = len(logps)
    log_probs = torch.zeros(n, 3)  # [N, T-1]: the whole sequence log-prob on the first answer token
    log_probs[:, 0] = torch.tensor(logps)
    outputs = types.SimpleNamespace(log_probs=log_probs, entropy=torch.zeros(n, 3), mean_logits=torch.zeros(n, 3))
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False,
        precompute_ref_logps=True, calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=wd,
        undesirable_weight=wu, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
        _compute_kl_logps=lambda model, batch: torch.tensor(kl_logps))
    completion_mask = torch.tensor([[0, 1, 1, 1]] * n)
    inputs = {"input_ids": torch.zeros(n, 4, dtype=torch.long), "attention_mask": torch.ones(n, 4, dtype=torch.long),
              "completion_mask": completion_mask, "label": torch.tensor(labels), "ref_logps": torch.tensor(ref_logps),
              "ref_KL_logps": torch.tensor(ref_kl_logps)}
    loss = KTOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, False)
    return loss.item(), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _kto_case_trl(inputs, case):
    """TRL's per-example KTO losses (desirable first, as kto_loss orders them), mean, rewards and kl."""
    args = (inputs["kl"], inputs["ref_kl"], case["beta"], case["desirable_weight"], case["undesirable_weight"])
    mean, metrics = trl_kto(inputs["logps"], inputs["ref"], inputs["labels"], *args)
    per = {True: [], False: []}
    for logp, ref, label in zip(inputs["logps"], inputs["ref"], inputs["labels"]):
        per[label].append(trl_kto([logp], [ref], [label], *args)[0])
    return {"per_example": per[True] + per[False], "mean": mean, "kl": metrics["kl"],
            "rewards/chosen": metrics["rewards/chosen"], "rewards/rejected": metrics["rewards/rejected"]}


def random_inputs(seed: int, n: int = 6) -> dict:
    """Mean per-token log-probs in (−6, 0) for ORPO/SimPO; summed log-probs and labels for KTO."""
    g = torch.Generator().manual_seed(seed)
    mean = lambda: (-torch.rand(n, generator=g) * 6 - 1e-3).tolist()  # noqa: E731
    summed = lambda: (-torch.rand(n, generator=g) * 40).tolist()  # noqa: E731
    return {"chosen": mean(), "rejected": mean(), "logps": summed(), "ref": summed(),
            "labels": [True, False, True, True, False, False][:n], "kl": summed(), "ref_kl": summed()}


CASES = {
    "orpo": [{"beta": 0.1}, {"beta": 0.5}],
    "simpo": [{"beta": 2.0, "gamma": 0.5, "eps": 0.0}, {"beta": 2.5, "gamma": 1.4, "eps": 0.0},
              {"beta": 0.1, "gamma": 0.5, "eps": 0.2}],
    "kto": [{"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
            {"beta": 0.3, "desirable_weight": 1.33, "undesirable_weight": 0.8}],
}


def trl_outputs(inputs: dict) -> dict:
    """TRL's numbers for every case on `inputs`."""
    out = {"orpo": [], "simpo": [], "kto": []}
    for case in CASES["orpo"]:
        losses, chosen_r, rejected_r, ratio, log_odds = trl_orpo(inputs["chosen"], inputs["rejected"], case["beta"])
        out["orpo"].append({**case, "losses": losses.tolist(), "chosen_rewards": chosen_r.tolist(),
                            "rejected_rewards": rejected_r.tolist(), "log_odds_ratio": ratio.item(),
                            "log_odds_chosen": log_odds.item()})
    for case in CASES["simpo"]:
        losses, chosen_r, rejected_r = trl_simpo(inputs["chosen"], inputs["rejected"], case["beta"], case["gamma"],
                                                 case["eps"])
        out["simpo"].append({**case, "losses": losses.tolist(), "chosen_rewards": chosen_r.tolist(),
                             "rejected_rewards": rejected_r.tolist()})
    out["kto"] = [{**case, **_kto_case_trl(inputs, case)} for case in CASES["kto"]]
    return out


def build_fixture() -> dict:
    import trl

    inputs = random_inputs(0)
    return {"trl_version": trl.__version__, "inputs": inputs, **trl_outputs(inputs)}


def assert_matches(inputs: dict, expected: dict) -> None:
    """anita's three losses on `inputs` equal TRL's numbers `expected` to 1e-6."""
    chosen, rejected = torch.tensor(inputs["chosen"]), torch.tensor(inputs["rejected"])
    for case in expected["orpo"]:
        losses, chosen_r, rejected_r = orpo_loss(chosen, rejected, case["beta"])
        assert (-losses).tolist() == pytest.approx(case["losses"], **TOL)  # TRL returns the term it subtracts
        assert chosen_r.tolist() == pytest.approx(case["chosen_rewards"], **TOL)
        assert rejected_r.tolist() == pytest.approx(case["rejected_rewards"], **TOL)
        log_odds = orpo_log_odds_ratio(chosen, rejected)
        assert log_odds.mean().item() == pytest.approx(case["log_odds_chosen"], **TOL)
        assert F.logsigmoid(log_odds).mean().item() == pytest.approx(case["log_odds_ratio"], **TOL)
    for case in expected["simpo"]:
        losses, chosen_r, rejected_r = simpo_loss(chosen, rejected, case["beta"], case["gamma"], case["eps"])
        assert losses.tolist() == pytest.approx(case["losses"], **TOL)
        assert chosen_r.tolist() == pytest.approx(case["chosen_rewards"], **TOL)
        assert rejected_r.tolist() == pytest.approx(case["rejected_rewards"], **TOL)
    logps, ref, labels = torch.tensor(inputs["logps"]), torch.tensor(inputs["ref"]), torch.tensor(inputs["labels"])
    kl = kto_kl(torch.tensor(inputs["kl"]), torch.tensor(inputs["ref_kl"]))
    for case in expected["kto"]:
        assert kl.item() == pytest.approx(case["kl"], **TOL)
        losses, chosen_r, rejected_r = kto_loss(logps[labels], logps[~labels], ref[labels], ref[~labels], kl,
                                                case["beta"], case["desirable_weight"], case["undesirable_weight"])
        assert losses.tolist() == pytest.approx(case["per_example"], **TOL)
        assert losses.mean().item() == pytest.approx(case["mean"], **TOL)
        assert chosen_r.mean().item() == pytest.approx(case["rewards/chosen"], **TOL)
        assert rejected_r.mean().item() == pytest.approx(case["rewards/rejected"], **TOL)


def test_matches_trl_fixture():
    """anita == TRL 1.16's stored outputs for ORPO, SimPO and KTO (no trl needed)."""
    fixture = json.loads(FIXTURE.read_text())
    assert fixture["trl_version"].startswith("1.16")
    assert {len(fixture[k]) for k in CASES} == {2, 3}
    assert_matches(fixture["inputs"], fixture)


def test_fixture_is_current_trl_output(trl_available):
    stored = json.loads(FIXTURE.read_text())
    fresh = trl_outputs(stored["inputs"])
    for name in CASES:
        for old, new in zip(stored[name], fresh[name], strict=True):
            for key, value in old.items():
                assert new[key] == pytest.approx(value, **TOL), (name, key)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_matches_live_trl_on_random_inputs(trl_available, seed):
    """anita == TRL 1.16 called live, on seeded random log-probs, for every case of CASES."""
    inputs = random_inputs(seed)
    assert_matches(inputs, trl_outputs(inputs))


def test_kto_with_a_negative_kl_estimate_matches_trl(trl_available):
    """When the mismatched pairs give a negative estimate, TRL clamps z₀ at 0, and so does anita."""
    inputs = random_inputs(4)
    inputs["kl"] = [x - 50.0 for x in inputs["ref_kl"]]  # policy far below the reference on y'
    expected = trl_outputs(inputs)
    assert expected["kto"][0]["kl"] == 0.0
    assert_matches(inputs, expected)


# ---------------------------------------------------------------------------------------------
# Hand-derived values
# ---------------------------------------------------------------------------------------------


def test_orpo_hand_value():
    """P_w = ½ and P_l = ¼: odds 1 and ⅓, log OR = ln 3, loss β·ln(1 + ⅓) = β ln(4/3)."""
    losses, chosen_r, rejected_r = orpo_loss(_t(math.log(0.5)), _t(math.log(0.25)), 0.2)
    assert losses.item() == pytest.approx(0.2 * math.log(4 / 3), rel=1e-12)
    assert orpo_log_odds_ratio(_t(math.log(0.5)), _t(math.log(0.25))).item() == pytest.approx(math.log(3.0))
    assert chosen_r.item() == pytest.approx(0.2 * math.log(0.5)) and rejected_r.item() == pytest.approx(0.2 * math.log(0.25))


def test_log1mexp_is_accurate_on_both_branches():
    """log(1 − eˣ) against float64 math at points near 0, near −ln 2 and far below."""
    xs = [-1e-10, -1e-3, -0.5, -math.log(2.0), -0.7, -5.0, -40.0]
    expected = [math.log(-math.expm1(x)) for x in xs]
    assert log1mexp(_t(*xs)).tolist() == pytest.approx(expected, rel=1e-14)


def test_simpo_hand_value():
    """β = 2, γ = 1, l_w = −1, l_l = −2: z = 2·1 − 1 = 1, loss ln(1 + e⁻¹); with ε = ¼ it is
    ¾ ln(1 + e⁻¹) + ¼ ln(1 + e)."""
    losses, chosen_r, _ = simpo_loss(_t(-1.0), _t(-2.0), 2.0, 1.0)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-12)
    assert chosen_r.item() == -2.0
    smoothed, _, _ = simpo_loss(_t(-1.0), _t(-2.0), 2.0, 1.0, 0.25)
    assert smoothed.item() == pytest.approx(0.75 * math.log1p(math.exp(-1.0)) + 0.25 * math.log1p(math.e), rel=1e-12)


def test_kto_hand_values():
    """β = 1, z₀ = 0.5: a desirable example with ρ = 0.5 sits at the reference point, loss
    w_d(1 − σ(0)) = w_d/2; an undesirable one with ρ = 0.5 − ln 3 has v = ln 3, loss w_u(1 − ¾) = w_u/4.
    The sizes differ (2 desirable, 1 undesirable) and the losses come desirable first."""
    pc, rc = _t(-10.0, -3.0), _t(-10.5, -3.5)  # ρ_w = 0.5, 0.5
    pr, rr = _t(-20.0), _t(-20.5 + math.log(3.0))  # ρ_l = 0.5 − ln 3
    losses, chosen_r, rejected_r = kto_loss(pc, pr, rc, rr, 0.5, 1.0, desirable_weight=2.0, undesirable_weight=0.8)
    assert losses.tolist() == pytest.approx([1.0, 1.0, 0.2], rel=1e-12)
    assert chosen_r.tolist() == pytest.approx([0.5, 0.5]) and rejected_r.item() == pytest.approx(0.5 - math.log(3.0))


def test_kto_takes_empty_sides_and_detaches_and_clamps_the_reference_point():
    """Only desirable examples is fine; z₀ < 0 acts as 0; no gradient flows into z₀."""
    pc = _t(-3.0, -4.0).requires_grad_()
    kl = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.float64)
    losses, _, rejected_r = kto_loss(pc, empty, _t(-3.0, -4.0), empty, kl, 0.1)
    assert losses.tolist() == [0.5, 0.5] and rejected_r.numel() == 0
    losses.sum().backward()
    assert kl.grad is None and pc.grad is not None
    assert kto_kl(_t(-5.0, -6.0), _t(-4.0, -4.0)).item() == 0.0  # mean −1.5, clamped
    assert kto_kl(_t(-5.0, -6.0), _t(-6.0, -6.0)).item() == 0.5


# ---------------------------------------------------------------------------------------------
# Limits the papers state, and gradcheck
# ---------------------------------------------------------------------------------------------


def test_simpo_tends_to_reference_free_dpo_as_gamma_goes_to_zero():
    """Meng et al. §3: SimPO is DPO's logistic loss on length-normalised, reference-free rewards plus
    a margin γ. At γ = 0 it equals reference-free `sigmoid` DPO on the mean log-probs, and
    reference-free `sigmoid_norm` on summed log-probs with lengths; |∂L/∂γ| = σ(−z) ≤ 1, so
    |L(γ) − L(0)| ≤ γ, and the gap closes as γ → 0."""
    torch.manual_seed(0)
    lengths_w, lengths_l = torch.randint(1, 30, (8,)), torch.randint(1, 30, (8,))
    summed_w, summed_l = -torch.rand(8, dtype=torch.float64) * 60, -torch.rand(8, dtype=torch.float64) * 60
    mean_w, mean_l = summed_w / lengths_w, summed_l / lengths_l
    at_zero, _, _ = simpo_loss(mean_w, mean_l, 2.0, 0.0)
    assert torch.allclose(at_zero, dpo_loss(mean_w, mean_l, None, None, beta=2.0)[0], atol=1e-14)
    norm, _, _ = dpo_loss(summed_w, summed_l, None, None, beta=2.0, loss_type="sigmoid_norm",
                          chosen_lengths=lengths_w, rejected_lengths=lengths_l)
    assert torch.allclose(at_zero, norm, atol=1e-14)
    gaps = [(simpo_loss(mean_w, mean_l, 2.0, g)[0] - at_zero).abs().max().item() for g in (1.0, 0.1, 0.01, 0.001)]
    assert all(0 < gap <= g * (1 + 1e-9) for gap, g in zip(gaps, (1.0, 0.1, 0.01, 0.001)))
    assert gaps == sorted(gaps, reverse=True)


def test_orpo_odds_ratio_becomes_the_probability_ratio_for_unlikely_answers():
    """Hong et al. §7.1 compare the odds ratio with the probability ratio P_w/P_l: as P → 0,
    odds = P/(1 − P) → P, so log OR → l_w − l_l and ORPO's term becomes reference-free DPO
    (`sigmoid` with β = 1) weighted by λ; for likely answers the odds ratio is larger."""
    l_w, l_l = _t(-30.0, -25.0), _t(-31.0, -24.0)
    assert torch.allclose(orpo_log_odds_ratio(l_w, l_l), l_w - l_l, atol=1e-10)
    orpo, _, _ = orpo_loss(l_w, l_l, 0.1)
    assert torch.allclose(orpo, 0.1 * dpo_loss(l_w, l_l, None, None, beta=1.0)[0], atol=1e-10)
    likely_w, likely_l = _t(-0.1), _t(-0.2)  # odds 9.5 and 4.5: log OR 0.75 > log PR 0.1
    assert orpo_log_odds_ratio(likely_w, likely_l).item() > (likely_w - likely_l).item() * 7


def test_kto_at_zero_reference_point_is_apo_zero():
    """With z₀ = 0 and one desirable and one undesirable answer per prompt, KTO's two losses add up
    to APO-zero's: (1 − σ(βρ_w)) + (1 − σ(−βρ_l)) = (1 − σ(r_w)) + σ(r_l)."""
    torch.manual_seed(1)
    pc, pr, rc, rr = (-torch.rand(5, dtype=torch.float64) * 30 for _ in range(4))
    kto, _, _ = kto_loss(pc, pr, rc, rr, 0.0, 0.3)
    apo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type="apo_zero")
    assert torch.allclose(kto[:5] + kto[5:], apo, atol=1e-14)


def test_gradcheck_orpo_simpo_kto():
    """Autograd through each loss equals finite differences in fp64 (KTO with unequal sides)."""
    torch.manual_seed(3)
    l_w, l_l = ((-torch.rand(4, dtype=torch.float64) * 3 - 0.05).requires_grad_() for _ in range(2))
    assert torch.autograd.gradcheck(lambda a, b: orpo_loss(a, b, 0.3)[0], (l_w, l_l))
    assert torch.autograd.gradcheck(lambda a, b: simpo_loss(a, b, 2.0, 0.7, 0.1)[0], (l_w, l_l))
    pc, pr = (-torch.rand(3, dtype=torch.float64) * 9).requires_grad_(), (-torch.rand(2, dtype=torch.float64) * 9)
    pr.requires_grad_()
    rc, rr = -torch.rand(3, dtype=torch.float64) * 9, -torch.rand(2, dtype=torch.float64) * 9
    assert torch.autograd.gradcheck(lambda a, b: kto_loss(a, b, rc, rr, 0.4, 0.5, 1.2, 0.9)[0], (pc, pr))


def test_bf16_inputs_compute_in_fp32():
    x, y = _t(-1.0, -2.0, dtype=torch.bfloat16), _t(-1.5, -1.0, dtype=torch.bfloat16)
    assert orpo_loss(x, y, 0.1)[0].dtype == torch.float32
    assert simpo_loss(x, y, 2.0, 0.5)[0].dtype == torch.float32
    assert kto_loss(x, y, x, y, 0.0, 0.1)[0].dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_bad_arguments_raise_one_clear_error():
    x = _t(-1.0, -2.0)
    with pytest.raises(AnitaError, match="orpo_loss: beta must be a finite number > 0"):
        orpo_loss(x, x, 0.0)
    with pytest.raises(AnitaError, match="orpo_loss: `policy_rejected_logps` must be a 1-D"):
        orpo_loss(x, _t(-1.0), 0.1)
    with pytest.raises(AnitaError, match="simpo_gamma .* must be >= 0"):
        simpo_loss(x, x, 2.0, -0.5)
    with pytest.raises(AnitaError, match=r"label_smoothing must lie in \[0, 1\]"):
        simpo_loss(x, x, 2.0, 0.5, 1.5)
    with pytest.raises(AnitaError, match="kto_loss: `ref_chosen_logps` must be a 1-D"):
        kto_loss(x, x, _t(-1.0), x, 0.0, 0.1)
    with pytest.raises(AnitaError, match="`kl` must be a finite number"):
        kto_loss(x, x, x, x, None, 0.1)
    with pytest.raises(AnitaError, match="must be finite numbers > 0"):
        kto_loss(x, x, x, x, 0.0, 0.1, desirable_weight=0.0)
    empty = torch.zeros(0)
    with pytest.raises(AnitaError, match="no examples"):
        kto_loss(empty, empty, empty, empty, 0.0, 0.1)
    with pytest.raises(AnitaError, match="dtype torch.int64"):
        simpo_loss(torch.tensor([1, 2]), x, 2.0, 0.5)


def test_run_settings_are_checked_for_all_seventeen_losses():
    """check_preference_args refuses a knob given to a loss that does not read it, for every type."""
    check_preference_args("simpo", 2.0, simpo_gamma=1.0, label_smoothing=0.1)
    check_preference_args("kto", 0.1, desirable_weight=1.33)
    check_preference_args("robust", 0.1, label_smoothing=0.2)
    with pytest.raises(AnitaError, match="simpo_gamma is only used by loss 'simpo', not 'sigmoid'"):
        check_preference_args("sigmoid", 0.1, simpo_gamma=1.0)
    with pytest.raises(AnitaError, match="only used by loss 'kto', not 'orpo'"):
        check_preference_args("orpo", 0.1, undesirable_weight=2.0)
    with pytest.raises(AnitaError, match="'kto' does not use label_smoothing"):
        check_preference_args("kto", 0.1, label_smoothing=0.1)
    with pytest.raises(AnitaError, match="discopop_tau is only used"):
        check_preference_args("orpo", 0.1, discopop_tau=0.5)
    with pytest.raises(AnitaError, match=r"unknown loss type 'dpo'.*'kto'"):
        check_preference_args("dpo", 0.1)


if __name__ == "__main__":
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps(build_fixture(), indent=1) + "\n")
    print(f"wrote {FIXTURE}")


@pytest.mark.parametrize("near_zero", [-1e-9, -1e-30, 0.0])
def test_orpo_gradient_is_finite_for_a_nearly_certain_answer(near_zero):
    """A short chosen answer the NLL term drives to certainty (mean log-prob → 0) must not give a NaN
    gradient: log1mexp feeds each branch only its own values, and the log-odds keep l below −1e-6."""
    chosen = torch.tensor([near_zero, -0.5], requires_grad=True)
    rejected = torch.tensor([-1.0, -2.0], requires_grad=True)
    losses, _, _ = orpo_loss(chosen, rejected, beta=0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    x = torch.tensor([-1e-3, -0.5, -0.6931, -0.7, -30.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(log1mexp, (x,))
