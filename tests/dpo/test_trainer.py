"""Tests for anita/dpo/trainer.py and anita/dpo/cli.py: the DPO step against the plain full-logits
computation and against TRL's DPOTrainer on the same batch, the RPO and reference-free modes,
and `anita dpo` on the shared loop (loss down, held-out reward accuracy up, the three reference
modes agreeing at step 0, metrics and plots written).

Tiny models and data made here; the byte tokenizer of tests/train/conftest.py (one token per byte).
"""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from anita.cli import main
from anita.dpo import DPOConfig, dpo_loss
from anita.dpo.data import PreferenceBatches, read_preferences
from anita.dpo.reference import AdaptersOff, ReferenceFree
from anita.dpo.logps import concatenated_logps
from anita.dpo.trainer import METRICS, DPOSettings, dpo_step
from anita.errors import AnitaError
from anita.lora import LoraConfig, apply_lora, disable_lora, lora_parameters, merge_lora, save_adapter
from anita.model import Llama, from_pretrained, save_pretrained
from tests.train.conftest import byte_tokenizer, tiny_run_model, write_jsonl  # noqa: F401 (fixtures)

LN2 = torch.tensor(math.log(2)).item()
ROWS = [{"prompt": "ciao", "chosen": "buongiorno", "rejected": "boh"},
        {"prompt": "2+2?", "chosen": "4", "rejected": "cinque"},
        {"prompt": [{"role": "user", "content": "mare o monti?"}], "chosen": "mare", "rejected": "monti, forse"}]


def lora_model(path, seed: int = 1, scale: float = 0.3) -> Llama:
    """The tiny model with an adapter of random (non-zero) values, so that policy != reference."""
    model = from_pretrained(path)
    torch.manual_seed(0)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture
def batch(tmp_path, byte_tokenizer):
    data = read_preferences(write_jsonl(tmp_path / "p.jsonl", ROWS), byte_tokenizer, max_length=64)
    return PreferenceBatches(data, batch_size=3, pad_id=byte_tokenizer.pad_id, shuffle=False)[0]


def naive_logps(model, batch):
    """The [2B, T, V] way: full logits, log_softmax, gather the next token, sum over answer tokens."""
    ids, mask = batch["input_ids"], batch["completion_mask"]
    logits = model(ids)[:, :-1].float()  # [2B, T-1, V] position t predicts token t+1
    token = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # [2B, T-1]
    scored = mask[:, 1:].bool()
    return (token * scored).sum(-1), scored, logits


def test_concatenated_logps_equal_the_full_logits_computation(tiny_run_model, batch):
    """Sums, lengths and TRL's logits/* metric equal the naive computation (rows of unequal
    lengths, so padding is exercised); the chunk size does not change the numbers."""
    model = lora_model(tiny_run_model)
    with torch.no_grad():
        out = concatenated_logps(model, batch, chunk_size=7)
        sums, scored, logits = naive_logps(model, batch)
    assert torch.allclose(out.chosen, sums[:3], atol=1e-5, rtol=0)
    assert torch.allclose(out.rejected, sums[3:], atol=1e-5, rtol=0)
    assert out.chosen_lengths.tolist() == [len("buongiorno") + 1, 2, len("mare") + 1]  # answer + <|eot_id|>
    assert out.rejected_lengths.tolist() == [len("boh") + 1, len("cinque") + 1, len("monti, forse") + 1]
    mean_logit = logits.mean(-1)  # [2B, T-1]
    assert math.isclose(out.chosen_mean_logit, mean_logit[:3][scored[:3]].mean().item(), abs_tol=1e-6)
    assert math.isclose(out.rejected_mean_logit, mean_logit[3:][scored[3:]].mean().item(), abs_tol=1e-6)
    with torch.no_grad():
        other = concatenated_logps(model, batch, chunk_size=1000)
    assert torch.allclose(other.chosen, out.chosen, atol=1e-5, rtol=0)


def test_step_gradient_equals_the_full_logits_formulation(tiny_run_model, batch):
    """d(Σ −log σ(β h))/d(adapter) through the chunked path equals autograd through full logits."""
    model = lora_model(tiny_run_model)
    params = lora_parameters(model)
    loss_sum, count, _ = dpo_step(model, batch, DPOSettings(beta=0.5), AdaptersOff())
    ours = torch.autograd.grad(loss_sum, params)
    with torch.no_grad(), disable_lora(model):
        ref, _, _ = naive_logps(model, batch)
    policy, _, _ = naive_logps(model, batch)
    h = (policy[:3] - ref[:3]) - (policy[3:] - ref[3:])
    naive = -torch.nn.functional.logsigmoid(0.5 * h).sum()
    assert count == 3 and math.isclose(loss_sum.item(), naive.item(), rel_tol=1e-5)
    for a, b in zip(ours, torch.autograd.grad(naive, params)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_rpo_adds_alpha_times_the_chosen_nll(tiny_run_model, batch):
    """RPO: loss_sum(α) = loss_sum(0) + α · B · (−Σ chosen token log-probs / chosen tokens)."""
    model = lora_model(tiny_run_model)
    with torch.no_grad():
        plain, _, _ = dpo_step(model, batch, DPOSettings(), AdaptersOff())
        rpo, _, metrics = dpo_step(model, batch, DPOSettings(rpo_alpha=0.5), AdaptersOff())
        out = concatenated_logps(model, batch)
    nll = -out.chosen.sum() / out.chosen_lengths.sum()
    assert math.isclose(metrics["nll_loss"], nll.item(), rel_tol=1e-5)
    assert math.isclose(rpo.item(), plain.item() + 0.5 * 3 * nll.item(), rel_tol=1e-5)


def test_reference_free_rewards_are_the_policy_logps(tiny_run_model, batch):
    model = lora_model(tiny_run_model)
    with torch.no_grad():
        _, _, metrics = dpo_step(model, batch, DPOSettings(beta=0.2), ReferenceFree())
        out = concatenated_logps(model, batch)
    assert math.isclose(metrics["rewards/chosen"], 0.2 * out.chosen.mean().item(), rel_tol=1e-5)
    assert math.isclose(metrics["rewards/margins"], 0.2 * (out.chosen - out.rejected).mean().item(), rel_tol=1e-5)


def test_settings_are_checked_up_front():
    with pytest.raises(AnitaError, match="DPOSettings: unknown loss type 'dpo'"):
        DPOSettings(loss_type="dpo")
    with pytest.raises(AnitaError, match="beta must be a finite number > 0"):
        DPOSettings(beta=0.0)
    with pytest.raises(AnitaError, match="does not use label_smoothing"):
        DPOSettings(loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(AnitaError, match="rpo_alpha"):
        DPOSettings(rpo_alpha=-1.0)
    with pytest.raises(AnitaError, match="discopop_tau is only used by loss 'discopop'"):
        DPOSettings(discopop_tau=0.2)



def test_settings_are_checked_once_where_they_are_built(monkeypatch, tiny_run_model, batch):
    """One settings object: a bad knob fails when `DPOSettings` is built (from a run's config, the
    message starts with its source and names the field, as its flag and config key spell it), and
    `dpo_step` never checks the knobs again: with every checker made to fail, the steps still run."""
    with pytest.raises(AnitaError, match=r"^command line: label_smoothing for loss 'robust' must lie in \[0, 0.5\)"):
        DPOConfig(model="m", data="d", output="o", loss="robust", label_smoothing=0.5).validate("command line")
    with pytest.raises(AnitaError, match="^c.toml: beta must be a finite number > 0, got 0.0"):
        DPOConfig(model="m", data="d", output="o", beta=0.0).settings("c.toml")
    with pytest.raises(AnitaError, match="^c.toml: unknown loss type 'dpo'"):
        DPOSettings(loss_type="dpo", source="c.toml")
    settings = [DPOSettings(beta=0.5), DPOSettings(loss_type="orpo"), DPOSettings(loss_type="simpo")]

    def fail(*args, **kwargs):
        raise AssertionError("a knob checked again inside the step")

    import anita.dpo.beyond_dpo
    import anita.dpo.loss

    monkeypatch.setattr(anita.dpo.loss, "check_loss_args", fail)
    monkeypatch.setattr(anita.dpo.beyond_dpo, "check_preference_args", fail)
    model = lora_model(tiny_run_model)
    with torch.no_grad():
        for s in settings:
            reference = ReferenceFree() if s.loss_type in ("orpo", "simpo") else AdaptersOff()
            loss_sum, B, _ = dpo_step(model, batch, s, reference)
            assert B == 3 and torch.isfinite(loss_sum)
    with pytest.raises(AssertionError, match="checked again"):  # the checker is the one the losses call
        dpo_loss(torch.zeros(2), torch.zeros(2), None, None)

@pytest.mark.parametrize("settings, message", [
    (dict(beta=float("inf")), "beta must be a finite number > 0, got inf"),  # every loss NaN at step 1 (issue 18)
    (dict(beta=float("nan")), "beta must be a finite number > 0, got nan"),
    (dict(rpo_alpha=float("inf")), "rpo_alpha must be a finite number >= 0, got inf"),
    (dict(loss_type="kto", desirable_weight=float("inf")), "must be finite numbers > 0"),
    (dict(loss_type="discopop", discopop_tau=float("inf")), "discopop_tau must be a finite number > 0"),
])
def test_non_finite_settings_are_refused(settings, message):
    with pytest.raises(AnitaError, match=message):
        DPOSettings(**settings)
    loss = settings.pop("loss_type", "sigmoid")
    [(field, value)] = settings.items()
    with pytest.raises(AnitaError, match=f"config: '{field}' must be a finite number, got {value}"):  # a run's config
        DPOConfig(model="m", data="d", output="o", loss=loss, **settings).validate()


def test_discopop_tau_reaches_the_loss(tiny_run_model, batch):
    """--discopop-tau is a run setting (DPOConfig -> DPOSettings -> dpo_loss): the step's loss is
    dpo_loss with that τ, and differs from the default τ's."""
    model = lora_model(tiny_run_model)
    cfg = DPOConfig(model="m", data="d", output="o", loss="discopop", discopop_tau=0.5).validate()
    settings = cfg.settings()
    with torch.no_grad():
        for p in lora_parameters(model):  # move the policy off the reference so the margin is not 0
            p.add_(0.05 * torch.randn_like(p))
        loss_sum, count, _ = dpo_step(model, batch, settings, AdaptersOff())
        out = concatenated_logps(model, batch)
        ref_c, ref_r = AdaptersOff().logps(model, batch, settings.chunk_size)
        want = dpo_loss(out.chosen, out.rejected, ref_c, ref_r, beta=0.1, loss_type="discopop", discopop_tau=0.5)[0]
        default = dpo_loss(out.chosen, out.rejected, ref_c, ref_r, beta=0.1, loss_type="discopop")[0]
    assert math.isclose(loss_sum.item(), want.sum().item(), rel_tol=1e-6)
    assert not math.isclose(want.sum().item(), default.sum().item(), rel_tol=1e-6)
    with pytest.raises(AnitaError, match="command line: discopop_tau is only used by loss 'discopop'"):
        DPOConfig(model="m", data="d", output="o", discopop_tau=0.5).validate("command line")
    with pytest.raises(AnitaError, match="c.toml: discopop_tau is only used by loss 'discopop', not 'sigmoid'"):
        DPOConfig(model="m", data="d", output="o").validate("c.toml", given={"discopop_tau"})


@pytest.mark.parametrize("loss_type,rpo_alpha", [("sigmoid", None), ("ipo", None), ("sigmoid", 0.7)])
def test_step_agrees_with_trl_dpo_trainer(tmp_path, tiny_run_model, batch, loss_type, rpo_alpha):
    """TRL 1.16's DPOTrainer, given the same batch, a transformers copy of the policy (the adapter
    merged in) and the base as its reference, computes the same loss and the same eight metrics."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    model = lora_model(tiny_run_model)
    settings = DPOSettings(beta=0.3, loss_type=loss_type, rpo_alpha=rpo_alpha)
    with torch.no_grad():
        loss_sum, count, ours = dpo_step(model, batch, settings, AdaptersOff())
    save_pretrained(merge_lora(model), tmp_path / "merged")
    hf = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)  # noqa: E731
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tiny_run_model / "tokenizer.json"),
                                  eos_token="<|end_of_text|>", pad_token="<|end_of_text|>")
    losses = [loss_type] + (["sft"] if rpo_alpha else [])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], beta=0.3, loss_type=losses,
                     loss_weights=[1.0, rpo_alpha] if rpo_alpha else None, use_cpu=True, bf16=False)
    rows = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    trainer = DPOTrainer(model=hf(tmp_path / "merged"), ref_model=hf(tiny_run_model), args=args,
                         train_dataset=rows, processing_class=tok)
    trainer.model.train()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    with torch.no_grad():
        theirs_loss = trainer.compute_loss(trainer.model, inputs)
    theirs = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert math.isclose((loss_sum / count).item(), theirs_loss.item(), rel_tol=1e-5, abs_tol=1e-6)
    for key in METRICS:
        assert math.isclose(ours[key], theirs[key], rel_tol=1e-4, abs_tol=1e-5), key


# ------------------------------------------------------------------------------- anita dpo
def toy_rows(n: int, offset: int = 0) -> list[dict]:
    """A trivially separable preference: the chosen answer always starts "si", the rejected "no"."""
    words = ["mare", "sole", "pane", "vino", "luna", "gatto", "cane", "fiore", "casa", "treno"]
    return [{"prompt": f"{words[(i + offset) % 10]} {i + offset}?", "chosen": f"si, {words[i % 10]}",
             "rejected": f"no, {words[(i + 3) % 10]}"} for i in range(n)]


def run_cli(tmp_path, model_dir, name: str, *extra) -> list[dict]:
    out = tmp_path / name
    fresh = [] if "--adapter" in extra else ["--lora-r", "4", "--lora-alpha", "8"]  # an adapter keeps its own
    argv = ["dpo", "--model", str(model_dir), "--data", str(tmp_path / "train.jsonl"), "--output", str(out),
            "--optimizer", "adamw", "--batch-size", "4", "--grad-accum", "1", "--max-length", "64",
            "--max-prompt-length", "48", *fresh, "--no-progress", "--reference-cache", str(tmp_path / "cache"), *extra]
    assert main(argv) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_cli_learns_a_separable_preference(tmp_path, tiny_run_model):
    """10 steps on 8 toy pairs (β = 1): the training loss falls from ln 2, the held-out reward
    accuracy goes from 0 (all rewards 0 at step 0) to 1 and the held-out margin grows; every TRL
    metric, tokens/s and peak memory are in metrics.jsonl; both plots and the adapter are written."""
    write_jsonl(tmp_path / "train.jsonl", toy_rows(8))
    write_jsonl(tmp_path / "eval.jsonl", toy_rows(8, offset=100))
    records = run_cli(tmp_path, tiny_run_model, "run", "--eval-data", str(tmp_path / "eval.jsonl"), "--beta", "1",
                      "--max-steps", "10", "--lr", "0.02", "--warmup-ratio", "0", "--eval-steps", "5")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert train[0]["loss"] == LN2 and train[-1]["loss"] < 0.3
    assert set(METRICS) | {"tokens_per_s", "peak_mem_mb", "lr", "grad_norm"} <= set(train[0])
    assert [r["step"] for r in evals] == [0, 5, 10]
    assert evals[0]["eval_rewards/accuracies"] == 0.0 and evals[-1]["eval_rewards/accuracies"] == 1.0
    margins = [r["eval_rewards/margins"] for r in evals]
    assert margins[0] == 0.0 < margins[1] < margins[2]
    for name in ("dpo_curves.png", "training_curves.png", "adapter/adapter_model.safetensors"):
        assert (tmp_path / "run" / name).is_file(), name


def test_dpo_cli_trains_bf16_adapters(tmp_path, tiny_run_model):
    """`anita dpo --adapter-dtype bf16` (TRL's DPOTrainer casts a 4-bit model's adapters to bf16):
    the loss starts at ln 2 and falls, and the exported adapter is bf16."""
    from safetensors.torch import load_file

    write_jsonl(tmp_path / "train.jsonl", toy_rows(8))
    records = run_cli(tmp_path, tiny_run_model, "run", "--adapter-dtype", "bf16", "--beta", "1", "--max-steps", "6",
                      "--lr", "0.02", "--warmup-ratio", "0")
    train = [r for r in records if "loss" in r]
    assert train[0]["loss"] == LN2 and train[-1]["loss"] < 0.5
    tensors = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())


def test_three_reference_modes_agree_at_step_zero_from_the_cli(tmp_path, tiny_run_model, capsys):
    """adapters-off and precomputed (fresh adapter), and with an SFT adapter: adapter and
    precomputed. Each first step logs loss ln 2 and rewards 0; a second precomputed run reads
    the cache instead of computing it."""
    write_jsonl(tmp_path / "train.jsonl", toy_rows(8))
    save_adapter(lora_model(tiny_run_model), tmp_path / "sft-adapter")
    runs = {"off": [], "pre": ["--reference", "precomputed"],
            "sft": ["--adapter", str(tmp_path / "sft-adapter")],
            "sft-pre": ["--adapter", str(tmp_path / "sft-adapter"), "--reference", "precomputed"],
            "pre-again": ["--reference", "precomputed"]}
    for name, extra in runs.items():
        first = run_cli(tmp_path, tiny_run_model, name, "--max-steps", "1", *extra)[0]
        assert first["loss"] == LN2, name
        assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0, name
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # fresh base and SFT adapter
    out = capsys.readouterr().out
    assert (out.count("written to"), out.count("read from")) == (2, 1)


def test_cli_refuses_the_bare_base_as_reference_for_an_sft_adapter(tmp_path, tiny_run_model, capsys):
    write_jsonl(tmp_path / "train.jsonl", toy_rows(4))
    argv = ["dpo", "--model", str(tiny_run_model), "--data", str(tmp_path / "train.jsonl"), "--output",
            str(tmp_path / "o"), "--adapter", str(tmp_path), "--reference", "adapters-off"]
    assert main(argv) == 2
    assert "would score the policy against the bare base" in capsys.readouterr().err
    assert main(argv[:7] + ["--loss", "nope"]) == 2  # argparse's own error, returned by main
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_config_file_sets_dpo_keys(tmp_path):
    """--config TOML with DPO keys; flags given on the command line win over the file."""
    import argparse

    from anita.dpo import DPOConfig
    from anita.train.config import add_config_arguments, config_from_args

    (tmp_path / "c.toml").write_text('model = "m"\ndata = "d"\noutput = "o"\nbeta = 0.25\nloss = "ipo"\n'
                                     'max-prompt-length = 100\nreference = "precomputed"\n')
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, DPOConfig)
    cfg = config_from_args(parser.parse_args(["--config", str(tmp_path / "c.toml"), "--beta", "0.5"]), DPOConfig)
    assert (cfg.beta, cfg.loss, cfg.max_prompt_length, cfg.reference_kind()) == (0.5, "ipo", 100, "precomputed")
    assert (cfg.lora_r, cfg.lora_alpha, cfg.rslora, cfg.lr, cfg.max_length) == (16, 8.0, False, 5e-5, 1024)
    assert (cfg.grad_accum, cfg.warmup_steps, cfg.optimizer) == (1, 0, "adamw")  # TRL's; the recipe's in its TOML


def test_resume_keeps_the_sft_adapter_as_reference(tmp_path, tiny_run_model):
    """A run continuing an SFT adapter, cut after its step-2 checkpoint and resumed, ends with the
    same adapter as the uninterrupted run: the frozen reference is the SFT adapter read at start,
    not the checkpoint's trained adapter that resuming loads."""
    write_jsonl(tmp_path / "train.jsonl", toy_rows(8))
    save_adapter(lora_model(tiny_run_model), tmp_path / "sft-adapter")
    extra = ["--adapter", str(tmp_path / "sft-adapter"), "--max-steps", "4", "--save-steps", "2", "--lr", "0.01"]
    run_cli(tmp_path, tiny_run_model, "whole", *extra)
    run_cli(tmp_path, tiny_run_model, "cut", *extra)
    cut = tmp_path / "cut"
    for path in [max((cut / "checkpoints").iterdir()), cut / "adapter"]:  # as if killed before step 4's save
        shutil.rmtree(path)
    records = run_cli(tmp_path, tiny_run_model, "cut", *extra, "--resume")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(cut / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_dpo_trains_with_only_max_length_set(tmp_path, tiny_run_model):
    """`anita dpo --max-length 128` and no other length flag trains: the prompt limit is not a fixed
    512 that a short max_length would contradict (TRL 1.16: no separate prompt limit)."""
    write_jsonl(tmp_path / "train.jsonl", toy_rows(4))
    argv = ["dpo", "--model", str(tiny_run_model), "--data", str(tmp_path / "train.jsonl"), "--output",
            str(tmp_path / "o"), "--max-length", "128", "--max-steps", "1", "--batch-size", "2", "--no-progress"]
    assert main(argv) == 0
    assert (tmp_path / "o" / "adapter" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------ ORPO, SimPO, KTO on the loop
class _NoReference:
    """A reference that must not be asked: ORPO and SimPO compute none."""

    def logps(self, model, batch, chunk_size):
        raise AssertionError("a reference-free loss computed reference log-probs")


def test_orpo_and_simpo_steps_read_mean_logps_and_no_reference(tiny_run_model, batch):
    """The step's loss is orpo_loss / simpo_loss on Σ log π / |y| (no reference pass), plus for
    ORPO its NLL term with weight 1 (or --rpo-alpha); logps/* are logged as the mean log-probs."""
    from anita.dpo import orpo_log_odds_ratio, orpo_loss, simpo_loss

    model = lora_model(tiny_run_model)
    with torch.no_grad():
        out = concatenated_logps(model, batch)
        l_w, l_l = out.chosen / out.chosen_lengths, out.rejected / out.rejected_lengths
        nll = -out.chosen.sum() / out.chosen_lengths.sum()
        orpo_sum, B, orpo_metrics = dpo_step(model, batch, DPOSettings(beta=0.2, loss_type="orpo"), _NoReference())
        half, _, _ = dpo_step(model, batch, DPOSettings(beta=0.2, loss_type="orpo", rpo_alpha=0.5), _NoReference())
        simpo_sum, _, simpo_metrics = dpo_step(model, batch, DPOSettings(beta=2.0, loss_type="simpo", simpo_gamma=0.3),
                                               _NoReference())
    assert math.isclose(orpo_sum.item(), orpo_loss(l_w, l_l, 0.2)[0].sum().item() + B * nll.item(), rel_tol=1e-5)
    assert math.isclose(half.item(), orpo_sum.item() - 0.5 * B * nll.item(), rel_tol=1e-5)
    assert math.isclose(orpo_metrics["log_odds_chosen"], orpo_log_odds_ratio(l_w, l_l).mean().item(), rel_tol=1e-5)
    assert math.isclose(orpo_metrics["logps/chosen"], l_w.mean().item(), rel_tol=1e-5)
    assert math.isclose(orpo_metrics["rewards/margins"], 0.2 * (l_w - l_l).mean().item(), rel_tol=1e-4, abs_tol=1e-7)
    assert math.isclose(simpo_sum.item(), simpo_loss(l_w, l_l, 2.0, 0.3)[0].sum().item(), rel_tol=1e-5)
    assert "nll_loss" not in simpo_metrics and "nll_loss" in orpo_metrics


def test_kto_step_is_the_formula_and_the_mismatched_rows_get_no_gradient(tmp_path, tiny_run_model, byte_tokenizer):
    """On an unpaired batch: z₀ from the mismatched rows (policy vs base), kto_loss on the matched
    ones, TRL's class-mean metrics; the gradient equals that of the formula with z₀ a constant."""
    from anita.dpo import kto_loss
    from anita.dpo.unpaired import UnpairedBatches, read_unpaired

    data = read_unpaired(write_jsonl(tmp_path / "p.jsonl", ROWS), byte_tokenizer, max_length=64)
    kto_batch = UnpairedBatches(data, 6, byte_tokenizer.pad_id, 64, shuffle=True)[0]
    model = lora_model(tiny_run_model)
    params = lora_parameters(model)
    settings = DPOSettings(beta=0.5, loss_type="kto", desirable_weight=1.2)
    loss_sum, B, metrics = dpo_step(model, kto_batch, settings, AdaptersOff())
    ours = torch.autograd.grad(loss_sum, params)
    with torch.no_grad(), disable_lora(model):
        ref, _, _ = naive_logps(model, kto_batch)
    policy, _, _ = naive_logps(model, kto_batch)
    with torch.no_grad():
        policy_kl, _, _ = naive_logps(model, kto_batch)
    kl = (policy_kl[B:] - ref[B:]).mean().clamp(min=0)
    d = kto_batch["label"]
    losses, r_w, r_l = kto_loss(policy[:B][d], policy[:B][~d], ref[:B][d], ref[:B][~d], kl, 0.5, 1.2)
    assert B == 6 and math.isclose(loss_sum.item(), losses.sum().item(), rel_tol=1e-5)
    assert math.isclose(metrics["kl"], kl.item(), rel_tol=1e-4, abs_tol=1e-6)
    assert metrics["rewards/chosen"] == (pytest.approx(r_w.mean().item(), rel=1e-4), 3)
    assert metrics["rewards/margins"][1] == 6
    for a, b in zip(ours, torch.autograd.grad(losses.sum(), params)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("loss,extra,metric", [
    ("orpo", ["--beta", "0.5"], "eval_log_odds_chosen"),
    ("simpo", ["--beta", "2", "--simpo-gamma", "0.5"], "eval_rewards/margins"),
    ("kto", ["--beta", "1"], "eval_rewards/margins"),
])
def test_cli_runs_orpo_simpo_kto_and_moves_the_held_out_metric(tmp_path, tiny_run_model, loss, extra, metric):
    """`anita dpo --loss orpo|simpo|kto`, 8 steps on the toy preference (KTO reads the pairs unpaired):
    ORPO's held-out log odds ratio rises, SimPO's margin rises, KTO's desirable/undesirable reward gap
    grows from 0; the metrics carry TRL's names and no reference is computed for ORPO/SimPO."""
    write_jsonl(tmp_path / "train.jsonl", toy_rows(8))
    write_jsonl(tmp_path / "eval.jsonl", toy_rows(8, offset=100))
    records = run_cli(tmp_path, tiny_run_model, loss, "--loss", loss, "--eval-data", str(tmp_path / "eval.jsonl"),
                      "--max-steps", "8", "--lr", "0.02", "--warmup-ratio", "0", "--eval-steps", "4", *extra)
    evals = [r[metric] for r in records if "eval_loss" in r]
    assert len(evals) == 3 and evals[0] < min(evals[1:]), evals
    train = [r for r in records if "loss" in r]
    expected = {"orpo": {"nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/accuracies"},
                "simpo": {"rewards/accuracies", "rewards/margins"}, "kto": {"kl", "rewards/margins"}}[loss]
    logged = set().union(*train)  # a KTO batch of one kind logs no margin
    assert expected | {"rewards/chosen", "logps/chosen", "logits/chosen"} <= logged
    assert (loss == "kto") == ("rewards/accuracies" not in logged)
    assert not (tmp_path / "cache").exists()  # no reference log-probs were cached


def test_cli_refuses_settings_the_loss_does_not_read(tmp_path, tiny_run_model, capsys):
    write_jsonl(tmp_path / "train.jsonl", toy_rows(4))
    base = ["dpo", "--model", str(tiny_run_model), "--data", str(tmp_path / "train.jsonl"), "--output", str(tmp_path / "o")]
    for extra, message in [(["--loss", "orpo", "--reference", "adapters-off"], "--loss orpo uses no reference model"),
                           (["--loss", "kto", "--reference", "precomputed"], "cannot use --reference precomputed"),
                           (["--loss", "kto", "--reference", "none"], "needs a reference model"),
                           (["--loss", "kto", "--batch-size", "1"], "batch_size >= 2"),
                           (["--loss", "kto", "--rpo-alpha", "1"], "does not apply to loss 'kto'"),
                           (["--loss", "sigmoid", "--simpo-gamma", "1"], "simpo_gamma is only used by loss 'simpo'"),
                           (["--loss", "simpo", "--desirable-weight", "2"], "only used by loss 'kto'")]:
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
