"""Tests for anita/train/optim.py: the schedules against Hugging Face's (the authors' scripts use
them through TRL) and by hand, and the bitsandbytes 8-bit optimizers running on CPU."""

import math

import pytest
import torch

from anita.errors import AnitaError
from anita.train.optim import build_optimizer, build_scheduler, lr_multiplier, warmup_steps_for


def _lrs(schedule, warmup, total, peak=1.0):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = build_scheduler(opt, warmup, total, schedule)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_schedules_by_hand():
    """Warm-up 2 of 6 steps: 0, 1/2, then linear 1, 3/4, 1/2, 1/4 (reaching 0 at step 6);
    cosine: 1, (1+cos(π/4))/2, 1/2, (1+cos(3π/4))/2; constant stays at 1."""
    assert _lrs("linear", 2, 6) == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]
    c = [0.0, 0.5, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2]
    assert _lrs("cosine", 2, 6) == pytest.approx(c)
    assert _lrs("constant", 2, 6) == [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert _lrs("linear", 0, 3, peak=3e-4) == pytest.approx([3e-4, 2e-4, 1e-4])
    assert warmup_steps_for(95, 100, 0.1) == 10  # ceil(9.5), as HF
    assert warmup_steps_for(95, 100, None) == 100
    with pytest.raises(AnitaError, match="unknown schedule"):
        lr_multiplier(0, 1, 2, "exponential")


@pytest.mark.parametrize("schedule,warmup,total", [("linear", 100, 1000), ("cosine", 10, 57), ("linear", 0, 7),
                                                   ("constant", 3, 9), ("linear", 12, 8)])
def test_schedules_equal_transformers(schedule, warmup, total):
    transformers = pytest.importorskip("transformers")
    make = {"linear": transformers.get_linear_schedule_with_warmup,
            "cosine": transformers.get_cosine_schedule_with_warmup,
            "constant": lambda opt, w, _t: transformers.get_constant_schedule_with_warmup(opt, w)}[schedule]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    hf = make(opt, warmup, total)
    want = []
    for _ in range(total):
        want.append(hf.get_last_lr()[0])
        opt.step()
        hf.step()
    assert _lrs(schedule, warmup, total, peak=2e-4) == pytest.approx(want, rel=1e-12, abs=0)


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "paged_adamw_8bit"])
def test_optimizers_minimise_a_quadratic(name):
    """Each optimizer (bitsandbytes' on CPU; paged falls back to unpaged there) drives
    ||w - 1||² down for a 64x64 weight (big enough for 8-bit state) and a small vector (32-bit state)."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    w, v = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(8))
    opt = build_optimizer([w, v], name, lr=0.05, weight_decay=0.0)
    loss0 = None
    with pytest.warns(UserWarning) if name.startswith("paged") else _nothing():
        for _ in range(30):
            loss = ((w - 1) ** 2).sum() + ((v - 1) ** 2).sum()
            loss0 = loss0 if loss0 is not None else loss.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert loss.item() < 0.2 * loss0
    if name != "adamw":
        assert opt.state[w]["state1"].dtype == torch.uint8  # really 8-bit state


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def test_optimizer_errors():
    with pytest.raises(AnitaError, match="no trainable parameters"):
        build_optimizer([], "adamw", lr=1e-3)
    with pytest.raises(AnitaError, match="unknown optimizer 'sgd'"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], "sgd", lr=1e-3)
