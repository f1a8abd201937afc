"""The CUDA path, against the CPU path and bitsandbytes' CUDA kernels (skipped without a GPU).

What must hold on a GPU exactly as on the CPU: NF4 bytes (anita's plain-PyTorch quantizer run on
the GPU, bitsandbytes' CUDA quantizer, and the CPU result agree bit for bit), the 4-bit linear
(bitsandbytes' `matmul_4bit` equals dequantize + matmul), the model's logits and greedy tokens,
a QLoRA SFT step and a DPO step, and `anita sft` / `anita dpo` end to end on `--device cuda`,
including resume. Run on a machine with a GPU: `python -m pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from anita.cli import main
from anita.lora import LoraConfig, apply_lora, lora_parameters
from anita.model import from_pretrained, generate
from anita.quant import Linear4bit, dequantize_nf4, quantize_nf4
from anita.quant.linear import bnb_quant_state, import_bitsandbytes
from anita.train.loss import sft_loss
from tests.conftest import tiny_model
from tests.train.conftest import make_tiny_run_model, write_jsonl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_bnb = pytest.mark.skipif(import_bitsandbytes() is None, reason="bitsandbytes cannot be imported")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def weight(shape, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


# ------------------------------------------------------------------------------------- NF4
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_on_the_gpu_equals_nf4_on_the_cpu(dtype, double_quant):
    for shape in [(256, 512), (130, 70), (1100, 64)]:
        w = weight(shape, dtype)
        cpu_packed, cpu_state = quantize_nf4(w, 64, double_quant)
        gpu_packed, gpu_state = quantize_nf4(w.cuda(), 64, double_quant)
        assert torch.equal(gpu_packed.cpu(), cpu_packed)
        for name, tensor in cpu_state.to_tensors().items():
            assert torch.equal(gpu_state.to_tensors()[name].cpu(), tensor), name
        assert torch.equal(dequantize_nf4(gpu_packed, gpu_state).cpu(), dequantize_nf4(cpu_packed, cpu_state))


@needs_bnb
@pytest.mark.parametrize("blocksize", [64, 128, 256, 1024])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nf4_against_bitsandbytes_cuda_kernels(blocksize, dtype):
    """bitsandbytes' CUDA quantize_4bit gives the same 4-bit codes. Its second-level (8-bit absmax) codes
    round values within a hair of a midpoint between two codes to the other neighbour (its CUDA kernel
    bisects the code book; its CPU kernel, which anita reproduces on every device, goes through a
    65536-point grid), so those may differ by one code. Its CUDA dequantize_4bit, given anita's state,
    gives anita's values bit for bit (including 256×512 at blocksize 1024, where its CPU kernel is wrong).
    (Seen on an H200, bitsandbytes 0.50.2: 13 of 256 absmax codes one apart for a 4096×64 bf16 weight.)"""
    bnbf = import_bitsandbytes().functional
    for shape in [(256, 512), (4096, 64), (130, 70)]:
        w = weight(shape, dtype, seed=blocksize).cuda()
        packed, state = quantize_nf4(w, blocksize, True)
        P, qs = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
        assert torch.equal(packed, P), f"{shape}: packed bytes differ"
        assert torch.all((state.absmax.int() - qs.absmax.int()).abs() <= 1), f"{shape}: absmax codes 2+ apart"
        torch.testing.assert_close(state.absmax_offset, qs.offset, rtol=1e-6, atol=0)
        ours = dequantize_nf4(packed, state)
        assert torch.equal(ours, bnbf.dequantize_4bit(packed, bnb_quant_state(state))), f"{shape}: values differ"


@needs_bnb
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_bnb_linear_on_cuda_equals_dequantize_then_matmul(compute_dtype):
    """A batch goes through dequantize + matmul in both backends (equal bit for bit); a single token
    through bitsandbytes' 4-bit GEMV kernel, which sums in another order (close, not equal)."""
    linear = torch.nn.Linear(512, 384, bias=False)
    torch.nn.init.normal_(linear.weight, std=0.02)
    a = Linear4bit.from_linear(linear, compute_dtype=compute_dtype, backend="torch").cuda()
    b = Linear4bit.from_linear(linear, compute_dtype=compute_dtype, backend="bnb").cuda()
    x = torch.randn(4, 33, 512, device="cuda", dtype=compute_dtype)
    assert torch.equal(a(x), b(x))
    one = x[:1, :1]
    assert (b(one) - a(one)).abs().max() <= 1e-2 * a(one).abs().max()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a(xa).square().sum().backward()
    b(xb).square().sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-2, atol=1e-3)


def test_moving_a_quantized_model_to_the_gpu_keeps_its_bytes(tmp_path):
    path = tmp_path / "m"
    make_tiny_run_model(path)
    cpu = from_pretrained(path, quantize="nf4")
    gpu = from_pretrained(path, quantize="nf4", device="cuda")
    moved = from_pretrained(path, quantize="nf4").to("cuda", torch.bfloat16)
    cpu_state = cpu.state_dict()
    for name, tensor in gpu.state_dict().items():
        if tensor.dtype == torch.uint8 or "weight_" in name:  # packed codes and their NF4 state
            assert torch.equal(tensor.cpu(), cpu_state[name]), name
            assert torch.equal(moved.state_dict()[name].cpu(), cpu_state[name]), name


# ----------------------------------------------------------------------------------- model
def test_logits_and_greedy_tokens_on_the_gpu_equal_the_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model("llama3.1", seed=3)
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    cpu_logits = model(ids)
    gpu = tiny_model("llama3.1", seed=3).cuda()
    torch.testing.assert_close(gpu(ids.cuda()).cpu(), cpu_logits, rtol=1e-4, atol=1e-4)
    prompt = ids[0, :12].tolist()
    assert generate(gpu, prompt, max_new_tokens=24) == generate(model, prompt, max_new_tokens=24)


def test_batch_size_auto_on_the_gpu_finds_a_batch_that_runs():
    """batch_size=auto's real try: the tiny model fits the maximum; a row so long that even one
    does not fit (its KV cache alone exceeds the GPU's memory) gives 1 after trying every size."""
    from anita.eval.batch_size import auto_batch_size, cuda_fits

    gpu = tiny_model("llama3.1", seed=3).cuda()
    assert auto_batch_size(gpu, 64, max_batch_size=32) == 32
    free, _ = torch.cuda.mem_get_info()
    too_long = free // (2 * gpu.config.num_hidden_layers * gpu.config.num_key_value_heads * gpu.config.head_dim * 4) + 1
    assert not cuda_fits(gpu, 1, too_long) and auto_batch_size(gpu, too_long, max_batch_size=4) == 1


def qlora_model(path, device: str):
    model = from_pretrained(path, quantize="nf4", device=device)
    torch.manual_seed(0)
    apply_lora(model, LoraConfig(r=8, alpha=16))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_a_qlora_sft_step_on_the_gpu_equals_the_cpu(tmp_path):
    """Same NF4 bytes, same adapter, fp32 compute: the loss and the adapter gradients agree."""
    torch.backends.cuda.matmul.allow_tf32 = False
    path = make_tiny_run_model(tmp_path / "m")
    ids = torch.randint(3, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    results = []
    for device in ("cpu", "cuda"):
        model = qlora_model(path, device)
        for m in model.modules():
            if isinstance(m, Linear4bit):
                m.compute_dtype = torch.float32
        batch = {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": None,
                 "position_ids": None}
        loss, count, _ = sft_loss(model, batch)
        (loss / count).backward()
        results.append((loss.item() / count.item(), [p.grad.cpu() for p in lora_parameters(model)]))
    (cpu_loss, cpu_grads), (gpu_loss, gpu_grads) = results
    assert math.isclose(gpu_loss, cpu_loss, rel_tol=1e-5)
    for g_gpu, g_cpu in zip(gpu_grads, cpu_grads):
        torch.testing.assert_close(g_gpu, g_cpu, rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------------------ end to end
def sft_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"quanto fa {i}+{i}?"},
                          {"role": "assistant", "content": f"fa {2 * i}"}]} for i in range(n)]


def pref_rows(n: int) -> list[dict]:
    return [{"prompt": f"colore {i}?", "chosen": "si, rosso", "rejected": "no, blu"} for i in range(n)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sft_cli_on_cuda_trains_and_resumes(tmp_path, precision):
    """`anita sft --device cuda` (QLoRA on bitsandbytes' CUDA kernels, 8-bit AdamW): the loss falls, and
    the run taken back to its step-3 checkpoint and resumed ends with the same adapter, bit for bit."""
    path = make_tiny_run_model(tmp_path / "m")
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows(16))
    whole = tmp_path / "whole"
    argv = ["sft", "--model", str(path), "--data", data, "--device", "cuda", "--precision", precision,
            "--batch-size", "4", "--lr", "3e-3", "--lora-r", "8", "--no-progress", "--save-steps", "3",
            "--optimizer", "adamw_8bit", "--max-steps", "6"]
    assert main([*argv, "--output", str(whole)]) == 0
    records = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    a = load_file(whole / "adapter" / "adapter_model.safetensors")
    shutil.rmtree(whole / "adapter")
    shutil.rmtree(whole / "checkpoints" / "step-000006")
    assert main([*argv, "--output", str(whole), "--resume"]) == 0
    b = load_file(whole / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dpo_cli_on_cuda_learns_a_separable_preference(tmp_path):
    path = make_tiny_run_model(tmp_path / "m")
    data = write_jsonl(tmp_path / "train.jsonl", pref_rows(8))
    out = tmp_path / "dpo"
    argv = ["dpo", "--model", str(path), "--data", data, "--output", str(out), "--device", "cuda",
            "--precision", "bf16", "--batch-size", "4", "--max-length", "64", "--lora-r", "4", "--lora-alpha", "8",
            "--beta", "1", "--lr", "0.02", "--max-steps", "8", "--no-progress",
            "--reference-cache", str(tmp_path / "cache")]
    assert main(argv) == 0
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert math.isclose(losses[0], math.log(2), rel_tol=1e-3) and losses[-1] < losses[0]
