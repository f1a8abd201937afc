"""Tests for anita/model/masks.py (the segment/branch attention mask, against masks written by hand;
`Spans`, packed rows without a mask, against that mask) and for `attend` in anita/model/llama.py
(varlen attention over spans; the CUDA kernel choice, skipped without a GPU)."""

import pytest
import torch
import torch.nn.functional as F

from anita.errors import AnitaError
from anita.lora import lora_parameters
from anita.model.llama import KVCache, attend, attention_mask_4d
from anita.model.masks import Spans, segment_mask
from tests.conftest import tiny_lora_model, tiny_model


def test_shared_prompt_mask_is_the_hand_written_one():
    """The module docstring's row: prompt p0 p1, chosen c0 c1, rejected r0, one pad. After the
    model's causality: answers see the prompt and themselves, never each other; nothing sees the pad."""
    segment = torch.tensor([[0, 0, 0, 0, 0, -1]])
    branch = torch.tensor([[0, 0, 1, 1, 2, -1]])
    expected = [[1, 0, 0, 0, 0, 0],   # p0
                [1, 1, 0, 0, 0, 0],   # p1
                [1, 1, 1, 0, 0, 0],   # c0
                [1, 1, 1, 1, 0, 0],   # c1
                [1, 1, 0, 0, 1, 0],   # r0: the prompt and itself, not c0 c1
                [0, 0, 0, 0, 0, 1]]   # the pad: only itself (attention_mask_4d keeps the diagonal)
    allowed = attention_mask_4d(segment_mask(segment, branch), 6, 6, "cpu")  # (1, 1, 6, 6)
    assert allowed[0, 0].int().tolist() == expected


def test_packed_examples_mask_is_block_diagonal():
    """Two SFT examples (branch 0 everywhere) in one row: each sees only itself."""
    segment, branch = torch.tensor([[0, 0, 1, 1, 1]]), torch.zeros(1, 5, dtype=torch.long)
    assert segment_mask(segment, branch)[0].int().tolist() == [[1, 1, 0, 0, 0]] * 2 + [[0, 0, 1, 1, 1]] * 3


def test_two_packed_pairs_never_see_each_other():
    segment = torch.tensor([[0, 0, 0, 1, 1, 1]])
    branch = torch.tensor([[0, 1, 2, 0, 1, 2]])
    m = segment_mask(segment, branch)[0].int()
    assert m.tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0],
                          [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 0, 1]]


def test_attend_without_a_mask_is_causal_sdpa_with_gqa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 5, 8, generator=g) for h in (4, 2, 2))
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    assert torch.allclose(attend(q, k, v, None), want, atol=1e-6)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    assert torch.allclose(attend(q, k, v, mask), want, atol=1e-6)


def test_spans_mask_is_the_segment_mask_of_the_same_rows():
    """Packed SFT rows (two examples and padding; one example) and shared-prompt rows (a pair and
    padding; two pairs), as `Spans` and as the segment / branch ids `segment_mask` reads."""
    packed = Spans((((0, 3), (3, 5)), ((0, 6),)))
    segment = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    assert torch.equal(packed.mask(6), segment_mask(segment, torch.zeros_like(segment)))
    assert packed.to("cpu") is packed  # a batch moved value by value keeps its spans
    shared = Spans((((0, 2, 4, 5),), ((0, 1, 2, 3), (3, 4, 5, 6))))
    segment = torch.tensor([[0, 0, 0, 0, 0, -1], [1, 1, 1, 2, 2, 2]])
    branch = torch.tensor([[0, 0, 1, 1, 2, -1], [0, 1, 2, 0, 1, 2]])
    assert torch.equal(shared.mask(6), segment_mask(segment, branch))


@pytest.mark.parametrize("spans", [
    Spans((((0, 3), (3, 7)), ((0, 9),), ((0, 2), (2, 3), (3, 8)))),  # packed SFT rows
    Spans((((0, 4, 6, 9),), ((0, 1, 5, 6), (6, 8, 9, 9)), ((0, 3, 4, 7),))),  # pairs; one empty rejected
], ids=["packed", "shared-prompt"])
def test_attend_over_spans_equals_the_mask(spans):
    """GQA (4 query heads, 2 kv heads), three rows with padding or without. Outputs and the
    gradients of q, k and v, on real tokens, in fp64."""
    q, k, v = (torch.randn(3, n, 9, 8, dtype=torch.float64, requires_grad=True) for n in (4, 2, 2))
    real = spans.mask(9).diagonal(dim1=1, dim2=2)[:, None, :, None]  # (3, 1, 9, 1) real tokens
    g = torch.randn(3, 4, 9, 8, dtype=torch.float64) * real
    results = []
    for mask in (spans, attention_mask_4d(spans.mask(9), 9, 9, "cpu")):
        out = attend(q, k, v, mask)
        grads = torch.autograd.grad((out * g).sum(), (q, k, v))
        results.append((out * real, *grads))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["off", "full", "selective"])
def test_packed_model_over_spans_equals_the_mask(mode):
    """A QLoRA-shaped model (LoRA on the projections) trained on two packed rows: hidden states and
    LoRA gradients through spans equal those through the block-diagonal mask, in fp32."""
    model = tiny_lora_model(torch.float32, quantize=False)
    model.checkpointing = mode
    spans = Spans((((0, 5), (5, 12)), ((0, 4), (4, 10))))
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([list(range(5)) + list(range(7)), list(range(4)) + list(range(6)) + [0, 0]])
    real = spans.mask(12).diagonal(dim1=1, dim2=2)[..., None]  # (2, 12, 1)
    results = []
    for mask in (spans, spans.mask(12)):
        model.zero_grad()
        hidden = model.hidden_states(ids, mask, positions) * real
        hidden.square().sum().backward()
        results.append((hidden.detach(), [p.grad.clone() for p in lora_parameters(model)]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for got, expected in zip(results[0][1], results[1][1]):  # fp32 sums over 22 tokens, another order
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=5e-5 * expected.abs().max().item())


def test_spans_refuse_a_kv_cache():
    model = tiny_model("llama3.1")
    with pytest.raises(AnitaError, match="Spans"):
        model.hidden_states(torch.ones(1, 3, dtype=torch.long), Spans((((0, 3),),)),
                            cache=KVCache(model.config, batch_size=1, max_len=8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_masked_attention_runs_the_memory_efficient_kernel():
    """With GQA heads and a boolean mask, `attend` runs under the memory-efficient kernel alone
    (an error if SDPA could not use it) and equals the math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, h, 64, 64, generator=g, device="cuda", dtype=torch.bfloat16) for h in (8, 2, 2))
    segment = torch.tensor([[0] * 20 + [1] * 44] * 2, device="cuda")
    branch = torch.tensor([[0] * 10 + [1] * 5 + [2] * 5 + [0] * 44] * 2, device="cuda")
    mask = attention_mask_4d(segment_mask(segment, branch), 64, 64, "cuda")
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        fast = attend(q, k, v, mask)
    with sdpa_kernel(SDPBackend.MATH):
        slow = attend(q, k, v, mask)
    assert torch.allclose(fast.float(), slow.float(), atol=2e-2)
