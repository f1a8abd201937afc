"""Tests for anita/train/model.py: the QLoRA model (NF4 base + LoRA) that the loop trains, and
bf16 autocast on it."""

import torch

from anita.lora import LoraLinear, lora_parameters
from anita.quant import Linear4bit
from anita.train.config import TrainConfig
from anita.train.data import collate, make_example
from anita.train.distributed import DistInfo
from anita.train.loop import autocast
from anita.train.loss import sft_loss
from anita.train.model import load_trainable_model


def _cfg(model_dir, **kw):
    return TrainConfig(model=str(model_dir), data="d", output="o", **{"lora_r": 2, "lora_alpha": 4, **kw})


def test_qlora_model_has_4bit_bases_and_only_lora_trainable(tiny_run_model):
    model, report = load_trainable_model(_cfg(tiny_run_model, qlora=True), DistInfo())
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(layers) == 14 == len(report.wrapped)  # 7 projections x 2 layers
    assert all(isinstance(m.base_layer, Linear4bit) for m in layers)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(model)}
    assert model.checkpointing == "full"  # the default
    again, _ = load_trainable_model(_cfg(tiny_run_model, qlora=True), DistInfo())
    for a, b in zip(lora_parameters(model), lora_parameters(again)):
        assert torch.equal(a, b)  # seeded init: every process starts from the same adapter


def test_bf16_autocast_loss_is_fp32_and_close_to_fp32(tiny_run_model):
    """The same QLoRA batch in bf16 autocast and in fp32: the loss is an fp32 number either way
    and the two agree to bf16 precision (relative 1e-2)."""
    example, _ = make_example(list(range(40, 80)), [0] * 20 + [1] * 20, 64)
    batch = collate([[example]], pad_id=0)
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = _cfg(tiny_run_model, qlora=True, precision=precision)
        model, _ = load_trainable_model(cfg, DistInfo())
        with autocast(cfg, torch.device("cpu")):
            loss_sum, count, _ = sft_loss(model, batch)
        loss_sum.backward()
        assert loss_sum.dtype == torch.float32
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora_parameters(model))
        losses[precision] = loss_sum.item() / count.item()
    assert abs(losses["bf16"] - losses["fp32"]) < 1e-2 * losses["fp32"]


def test_training_can_continue_a_saved_adapter(tiny_run_model, tmp_path):
    """--adapter (the demo's stage 3 continuing the DPO adapter): the adapter's weights and settings
    (r=2, not the default 16) come back, trainable, instead of a fresh LoRA."""
    from anita.lora import lora_state_dict, save_adapter

    first, _ = load_trainable_model(_cfg(tiny_run_model), DistInfo())
    for p in lora_parameters(first):
        p.data.normal_(0, 0.1)
    save_adapter(first, tmp_path / "adapter")
    cfg = TrainConfig(model=str(tiny_run_model), data="d", output="o", adapter=str(tmp_path / "adapter")).validate()
    again, report = load_trainable_model(cfg, DistInfo())
    assert report.trainable == sum(p.numel() for p in lora_parameters(first))  # r=2 from the file, not 16
    want, got = lora_state_dict(first), lora_state_dict(again)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert all(p.requires_grad for p in lora_parameters(again))


def test_speed_options_reach_the_model(tiny_run_model):
    """--checkpointing, --head-dtype and --fused-projections are set on the loaded model, and the SFT
    loss with all three stays within bf16 head rounding of the plain one (the exactness of each is
    tested beside its code: tests/model/test_fast_paths.py, tests/model/test_logprobs.py)."""
    example, _ = make_example(list(range(40, 80)), [0] * 20 + [1] * 20, 64)
    batch = collate([[example]], pad_id=0)
    losses = {}
    for name, kw in {"plain": {}, "fast": dict(checkpointing="selective", head_dtype="bf16",
                                               fused_projections=True)}.items():
        model, _ = load_trainable_model(_cfg(tiny_run_model, qlora=True, **kw), DistInfo())
        losses[name] = (sft_loss(model, batch)[0] / 20).item()
        if name == "fast":
            assert model.checkpointing == "selective" and model.head_dtype == torch.bfloat16
            assert model.model.layers[0].self_attn.fused and model.model.layers[0].mlp.fused
    assert abs(losses["fast"] - losses["plain"]) < 2e-2 * abs(losses["plain"])


def test_bf16_adapters_as_trls_trainers_train_them(tiny_run_model, tmp_path):
    """--adapter-dtype bf16 (TRL's SFTTrainer/DPOTrainer cast a 4-bit model's adapters to bf16): A, B
    and their gradients are bf16, fresh or continued with --adapter. The seeded init is the fp32 one
    rounded to bf16 and B = 0, so the first loss is the fp32 adapters' exactly and the gradients
    agree with theirs to bf16 rounding."""
    from anita.lora import save_adapter

    example, _ = make_example(list(range(40, 80)), [0] * 20 + [1] * 20, 64)
    batch = collate([[example]], pad_id=0)
    losses, grads = {}, {}
    for dtype, want in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model, _ = load_trainable_model(_cfg(tiny_run_model, adapter_dtype=dtype), DistInfo())
        loss = sft_loss(model, batch)[0] / 20
        loss.backward()
        params = lora_parameters(model)
        assert all(p.dtype == p.grad.dtype == want for p in params)
        losses[dtype], grads[dtype] = loss.item(), torch.cat([p.grad.float().flatten() for p in params])
    assert losses["bf16"] == losses["fp32"]
    g16, g32 = grads["bf16"], grads["fp32"]
    assert g32.norm() > 0 and (g16 - g32).norm() < 2e-2 * g32.norm()
    save_adapter(model, tmp_path / "adapter")  # a bf16 adapter, continued in fp32 and in bf16
    for dtype, want in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cfg = TrainConfig(model=str(tiny_run_model), data="d", output="o", adapter=str(tmp_path / "adapter"),
                          adapter_dtype=dtype).validate()
        again, _ = load_trainable_model(cfg, DistInfo())
        assert all(p.dtype == want for p in lora_parameters(again))
