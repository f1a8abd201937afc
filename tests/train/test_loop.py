"""Tests for anita/train/loop.py: gradient accumulation is exactly a bigger batch, a non-finite
loss stops the run and keeps the last good checkpoint, and the loop is generic in its loss.

Run on the tiny Llama with LoRA and the byte-tokenized chats of tests/train/conftest.py.
"""

import json
import math

import pytest
import torch

from anita.errors import AnitaError
from anita.lora import LoraConfig, apply_lora, lora_parameters
from anita.train.checkpoint import adapter_is_finite, latest_checkpoint, load_checkpoint
from anita.train.config import TrainConfig
from anita.train.data import MicroBatches, load_examples
from anita.train.distributed import DistInfo
from anita.train.loop import (LossModule, RunPlan, build_training, describe, plan_run, total_steps, train,
                              train_step)
from anita.train.loss import sft_loss
from tests.conftest import tiny_model
from tests.train.conftest import VOCAB, chat_rows, write_jsonl


@pytest.fixture(scope="module")
def examples(tmp_path_factory, byte_tokenizer):
    path = write_jsonl(tmp_path_factory.mktemp("data") / "chats.jsonl", chat_rows(8))
    return load_examples(path, byte_tokenizer, max_length=64)[0]


def _lora_model(seed=0):
    model = tiny_model("llama3", vocab_size=VOCAB)
    torch.manual_seed(seed)
    apply_lora(model, LoraConfig(r=2, alpha=4))
    for p in lora_parameters(model):  # B starts at zero; make both factors non-trivial
        p.data.normal_(0, 0.1)
    return model.train()


def _cfg(**kw):
    return TrainConfig(model="m", data="d", output="o", optimizer="adamw", max_grad_norm=0.0, warmup_steps=0,
                       progress=False, **kw)


def _one_step_gradients(examples, batch_size, grad_accum):
    model = _lora_model()
    cfg = _cfg(batch_size=batch_size, grad_accum=grad_accum)
    data = MicroBatches(examples, batch_size, 64, packing=False, pad_id=0, shuffle=False)
    params, optimizer, scheduler = build_training(model, cfg, RunPlan(steps=1, warmup=0, optimizer="adamw", per_epoch=1))
    with_metric = lambda m, b: (*sft_loss(m, b)[:2], {"one": 1.0})  # noqa: E731
    record = train_step(LossModule(model, with_metric), data, 0, params, optimizer, scheduler, cfg, DistInfo())
    return [p.grad.clone() for p in params], record


def test_gradient_accumulation_equals_one_big_batch(examples):
    """8 chats as 1 x 8, 2 x 4, 4 x 2 and 8 x 1 (micro-batch x accumulation): the same mean loss
    per trained token and the same gradients, although micro-batches hold different numbers of
    trained tokens and different padding."""
    big_grads, big = _one_step_gradients(examples, 8, 1)
    assert big["count"] == sum(e.trained_tokens for e in examples)
    for batch_size, accum in [(4, 2), (2, 4), (1, 8)]:
        grads, record = _one_step_gradients(examples, batch_size, accum)
        assert record["count"] == big["count"] and record["tokens"] == big["tokens"]
        assert record["loss"] == pytest.approx(big["loss"], rel=1e-6)
        assert record["one"] == pytest.approx(1.0)  # loss-function metrics: count-weighted means
        for g, want in zip(grads, big_grads):
            torch.testing.assert_close(g, want, atol=1e-6, rtol=1e-5)


def test_total_steps_from_epochs_or_max_steps():
    assert total_steps(_cfg(grad_accum=2, epochs=3), per_epoch=5, world_size=1) == 7  # floor(15 / 2)
    assert total_steps(_cfg(grad_accum=2, max_steps=11), per_epoch=5, world_size=2) == 11
    with pytest.raises(AnitaError, match="one optimizer step needs 8"):
        total_steps(_cfg(grad_accum=4), per_epoch=5, world_size=2)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(examples, tmp_path):
    """A loss function that turns NaN on its 5th call (step 5, one micro-batch per step) stops
    the run before the update, with a message naming the step and the step-4 checkpoint, which
    stays intact and loadable; no final adapter is exported."""
    calls = []

    def nan_at_fifth_call(model, batch):
        calls.append(1)
        loss_sum, count, metrics = sft_loss(model, batch)
        return (loss_sum * math.nan if len(calls) == 5 else loss_sum), count, metrics

    model = _lora_model()
    data = MicroBatches(examples, 1, 64, packing=False, pad_id=0, seed=0)
    cfg = _cfg(batch_size=1, grad_accum=1, max_steps=8, save_steps=1, lr=1e-3)
    with pytest.raises(AnitaError, match=r"step 5: non-finite loss \(nan\).*step-000004"):
        train(model, nan_at_fifth_call, data, cfg, DistInfo(), tmp_path)
    assert adapter_is_finite(model)  # the NaN gradient was never applied
    last = latest_checkpoint(tmp_path)
    assert last.name == "step-000004"
    params, optimizer, scheduler = build_training(_lora_model(), cfg, plan_run(cfg, data.per_epoch, DistInfo()))
    assert load_checkpoint(last, _lora_model(), optimizer, scheduler, DistInfo()) == 4
    assert not (tmp_path / "adapter").exists()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_the_plan_line_says_what_the_run_will_do():
    """The first line of a run: effective batch, steps, warm-up, the optimizer as built, lengths,
    the model; a warm-up that fills the run is a warning; paged 8-bit AdamW is plain 8-bit on CPU."""
    cfg = TrainConfig(model="m", data="d", output="o", batch_size=4, grad_accum=2, warmup_steps=100, max_steps=24,
                      optimizer="paged_adamw_8bit")
    plan = plan_run(cfg, per_epoch=10, info=DistInfo())
    assert plan == RunPlan(steps=24, warmup=100, optimizer="adamw_8bit", per_epoch=10)
    text = describe(plan, cfg, DistInfo(), "rows")
    assert text.startswith("24 steps of 8 rows (4 per micro-batch x 2 accumulated x 1 process(es); 10 micro-batches")
    assert "warm-up 100 steps" in text and "adamw_8bit (paged_adamw_8bit pages only on CUDA)" in text
    assert "NF4 base (QLoRA) with a fresh LoRA r=16, alpha=8" in text
    assert "\nwarning: the warm-up (100 steps) is as long as the run (24 steps)" in text
    assert "warning" not in describe(plan_run(_cfg(max_steps=24), 10, DistInfo()), _cfg(max_steps=24), DistInfo(), "rows")


@pytest.mark.parametrize("sizing, flag", [({}, "--batch-size"), ({"max_tokens": 512}, "--max-tokens")])
def test_held_out_data_must_give_every_process_a_micro_batch(sizing, flag):
    """With fewer held-out micro-batches than processes, one process would evaluate nothing and the
    all-reduce would not line up: refused before the model loads, naming the flag that sizes the batches."""
    two = DistInfo(rank=0, world_size=2)
    with pytest.raises(AnitaError, match=f"--eval-data gives 1 micro-batch.*each of the 2 processes.*lower {flag} "):
        plan_run(_cfg(max_steps=4, **sizing), per_epoch=8, info=two, eval_per_epoch=1)
    assert plan_run(_cfg(max_steps=4, **sizing), per_epoch=8, info=two, eval_per_epoch=2).steps == 4


def test_metrics_are_weighted_means_and_absent_ones_are_left_out():
    """A metric is weighted by its batch's count, or by its own weight when given as (value, weight);
    one whose weights sum to 0 (no batch had it) is left out rather than averaged as 0."""
    from anita.train.loop import add_metrics, reduce_metrics

    weighted: dict = {}
    add_metrics(weighted, {"acc": 1.0, "reward/chosen": (2.0, 3), "margin": (5.0, 0)}, count=4)
    add_metrics(weighted, {"acc": 0.0, "reward/chosen": (4.0, 1), "margin": (7.0, 0)}, count=2)
    sums, metrics = reduce_metrics(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), weighted, DistInfo())
    assert sums.tolist() == [1.0, 2.0, 3.0]
    assert metrics == {"acc": pytest.approx(4 / 6), "reward/chosen": pytest.approx((6 + 4) / 4)}
