"""Tests for anita/dpo/reference.py: the reference model three ways (adapters off, the frozen SFT
adapter, precomputed and cached) give the same numbers, and at step 0 the policy's own.

Hand-derived values: at step 0 the policy equals the reference, so each log-ratio is exactly 0,
every reward β·0 is 0 and the sigmoid loss is −log σ(0) = ln 2 (in fp32: the float nearest ln 2).
"""

import math

import pytest
import torch

from anita.dpo.data import PreferenceBatches, read_preferences
from anita.dpo.reference import (AdaptersOff, FrozenAdapter, Precomputed, ReferenceFree, cache_key, cached_reference,
                                 model_fingerprint, precompute_reference, read_cache)
from anita.dpo.logps import concatenated_logps
from anita.dpo.trainer import DPOSettings, dpo_step
from anita.errors import AnitaError
from anita.lora import LoraConfig, apply_lora, lora_parameters
from anita.model import Llama, from_pretrained
from tests.train.conftest import byte_tokenizer, tiny_run_model, write_jsonl  # noqa: F401 (fixtures)

LN2 = torch.tensor(math.log(2)).item()  # ln 2 rounded to fp32
ROWS = [{"prompt": "ciao", "chosen": "buongiorno", "rejected": "boh"},
        {"prompt": "2+2?", "chosen": "4", "rejected": "cinque"},
        {"prompt": [{"role": "user", "content": "mare o monti?"}], "chosen": "mare", "rejected": "monti, forse"},
        {"prompt": "sole", "chosen": "caldo", "rejected": "freddo"}]


@pytest.fixture
def data(tmp_path, byte_tokenizer):
    return read_preferences(write_jsonl(tmp_path / "p.jsonl", ROWS), byte_tokenizer, max_length=64)


def policy(path, dropout: float = 0.0) -> Llama:
    """The tiny model with a fresh adapter (B = 0), in training mode with checkpointing, as the loop runs it."""
    model = from_pretrained(path)
    model.checkpointing = "full"
    torch.manual_seed(0)
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=dropout))
    return model.train()


def move_adapter(model, seed: int, scale: float = 0.3) -> None:
    """Give every adapter matrix random values: an SFT adapter, or a policy after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def assert_step_zero(model, batch, reference):
    loss_sum, count, metrics = dpo_step(model, batch, DPOSettings(beta=0.1), reference)
    assert count == 4
    assert (loss_sum / count).item() == LN2  # 4 equal fp32 terms: the sum and the division are exact
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[key] == 0.0, key


def test_step_zero_all_three_references_give_zero_rewards_and_ln2(data, tiny_run_model, byte_tokenizer):
    """(a) a fresh adapter with the adapters off; (b) an SFT adapter (non-zero) frozen as the
    reference; (c) both precomputed over the data first. Exactly 0 and ln 2 each time."""
    batches = PreferenceBatches(data, batch_size=4, pad_id=byte_tokenizer.pad_id, shuffle=False)
    fresh = policy(tiny_run_model)
    assert_step_zero(fresh, batches[0], AdaptersOff())
    table = precompute_reference(fresh, batches, AdaptersOff(), chunk_size=16)
    with_table = PreferenceBatches(data, batch_size=4, pad_id=byte_tokenizer.pad_id, shuffle=False, ref_logps=table)
    assert_step_zero(fresh, with_table[0], Precomputed())

    sft = policy(tiny_run_model)
    move_adapter(sft, seed=1)
    assert_step_zero(sft, batches[0], FrozenAdapter(sft))
    table = precompute_reference(sft, batches, FrozenAdapter(sft), chunk_size=16)
    with_table = PreferenceBatches(data, batch_size=4, pad_id=byte_tokenizer.pad_id, shuffle=False, ref_logps=table)
    assert_step_zero(sft, with_table[0], Precomputed())


def test_adapters_off_equals_precomputed_and_the_bare_base(data, tiny_run_model, byte_tokenizer):
    """After the policy has moved, (a) and (c) still give the same numbers, those of the model
    without any LoRA layer (the reference holds no second copy of it)."""
    batches = PreferenceBatches(data, batch_size=2, pad_id=byte_tokenizer.pad_id, shuffle=False)
    model = policy(tiny_run_model)
    table = precompute_reference(model, batches, AdaptersOff(), chunk_size=16)
    move_adapter(model, seed=2)
    base = from_pretrained(tiny_run_model)
    for batch in batches:
        off = AdaptersOff().logps(model, batch, 16)
        with torch.no_grad():
            bare = concatenated_logps(base, batch, 16)
        index = batch["index"]
        assert torch.equal(off[0], table[0][index]) and torch.equal(off[1], table[1][index])
        assert torch.allclose(off[0], bare.chosen, atol=1e-5, rtol=0)
        assert torch.allclose(off[1], bare.rejected, atol=1e-5, rtol=0)
        with torch.no_grad():
            moved = concatenated_logps(model, batch, 16)
        assert not torch.allclose(moved.chosen, off[0], atol=1e-3)  # the policy did move


def test_frozen_adapter_is_the_sft_model_not_the_bare_base(data, tiny_run_model, byte_tokenizer):
    """(b) gives base + SFT adapter even after training moved the live adapter, differs from the
    bare base (the known pitfall), and puts the trained values back exactly, even on an error."""
    batch = PreferenceBatches(data, batch_size=4, pad_id=byte_tokenizer.pad_id, shuffle=False)[0]
    model = policy(tiny_run_model)
    move_adapter(model, seed=1)  # the SFT adapter
    with torch.no_grad():
        sft = concatenated_logps(model, batch, 16)
    reference = FrozenAdapter(model)
    move_adapter(model, seed=5, scale=0.1)  # training moved it
    trained = [p.detach().clone() for p in lora_parameters(model)]
    ref_chosen, ref_rejected = reference.logps(model, batch, 16)
    assert torch.equal(ref_chosen, sft.chosen) and torch.equal(ref_rejected, sft.rejected)
    bare_chosen, _ = AdaptersOff().logps(model, batch, 16)
    assert (ref_chosen - bare_chosen).abs().max() > 1e-2
    assert all(torch.equal(p, t) for p, t in zip(lora_parameters(model), trained))
    with pytest.raises(RuntimeError, match="boom"):
        with reference.swapped_in(model):
            raise RuntimeError("boom")
    assert all(torch.equal(p, t) for p, t in zip(lora_parameters(model), trained))


def test_reference_pass_has_no_dropout_and_no_gradient(data, tiny_run_model, byte_tokenizer):
    """With LoRA dropout 0.5, the frozen-adapter reference is still deterministic (it runs in eval
    mode), carries no gradient, and leaves the model in training mode."""
    batch = PreferenceBatches(data, batch_size=4, pad_id=byte_tokenizer.pad_id, shuffle=False)[0]
    model = policy(tiny_run_model, dropout=0.5)
    move_adapter(model, seed=1)
    reference = FrozenAdapter(model)
    first, second = reference.logps(model, batch, 16), reference.logps(model, batch, 16)
    assert torch.equal(first[0], second[0]) and not first[0].requires_grad
    assert model.training


def test_reference_free_and_precomputed_errors(data, tiny_run_model, byte_tokenizer):
    batch = PreferenceBatches(data, batch_size=4, pad_id=byte_tokenizer.pad_id, shuffle=False)[0]
    model = policy(tiny_run_model)
    assert ReferenceFree().logps(model, batch, 16) == (None, None)
    with pytest.raises(AnitaError, match="carries no reference log-probs"):
        Precomputed().logps(model, batch, 16)
    with pytest.raises(AnitaError, match="no LoRA layers"):
        FrozenAdapter(from_pretrained(tiny_run_model))


def test_cache_is_written_once_and_reused(tmp_path):
    """The first call computes and writes the table; a call with the same key reads it without
    computing; another key (other data or model) computes again. A corrupt file is an error."""
    calls = []

    def compute():
        calls.append(1)
        return torch.tensor([-1.5, -2.0]), torch.tensor([-3.0, -4.25])

    key = cache_key("data-hash", "model-hash", "adapters-off", "fp32")
    path = tmp_path / "ref.safetensors"
    table, cached = cached_reference(path, key, compute)
    again, cached_again = cached_reference(path, key, compute)
    assert (cached, cached_again, len(calls)) == (False, True, 1)
    assert torch.equal(again[0], table[0]) and torch.equal(again[1], table[1])
    assert read_cache(path, {**key, "data": "other-data"}) is None
    _, cached_other = cached_reference(path, {**key, "model": "other-model"}, compute)
    assert (cached_other, len(calls)) == (False, 2)
    assert read_cache(path, cache_key("data-hash", "model-hash", "adapters-off", "fp32", "bf16")) is None  # head dtype
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(AnitaError, match="cannot read the reference log-prob cache"):
        read_cache(path, key)


def test_model_fingerprint(tiny_run_model):
    """Equal weights, equal fingerprints. The adapter counts only when asked (reference (b));
    any change to a base weight changes it."""
    a, b = policy(tiny_run_model), policy(tiny_run_model)
    assert model_fingerprint(a, include_adapter=True) == model_fingerprint(b, include_adapter=True)
    move_adapter(b, seed=3)
    assert model_fingerprint(a, include_adapter=False) == model_fingerprint(b, include_adapter=False)
    assert model_fingerprint(a, include_adapter=True) != model_fingerprint(b, include_adapter=True)
    with torch.no_grad():
        b.model.norm.weight[0] += 1e-3
    assert model_fingerprint(a, include_adapter=False) != model_fingerprint(b, include_adapter=False)


def test_frozen_adapter_under_bf16_autocast_sees_the_swap(data, tiny_run_model, byte_tokenizer):
    """Autocast caches each parameter's bf16 copy for the whole autocast region. The training
    step runs the policy forward and the reference pass in one region, so an in-place swap of the
    adapter must clear that cache, or the reference silently equals the policy (loss stuck at
    ln 2, nothing learned: the failure `anita demo` hit before the fix)."""
    batch = PreferenceBatches(data, batch_size=4, pad_id=byte_tokenizer.pad_id, shuffle=False)[0]
    model = policy(tiny_run_model)
    move_adapter(model, seed=1)  # the SFT adapter
    reference = FrozenAdapter(model)
    move_adapter(model, seed=5, scale=0.5)  # training moved it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            sft_chosen, _ = reference.logps(model, batch, 16)  # alone in its region: the SFT numbers
        policy_logps = concatenated_logps(model, batch, 16)  # caches the trained adapter's bf16 casts
        ref_chosen, _ = reference.logps(model, batch, 16)
        again = concatenated_logps(model, batch, 16)
    torch.testing.assert_close(ref_chosen, sft_chosen)
    assert (ref_chosen - policy_logps.chosen.detach()).abs().max() > 1e-2
    torch.testing.assert_close(again.chosen, policy_logps.chosen)
