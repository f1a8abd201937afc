"""Tests for anita/train/loss.py: the chunked SFT loss against the plain full-logits computation,
and packing against one example at a time.

The oracle is `F.cross_entropy` over the model's full fp32 logits (B, T, V), summed over the
labelled positions: the textbook next-token loss.
"""

import pytest
import torch
import torch.nn.functional as F

from anita.errors import AnitaError
from anita.lora import LoraConfig, apply_lora, lora_parameters
from anita.train.data import collate, make_example
from anita.model.masks import Spans
from anita.train.loss import sft_loss
from tests.conftest import tiny_model


def _examples(seed=0, n=3, vocab=256):
    """n examples of different lengths; each trains on its second half."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        T = 5 + 3 * i
        ids = torch.randint(0, vocab, (T,), generator=g).tolist()
        out.append(make_example(ids, [0] * (T // 2) + [1] * (T - T // 2), 64)[0])
    return out


def _plain_loss(model, batch):
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).float()  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("variant", ["llama3", "llama3.2"])  # separate head, and head tied to the embeddings
def test_chunked_loss_equals_plain_loss_and_gradients(variant):
    batch = collate([[e] for e in _examples()], pad_id=0)
    grads = []
    for fn in (lambda m, b: sft_loss(m, b, chunk_size=4)[0], _plain_loss):
        model = tiny_model(variant)
        apply_lora(model, LoraConfig(r=2, alpha=4))
        torch.manual_seed(1)
        for p in lora_parameters(model):  # B is zero at init: make the adapter non-trivial
            p.data.normal_(0, 0.1)
        loss = fn(model, batch)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in lora_parameters(model)]))
    (chunked, g_chunked), (plain, g_plain) = grads
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-6)
    for a, b in zip(g_chunked, g_plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    _, count, _ = sft_loss(tiny_model(variant), batch)
    assert count == sum(e.trained_tokens for e in _examples())


def test_packed_batch_gives_each_example_its_own_loss():
    """Three examples packed into one row score exactly as each one alone: per-example loss sums
    read off the packed token log-probs equal the unpacked ones."""
    model = tiny_model("llama3")
    examples = _examples(seed=2)
    packed = collate([examples], pad_id=0)
    assert isinstance(packed["attention_mask"], Spans)
    hidden = model.hidden_states(packed["input_ids"], packed["attention_mask"], packed["position_ids"])
    logps = -F.cross_entropy(model.lm_head(hidden).float()[0], packed["labels"][0], reduction="none")  # (T,)
    start = 0
    for e in examples:
        end = start + len(e.input_ids)
        alone, count, _ = sft_loss(model, collate([[e]], pad_id=0))
        torch.testing.assert_close(-logps[start:end].sum(), alone.detach(), atol=1e-5, rtol=1e-6)
        start = end
    total, count, _ = sft_loss(model, packed)
    assert count == sum(e.trained_tokens for e in examples)


def test_a_lora_wrapped_output_head_is_refused():
    model = tiny_model("llama3")
    apply_lora(model, LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(AnitaError, match="lm_head must be a plain"):
        sft_loss(model, collate([[_examples()[0]]], pad_id=0))
