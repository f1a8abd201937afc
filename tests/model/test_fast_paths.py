"""The two shortcuts of the training step in anita/model/llama.py and anita/model/fused.py, each held
equal to the plain path it sits beside:

- selective activation checkpointing (`checkpoint_block(..., "selective")`) against full
  checkpointing and against none: the same loss and the same LoRA gradients, bit for bit (the kept
  GEMM/attention outputs are the very tensors a recomputation would produce);
- fused frozen q/k/v and gate/up matmuls (`set_fused_projections`) against the three/two plain
  projections: outputs and LoRA gradients, on NF4 (bitsandbytes kernels, bf16 and fp32 compute) and
  on dense frozen bases, with DoRA and with LoRA switched off (DPO's reference).

The selective policy is also checked to keep what it says (the projection and attention outputs) and
nothing of the element-wise work, by counting the ops a backward pass recomputes.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from anita.lora import lora_parameters
from anita.model.fused import can_fuse, set_fused_projections
from tests.conftest import tiny_lora_model, tiny_model

IDS = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(5))


def _loss_and_grads(model):
    model.zero_grad()
    loss = model(IDS).float().logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in lora_parameters(model)]


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32])
def test_selective_checkpointing_equals_full_and_none(compute_dtype):
    model = tiny_lora_model(compute_dtype)
    results = {}
    for mode in ("off", "full", "selective"):
        model.checkpointing = mode
        results[mode] = _loss_and_grads(model)
    for mode in ("full", "selective"):
        assert torch.equal(results[mode][0], results["off"][0])
        for got, expected in zip(results[mode][1], results["off"][1]):
            assert torch.equal(got, expected), mode


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _backward_ops(model, mode):
    model.checkpointing = mode
    model.zero_grad()
    loss = model(IDS).float().logsumexp(-1).mean()
    with _CountOps() as counter:
        loss.backward()
    return counter.ops


def test_selective_recomputes_only_cheap_work():
    """In backward, "full" reruns every projection GEMM and attention forward; "selective" reruns
    no attention forward and only LoRA's rank-R matmuls, but still the RMSNorm (rsqrt) and SiLU."""
    model = tiny_lora_model(torch.float32)
    full, selective, off = (_backward_ops(model, m) for m in ("full", "selective", "off"))
    attention = [op for op in full if "scaled_dot_product" in op and "backward" not in op]
    assert attention and not [op for op in selective if "scaled_dot_product" in op and "backward" not in op]
    mm = lambda ops: sum(op.startswith("mm") for op in ops)  # noqa: E731
    nf4 = lambda ops: sum(op.startswith("gemm_4bit") for op in ops)  # noqa: E731  bnb's dequantize+GEMM
    # NF4 GEMMs never rerun selectively; fully, all but down_proj's (its output is not needed in
    # backward and LoRA's update runs before it, so the recomputation stops first: anita/lora/lean.py)
    assert nf4(full) == 12 and nf4(selective) == nf4(off) == 0
    assert mm(full) >= mm(off) + 2 * 12  # LoRA A and B per projection rerun (down_proj's B is not needed)
    assert mm(selective) == mm(off) + 14  # LoRA's rank-R matmul B·(Ax) only, 7 projections × 2 blocks
    assert sum(op.startswith("rsqrt") for op in selective) == 4  # two RMSNorms per block, recomputed
    assert sum(op.startswith("silu.") for op in selective) == 2


def _fused_vs_plain(model, **forward):
    set_fused_projections(model, False)
    plain = _loss_and_grads(model)
    assert set_fused_projections(model, True) == 2
    fused = _loss_and_grads(model)
    set_fused_projections(model, False)
    return plain, fused


@pytest.mark.parametrize("compute_dtype, grad_tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
def test_fused_nf4_projections_equal_the_plain_ones(compute_dtype, grad_tol):
    """NF4 bases dequantized with bitsandbytes' kernel and concatenated: the forward GEMM computes the
    same dot products (equal here to rounding); the input gradient sums the q/k/v terms inside one GEMM
    instead of adding three rounded (B, T, D) results, so it differs by the compute dtype's rounding
    (bf16: ~3 significant digits)."""
    model = tiny_lora_model(compute_dtype)
    (loss, grads), (f_loss, f_grads) = _fused_vs_plain(model)
    torch.testing.assert_close(f_loss, loss, atol=1e-6 if compute_dtype == torch.float32 else 1e-3, rtol=0)
    for got, expected in zip(f_grads, grads):
        torch.testing.assert_close(got, expected, atol=grad_tol * expected.abs().max().item(), rtol=0)


def test_fused_layer_outputs_equal_the_plain_ones_exactly():
    """One block's q, k, v from the fused GEMM against the three plain layers: bit-equal in fp32."""
    model = tiny_lora_model(torch.float32)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(1))
    attn.fused = False
    plain = attn.project_qkv(x)
    attn.fused = True
    for got, expected in zip(attn.project_qkv(x), plain):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("lora", [dict(use_dora=True), dict()])
def test_fused_dense_frozen_bases_dora_and_disabled_adapters(lora):
    model = tiny_lora_model(quantize=False, **lora)
    (loss, grads), (f_loss, f_grads) = _fused_vs_plain(model)
    torch.testing.assert_close(f_loss, loss, atol=1e-6, rtol=0)
    for got, expected in zip(f_grads, grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    from anita.lora import disable_lora
    with torch.no_grad(), disable_lora(model):  # the reference: bases only
        plain = model(IDS)
        set_fused_projections(model, True)
        torch.testing.assert_close(model(IDS), plain, atol=1e-5, rtol=0)


def test_fusion_refuses_what_it_cannot_fuse():
    model = tiny_model("llama3")  # plain trainable nn.Linear bases: full fine-tuning needs weight grads
    attn = model.model.layers[0].self_attn
    assert not can_fuse((attn.q_proj, attn.k_proj, attn.v_proj))
    assert set_fused_projections(model) == 0
    for p in model.parameters():
        p.requires_grad_(False)
    assert can_fuse((attn.q_proj, attn.k_proj, attn.v_proj))


def test_fused_and_selective_together_equal_the_plain_step():
    model = tiny_lora_model(torch.float32)
    model.checkpointing = "off"
    loss, grads = _loss_and_grads(model)
    model.checkpointing = "selective"
    set_fused_projections(model, True)
    f_loss, f_grads = _loss_and_grads(model)
    torch.testing.assert_close(f_loss, loss, atol=1e-6, rtol=0)
    for got, expected in zip(f_grads, grads):
        torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max().item(), rtol=0)
