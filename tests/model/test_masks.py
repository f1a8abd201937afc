"""Tests for anita/model/masks.py (the segment/branch attention mask, against masks written by hand)
and for `attend` in anita/model/llama.py (the CUDA kernel choice; skipped without a GPU)."""

import pytest
import torch
import torch.nn.functional as F

from anita.model.llama import attend, attention_mask_4d
from anita.model.masks import segment_mask


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
