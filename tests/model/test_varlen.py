"""Tests for anita/model/varlen.py: the gathered sequences and cu_seqlens of packed and shared-prompt
rows (by hand), the plain-PyTorch reference of the varlen kernel's causal semantics (against SDPA with
a mask written out), `attend_varlen` over that reference against the mask path (CPU, fp64, GQA), the
torch-version shim around `varlen_attn` (with stand-in kernels), and FlashAttention itself on CUDA."""

import pytest
import torch
import torch.nn.functional as F

from anita.model import varlen
from anita.model.llama import attend, attention_mask_4d
from anita.model.masks import Spans
from anita.model.varlen import (
    attend_varlen,
    flash_applies,
    varlen_layout,
    varlen_reference,
)

PACKED = Spans((((0, 3), (3, 7)), ((0, 9),), ((0, 2), (2, 3), (3, 8))))  # packed SFT rows, padding in two
SHARED = Spans((((0, 4, 6, 9),), ((0, 1, 5, 6), (6, 8, 9, 9)), ((0, 3, 4, 7),)))  # pairs; one empty rejected


def test_layout_of_a_shared_prompt_row_by_hand():
    """Row 0 of T=10 holds prompt [0, 2), chosen [2, 4), rejected [4, 5); row 1 an SFT example [0, 3)
    and padding. Sequences: prompt + chosen, rejected against [prompt; rejected], the example."""
    layout = varlen_layout(Spans((((0, 2, 4, 5),), ((0, 3),))), 10, torch.device("cpu"))
    assert layout.q_index.tolist() == [0, 1, 2, 3, 4, 10, 11, 12]
    assert layout.k_index.tolist() == [0, 1, 2, 3, 0, 1, 4, 10, 11, 12]
    assert layout.cu_q.tolist() == [0, 4, 5, 8] and layout.cu_k.tolist() == [0, 4, 7, 10]
    assert layout.cu_q.dtype == torch.int32 and (layout.max_q, layout.max_k) == (4, 4)


def test_reference_is_bottom_right_causal_attention():
    """Two sequences, the second with 2 queries over 5 keys: query i sees keys j <= i + 3, as SDPA
    with that mask written out (and GQA: 4 query heads over 2 kv heads)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(5, 4, 8, generator=g), torch.randn(8, 2, 8, generator=g), torch.randn(8, 2, 8, generator=g)
    cu_q, cu_k = torch.tensor([0, 3, 5]), torch.tensor([0, 3, 8])
    got = varlen_reference(q, k, v, cu_q, cu_k, 3, 5)

    def sdpa(qs, ks, vs, mask):  # (L, ., E) -> (L, H, E)
        qs, ks, vs = qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1)
        return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True).transpose(0, 1)
    first = sdpa(q[:3], k[:3], v[:3], torch.ones(3, 3, dtype=torch.bool).tril())
    second = sdpa(q[3:], k[3:], v[3:], torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))
    torch.testing.assert_close(got, torch.cat([first, second]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spans", [PACKED, SHARED], ids=["packed", "shared-prompt"])
def test_attend_varlen_equals_the_mask_path(spans):
    """The gather, the kernel's semantics (the reference) and the scatter back: outputs and the
    gradients of q, k and v equal `attend` with the (T, T) mask, on real tokens, in fp64; padding is 0."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, n, 9, 8, dtype=torch.float64, generator=g, requires_grad=True) for n in (4, 2, 2))
    real = spans.mask(9).diagonal(dim1=1, dim2=2)[:, None, :, None]  # (3, 1, 9, 1)
    grad = torch.randn(3, 4, 9, 8, dtype=torch.float64, generator=g) * real
    results = []
    for run in (lambda: attend_varlen(q, k, v, spans, kernel=varlen_reference),
                lambda: attend(q, k, v, attention_mask_4d(spans.mask(9), 9, 9, "cpu"))):
        out = run()
        results.append((out * real, *torch.autograd.grad((out * grad).sum(), (q, k, v))))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    padding = attend_varlen(q, k, v, spans, kernel=varlen_reference) * ~real
    assert not padding.any()


def stand_in(signature: str):
    """A `varlen_attn` with one torch version's keywords, computing the reference; it records what it got."""
    calls = []

    def v210(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False, return_aux=None, scale=None):
        calls.append({"is_causal": is_causal, "heads": (q.shape[1], k.shape[1])})
        assert is_causal and q.shape[1] == k.shape[1]
        return varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k)

    def v211(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
        calls.append({"window_size": window_size, "heads": (q.shape[1], k.shape[1])})
        assert window_size == (-1, 0) and q.shape[1] == k.shape[1]
        return varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k)

    def v213(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
             enable_gqa=False):
        calls.append({"window_size": window_size, "enable_gqa": enable_gqa, "heads": (q.shape[1], k.shape[1])})
        assert window_size == (-1, 0) and enable_gqa
        return varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k)
    return {"2.10": v210, "2.11": v211, "2.13": v213}[signature], calls


@pytest.mark.parametrize("version", ["2.10", "2.11", "2.13"])
def test_flash_varlen_speaks_each_torch_versions_keywords(monkeypatch, version):
    """Causal as `is_causal` (2.10) or `window_size=(-1, 0)` (2.11 on); grouped kv heads passed through
    with `enable_gqa` (2.13), expanded to the query heads before it. Same numbers every way."""
    kernel, calls = stand_in(version)
    monkeypatch.setattr(varlen, "varlen_attn", kernel)
    varlen._varlen_params.cache_clear()
    try:
        q, k, v = (torch.randn(2, n, 9, 8, dtype=torch.float64) for n in (4, 2, 2))
        spans = Spans((((0, 4, 6, 9),), ((0, 5), (5, 8))))
        got = attend_varlen(q, k, v, spans)
    finally:
        varlen._varlen_params.cache_clear()
    torch.testing.assert_close(got, attend_varlen(q, k, v, spans, kernel=varlen_reference), rtol=0, atol=0)
    assert calls[0]["heads"] == ((4, 2) if version == "2.13" else (4, 4))


def test_flash_applies_only_to_cuda_half_precision():
    assert not flash_applies(torch.zeros(1, 2, 3, 8, dtype=torch.bfloat16))  # CPU: SDPA per sequence
    if torch.cuda.is_available():
        assert flash_applies(torch.zeros(1, 2, 3, 64, dtype=torch.bfloat16, device="cuda"))
        assert not flash_applies(torch.zeros(1, 2, 3, 64, device="cuda"))  # fp32: FlashAttention has none


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spans", [PACKED, SHARED], ids=["packed", "shared-prompt"])
def test_flash_varlen_on_cuda_equals_the_reference_and_the_mask_path(spans):
    """FlashAttention's varlen kernel (GQA, bf16) against the reference it is documented by and against
    SDPA with the mask, outputs and gradients, to bf16 rounding."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(3, n, 9, 64, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
               for n in (8, 2, 2))
    real = spans.mask(9).diagonal(dim1=1, dim2=2)[:, None, :, None].cuda()
    grad = torch.randn(3, 8, 9, 64, device="cuda", dtype=torch.bfloat16, generator=g) * real
    results = []
    for run in (lambda: attend(q, k, v, spans),  # FlashAttention (flash_applies)
                lambda: attend_varlen(q, k, v, spans, kernel=varlen_reference),
                lambda: attend(q, k, v, attention_mask_4d(spans.mask(9).cuda(), 9, 9, "cuda"))):
        out = run()
        results.append([t.float() for t in (out * real, *torch.autograd.grad((out * grad).sum(), (q, k, v)))])
    for other in results[1:]:
        for got, expected in zip(results[0], other):
            torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["off", "full", "selective"])
def test_qlora_model_on_cuda_runs_varlen_over_spans_and_equals_the_mask(monkeypatch, mode):
    """A bf16 QLoRA model on CUDA over shared-prompt rows calls FlashAttention's varlen kernel (once
    per block and per recomputation; no (T, T) mask) and gives the mask path's hidden states and
    LoRA gradients to bf16 rounding, in every checkpointing mode."""
    from anita.lora import lora_parameters
    from tests.conftest import tiny_lora_model

    calls, flash = [], varlen.flash_varlen
    monkeypatch.setattr(varlen, "flash_varlen", lambda *a: calls.append(1) or flash(*a))
    model = tiny_lora_model(torch.bfloat16).to("cuda", torch.bfloat16)
    model.checkpointing = mode
    spans = Spans((((0, 4, 9, 12),), ((0, 5), (5, 12))))
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0)).cuda()
    positions = torch.tensor([list(range(9)) + [4, 5, 6], list(range(5)) + list(range(7))]).cuda()
    real = spans.mask(12).diagonal(dim1=1, dim2=2)[..., None].cuda()
    results = []
    for mask in (spans, spans.mask(12).cuda()):
        model.zero_grad()
        hidden = model.hidden_states(ids, mask, positions) * real
        hidden.float().square().sum().backward()
        results.append([hidden.detach().float()] + [p.grad.float() for p in lora_parameters(model)])
    assert calls, "FlashAttention's varlen kernel was not called"
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=5e-2, atol=5e-2 * max(1.0, expected.abs().max().item()))

