"""The training loop, shared by SFT, continued pre-training and DPO: an explicit loop over
optimizer steps, each made of gradient-accumulation micro-batches (split over processes when
run under torchrun).

    for step in steps:
        micro-batches of this step (this process's share)
        forward + backward of each: loss_fn(model, batch) -> (loss_sum, count, metrics)
        gradients /= the step's total count (over micro-batches and processes)
        clip, stop on a non-finite loss or gradient, optimizer.step(), scheduler.step()
        log (metrics.jsonl, and --report-to's trackers); evaluate every eval_steps; checkpoint every save_steps
        on SIGTERM/SIGINT: checkpoint, export the adapter, raise Interrupted (anita.train.signals)

The contract with the caller:
- `loss_fn(model, batch)` returns the loss *summed* over the batch's `count` units (trained
  tokens for SFT, preference pairs for DPO) and a dict of per-batch mean metrics. Backward runs
  on the sums and the gradients are divided by the step's total count afterwards, so
  accumulating k micro-batches on n processes is exactly one big batch: the same mean over the
  same units, however they were split. The metrics are averaged the same way, weighted by each
  batch's count; a metric given as a (value, weight) pair carries its own weight instead (KTO's
  mean reward of the desirable examples is weighted by how many the batch holds), and one whose
  weights sum to 0 is left out of the record.
- `data[i]` is micro-batch i of an endless deterministic stream (a dict of tensors; an optional
  `num_tokens` entry feeds tokens/s) and `data.per_epoch` its length per epoch, as
  `anita.train.data.MicroBatches`. Step s uses micro-batches s·k·n ... (s+1)·k·n - 1, and process
  r takes every n-th of them from the r-th on.

The setup it builds on (optimizer, scheduler, DDP, checkpoints, metrics) lives in the
neighbouring files, one job each.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn

from anita.dtypes import PRECISIONS
from anita.errors import AnitaError, Interrupted
from anita.runtime import eval_mode
from anita.train import checkpoint as ckpt
from anita.train.config import TrainConfig
from anita.train.distributed import DistInfo, all_reduce_sum, maybe_no_sync, wrap_ddp
from anita.train.fsdp import check_fsdp, whole
from anita.train.metrics import METRICS_FILE, PLOT_FILE, MetricsLog, peak_memory_mb, plot_metrics, progress_bar
from anita.train.optim import build_optimizer, build_scheduler, optimizer_for, warmup_steps_for
from anita.train.signals import StopSignals
from anita.train.tracking import open_trackers

LossFn = Callable[[nn.Module, dict], tuple[torch.Tensor, torch.Tensor, dict]]


class LossModule(nn.Module):
    """`loss_fn(model, batch)` as a module, so that DDP sees one forward per micro-batch."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict):
        return self.loss_fn(self.model, batch)


def total_steps(cfg: TrainConfig, per_epoch: int, world_size: int) -> int:
    """--max-steps, else the whole steps that fit in --epochs (a last partial step is dropped)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_step = cfg.grad_accum * world_size
    steps = cfg.epochs * per_epoch // per_step
    if steps < 1:
        raise AnitaError(f"--data gives {per_epoch} micro-batches per epoch; one optimizer step needs "
                         f"{per_step} (grad_accum {cfg.grad_accum} x {world_size} processes): lower them or add data")
    return steps


@dataclass(frozen=True)
class RunPlan:
    """What a run will do, known before any model loads; `describe` is the run's first line."""

    steps: int  # optimizer steps
    warmup: int  # of them, warm-up steps
    optimizer: str  # as built on this device (see optim.optimizer_for)
    per_epoch: int  # micro-batches per epoch (per all processes)


def plan_run(cfg: TrainConfig, per_epoch: int, info: DistInfo, eval_per_epoch: int | None = None) -> RunPlan:
    """The step arithmetic of a run; too little data for one step, or held-out data that leaves a
    process without a micro-batch to evaluate, is an error here, before loading."""
    if eval_per_epoch is not None and eval_per_epoch < info.world_size:
        budget = "--max-tokens" if cfg.max_tokens is not None else "--batch-size"  # what sizes the micro-batches
        raise AnitaError(f"--eval-data gives {eval_per_epoch} micro-batch(es); each of the {info.world_size} processes "
                         f"needs at least one: lower {budget} or add held-out rows")
    if cfg.fsdp:
        check_fsdp(info)
    steps = total_steps(cfg, per_epoch, info.world_size)
    return RunPlan(steps, warmup_steps_for(steps, cfg.warmup_steps, cfg.warmup_ratio),
                   optimizer_for(cfg.optimizer, info.device), per_epoch)


def describe(plan: RunPlan, cfg: TrainConfig, info: DistInfo, unit: str) -> str:
    """One line (plus a warning line when warm-up fills the run): the batch, steps, schedule,
    optimizer, lengths and model a run will use, so that nothing about it is a surprise."""
    batch = cfg.batch_size * cfg.grad_accum * info.world_size
    per_micro_batch = f"{cfg.batch_size} per micro-batch"
    if cfg.max_tokens is not None:  # a token budget: the number of units per micro-batch varies
        batch, per_micro_batch = "token-budget batches of", f"at most {cfg.max_tokens} tokens per micro-batch"
    model = "NF4 base (QLoRA)" if cfg.qlora else "full-precision base"
    adapter = f"the adapter {cfg.adapter}" if cfg.adapter else f"a fresh LoRA r={cfg.lora_r}, alpha={cfg.lora_alpha:g}"
    optimizer = plan.optimizer + (f" ({cfg.optimizer} pages only on CUDA)" if plan.optimizer != cfg.optimizer else "")
    sharded = " sharding the model (FSDP)" if cfg.fsdp else ""
    line = (f"{plan.steps} steps of {batch} {unit} ({per_micro_batch} x {cfg.grad_accum} accumulated "
            f"x {info.world_size} process(es){sharded}; {plan.per_epoch} micro-batches per epoch); "
            f"warm-up {plan.warmup} steps, then {cfg.scheduler}; {optimizer}, lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}; "
            f"max_length {cfg.max_length}; {model} with {adapter}; {cfg.precision} compute, {cfg.head_dtype} "
            f"head, {cfg.adapter_dtype} adapters")
    if plan.warmup and plan.warmup >= plan.steps:
        line += (f"\nwarning: the warm-up ({plan.warmup} steps) is as long as the run ({plan.steps} steps), so the "
                 f"learning rate never reaches --lr {cfg.lr:g}; lower --warmup-steps or set --warmup-ratio")
    return line


def step_batches(data, step: int, grad_accum: int, info: DistInfo) -> list[dict]:
    """This process's micro-batches of optimizer step `step`."""
    first = step * grad_accum * info.world_size
    return [data[first + j * info.world_size + info.rank] for j in range(grad_accum)]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast for --precision bf16 (the loss stays fp32 inside), else a no-op."""
    return torch.autocast(device.type, dtype=PRECISIONS[cfg.precision], enabled=cfg.precision != "fp32")


# ------------------------------------------------------------------------- metrics
def add_metrics(weighted: dict[str, list[float]], metrics: dict, count: float) -> None:
    """Add one batch's metrics to the running [Σ value·weight, Σ weight] of each; the weight is the
    batch's count, or the metric's own when it is given as (value, weight)."""
    for k, v in metrics.items():
        value, weight = v if isinstance(v, tuple) else (v, count)
        acc = weighted.setdefault(k, [0.0, 0.0])
        acc[0] += float(value) * float(weight) if weight else 0.0
        acc[1] += float(weight)


def reduce_metrics(sums: torch.Tensor, weighted: dict[str, list[float]], info: DistInfo):
    """All-reduce the loop's sums and the weighted metrics (every process has the same keys: the
    same loss function) -> (sums, {metric: weighted mean}), metrics of zero total weight left out."""
    keys = sorted(weighted)
    flat = torch.tensor([x for k in keys for x in weighted[k]], dtype=torch.float64)
    reduced = all_reduce_sum(torch.cat([sums, flat]), info)
    pairs = reduced[len(sums):].view(-1, 2).tolist()
    return reduced[:len(sums)], {k: total / weight for k, (total, weight) in zip(keys, pairs) if weight > 0}


# ------------------------------------------------------------------------- one step
def accumulate(runner: nn.Module, batches: list[dict], cfg: TrainConfig, info: DistInfo):
    """Forward and backward every micro-batch; returns the all-reduced sums
    (loss_sum, count, tokens) and the weighted means of the metrics."""
    sums = torch.zeros(3, dtype=torch.float64)
    weighted: dict[str, list[float]] = {}
    for i, batch in enumerate(batches):
        batch = to_device(batch, info.device)
        with maybe_no_sync(runner, skip_sync=i < len(batches) - 1), autocast(cfg, info.device):
            loss_sum, count, metrics = runner(batch)
        loss_sum.backward()
        n = float(count)
        sums += torch.tensor([loss_sum.item(), n, float(batch.get("num_tokens", 0))], dtype=torch.float64)
        add_metrics(weighted, metrics, n)
    return reduce_metrics(sums, weighted, info)


def finish_gradients(params: list[nn.Parameter], total_count: float, max_grad_norm: float,
                     info: DistInfo) -> float:
    """Turn summed gradients into the gradient of the step's mean loss, clip, return the norm.

    DDP (or FSDP's reduce-scatter) already averaged the sums over the n processes, so the factor
    is n / total count. Under FSDP the gradients are shards and the norm is of the whole gradient.
    """
    scale = info.world_size / max(total_count, 1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    return float(whole(norm))


def train_step(runner, data, step: int, params, optimizer, scheduler, cfg: TrainConfig, info: DistInfo) -> dict:
    """Compute the step's gradients and its record; the update itself is left to the caller,
    which first checks that they are finite."""
    start = time.perf_counter()
    sums, metrics = accumulate(runner, step_batches(data, step, cfg.grad_accum, info), cfg, info)
    loss_sum, count, tokens = sums.tolist()
    grad_norm = finish_gradients(params, count, cfg.max_grad_norm, info)
    seconds = time.perf_counter() - start
    micro_batches = (step + 1) * cfg.grad_accum * info.world_size
    return {"step": step + 1, "epoch": round(micro_batches / data.per_epoch, 4),
            "loss": loss_sum / max(count, 1.0), "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
            "tokens_per_s": tokens / seconds, "peak_mem_mb": round(peak_memory_mb(info.device), 1),
            "tokens": int(tokens), "count": int(count),
            **metrics}


def last_good(last_checkpoint) -> str:
    return f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"


def check_finite(record: dict, last_checkpoint) -> None:
    """Stop the run on a non-finite loss or gradient, pointing at the last good checkpoint."""
    if math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]):
        return
    where = last_good(last_checkpoint)
    raise AnitaError(f"step {record['step']}: non-finite loss ({record['loss']}) or gradient norm "
                     f"({record['grad_norm']}); training stopped before the update and {where}. "
                     "Lower --lr, check the data, or use --precision fp32, then --resume")


@torch.no_grad()
def evaluate(module: LossModule, data, cfg: TrainConfig, info: DistInfo) -> tuple[float, dict]:
    """Mean loss per unit over one pass of `data` (each process takes every n-th micro-batch), and
    the loss function's metrics averaged the same way (count-weighted; DPO's reward accuracy).
    A sharded model's forward is a collective, so with --fsdp a process short of one micro-batch
    (n does not divide the count) runs its last one again and leaves the result out."""
    sums = torch.zeros(2, dtype=torch.float64)
    weighted: dict[str, list[float]] = {}
    mine = list(range(info.rank, data.per_epoch, info.world_size))
    forwards = math.ceil(data.per_epoch / info.world_size) if cfg.fsdp else len(mine)
    with eval_mode(module):  # no dropout
        for j in range(forwards):
            with autocast(cfg, info.device):
                loss_sum, count, metrics = module(to_device(data[mine[min(j, len(mine) - 1)]], info.device))
            if j < len(mine):
                sums += torch.tensor([loss_sum.item(), float(count)], dtype=torch.float64)
                add_metrics(weighted, metrics, float(count))
    (loss_sum, count), metrics = reduce_metrics(sums, weighted, info)
    return loss_sum.item() / max(count.item(), 1.0), metrics


# ------------------------------------------------------------------------------ the run
def build_training(model, cfg: TrainConfig, plan: RunPlan):
    """The trainable parameters, optimizer and lr schedule of a run."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, plan.optimizer, cfg.lr, cfg.weight_decay)
    return params, optimizer, build_scheduler(optimizer, plan.warmup, plan.steps, cfg.scheduler)


def resume_point(out, model, optimizer, scheduler, log: MetricsLog, info: DistInfo):
    """(first step to run, last checkpoint): from the newest good checkpoint, or (0, None)."""
    step, last = ckpt.load_latest(out, model, optimizer, scheduler, info)
    if info.is_main:
        log.truncate_after(step if last is not None else -1)  # later records will be written again
        if last is not None:
            print(f"resuming from {last} (step {step})", flush=True)
    return step, last


def save(out, step, model, optimizer, scheduler, cfg: TrainConfig, info: DistInfo, base_model, last=None):
    """Checkpoint `step`; a write that fails (a full disk) stops the run naming the file and `last`."""
    if not ckpt.adapter_is_finite(model, info):
        raise AnitaError(f"step {step}: the adapter holds non-finite weights; not saving it. Lower --lr and --resume")
    try:
        return ckpt.save_checkpoint(out, step, model, optimizer, scheduler, info, cfg.keep_checkpoints, base_model)
    except ckpt.CheckpointWriteError as e:
        raise AnitaError(f"step {step}: {e}, so checkpoint {step} was not saved; {last_good(last)}. "
                         "Free some space, then --resume") from None


def stop_for_signal(signum: int, done: int, steps: int, last, save_now, out, log: MetricsLog, info: DistInfo,
                    unit: str):
    """After SIGTERM/SIGINT: checkpoint step `done` (unless it was just written), export its adapter,
    and raise `Interrupted` saying where both are."""
    if last is None or last.name != f"step-{done:06d}":
        last = save_now()
    finish_run(out, last, log, info, unit)
    raise Interrupted(f"stopped by {signal.Signals(signum).name} after step {done} of {steps}: checkpoint {last}, "
                      f"its adapter in {out / 'adapter'}; --resume continues the run", signum)


def train(model: nn.Module, loss_fn: LossFn, data, cfg: TrainConfig, info: DistInfo, out,
          eval_data=None, base_model: str | None = None, unit: str = "trained token") -> list[dict]:
    """Train the model's trainable parameters; resume from OUTPUT's last checkpoint if there is
    one. Returns the metrics records of the whole run (also in OUTPUT/metrics.jsonl). `unit` is
    what loss_fn's count counts (SFT: trained tokens; DPO: preference pairs), for the plot."""
    plan = plan_run(cfg, data.per_epoch, info)
    steps = plan.steps
    params, optimizer, scheduler = build_training(model, cfg, plan)
    log = MetricsLog(out / METRICS_FILE)
    torch.manual_seed(cfg.seed + info.rank)  # dropout; replaced by the checkpoint's RNG on resume
    start, last = resume_point(out, model, optimizer, scheduler, log, info)
    module = LossModule(model, loss_fn)
    runner = module if cfg.fsdp else wrap_ddp(module, info)  # a sharded model communicates itself
    module.train()
    # --report-to (rank 0): the trackers get every record appended from here on; resumed, from step start + 1
    trackers = open_trackers(cfg.report_to, out, start + 1 if start else 0, cfg.to_dict()) if info.is_main else []
    with log.tracking(trackers):
        if eval_data is not None and start == 0:
            _log_eval(module, eval_data, 0, cfg, info, log)
        bar = progress_bar(steps, start, cfg.progress and info.is_main)
        with StopSignals() as signals:  # SIGTERM/SIGINT: stop after the step, saved (anita.train.signals)
            for step in range(start, steps):
                record = train_step(runner, data, step, params, optimizer, scheduler, cfg, info)
                check_finite(record, last)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if info.is_main:
                    log.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                done = step + 1
                if eval_data is not None and (done == steps or (cfg.eval_steps and done % cfg.eval_steps == 0)):
                    bar.set_postfix_str(f"step {done}: held-out evaluation")
                    _log_eval(module, eval_data, done, cfg, info, log, say=bar.write)
                save_now = partial(save, out, done, model, optimizer, scheduler, cfg, info, base_model, last)
                if done == steps or done % cfg.save_steps == 0:
                    bar.set_postfix_str(f"step {done}: writing checkpoint")
                    last = save_now()
                if done < steps and (signum := signals.requested(info)) is not None:
                    bar.close()
                    stop_for_signal(signum, done, steps, last, save_now, out, log, info, unit)
        bar.close()
    return finish_run(out, last, log, info, unit)


def _log_eval(module, eval_data, step, cfg, info, log, say=print) -> None:
    loss, metrics = evaluate(module, eval_data, cfg, info)
    if info.is_main:
        log.append({"step": step, "eval_loss": loss, **{f"eval_{k}": v for k, v in metrics.items()}})
        say(f"step {step}: held-out loss {loss:.4f}")


def finish_run(out, last, log: MetricsLog, info: DistInfo, unit: str = "trained token") -> list[dict]:
    """OUTPUT/adapter from the last checkpoint, and the plot of the curves (rank 0)."""
    records = log.read() if info.is_main else []
    if info.is_main and last is not None:
        ckpt.export_adapter(last, out)
        plot_metrics(records, out / PLOT_FILE, loss_title=f"loss (per {unit})")
    return records
