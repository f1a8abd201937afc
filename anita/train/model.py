"""The model being trained: the base checkpoint (in 4-bit NF4 for QLoRA) with LoRA on its linears.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314): the base linears are frozen in NF4 with double
quantization and compute in the training dtype; only the LoRA matrices (fp32) are trained.
Shared by SFT and DPO.
"""

from __future__ import annotations

import torch

from anita.dtypes import PRECISIONS
from anita.errors import AnitaError
from anita.hub import resolve_model_dir
from anita.lora import LoraConfig, apply_lora, load_adapter
from anita.lora.model import OUTPUT_LAYER, check_wrappable, find_targets
from anita.lora.pretrained import read_adapter_for
from anita.model import from_pretrained, model_skeleton
from anita.model.fused import set_fused_projections
from anita.train.checkpoint import prepare_run_dir, record_in_run_file
from anita.train.config import TrainConfig
from anita.train.distributed import DistInfo, barrier
from anita.train.fsdp import shard_model


def lora_config(cfg: TrainConfig) -> LoraConfig:
    targets = "all-linear" if cfg.targets == ["all-linear"] else tuple(cfg.targets)
    return LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=targets,
                      use_rslora=cfg.rslora, dtype=PRECISIONS[cfg.adapter_dtype])


def check_model_fits(cfg: TrainConfig) -> None:
    """What the base's config.json alone can tell, checked before any weight loads: --adapter fits
    the model, or --targets name linears of it (its meta-device skeleton); neither adapts lm_head,
    whose plain weight the chunked loss reads (`anita.model.logprobs.output_head_weight`)."""
    model_dir = resolve_model_dir(cfg.model)
    if cfg.adapter:
        names, where = read_adapter_for(model_dir, cfg.adapter).targets, f"--adapter {cfg.adapter}"
    else:
        skeleton, where = model_skeleton(model_dir), "--targets"
        try:
            names = find_targets(skeleton, lora_config(cfg).target_modules)
            check_wrappable(skeleton, names)
        except AnitaError as e:
            raise AnitaError(f"--targets: {str(e).removeprefix('LoraConfig.target_modules: ')}") from None
    if OUTPUT_LAYER in names:
        raise AnitaError(f"{where}: LoRA on {OUTPUT_LAYER} cannot be trained: the loss computes the output head "
                         f"chunked from its plain weight; leave {OUTPUT_LAYER} out")


def load_trainable_model(cfg: TrainConfig, info: DistInfo):
    """(model, LoraReport): the base loaded on this process's device, LoRA applied, the rest frozen.

    The LoRA init is seeded with --seed, so every process starts from the same adapter.
    With `cfg.adapter` (a PEFT adapter directory) that adapter is loaded and trained further instead
    of a fresh one. With `cfg.fsdp` the model loads on the CPU, for `start_run` to shard it over
    the processes, each shard moving to its process's device (`anita.train.fsdp.shard_model`).
    """
    dtype = PRECISIONS[cfg.precision]
    quant = {"quantize": "nf4", "quantize_kwargs": {"compute_dtype": dtype}} if cfg.qlora else {}
    device = torch.device("cpu") if cfg.fsdp else info.device  # the whole model never sits on one GPU
    model = from_pretrained(cfg.model, dtype=dtype, device=device, **quant)
    model.checkpointing = cfg.checkpointing
    model.head_dtype = None if cfg.head_dtype == "fp32" else PRECISIONS[cfg.head_dtype]
    torch.manual_seed(cfg.seed)
    if cfg.adapter:
        report = load_adapter(model, cfg.adapter, PRECISIONS[cfg.adapter_dtype])
    else:
        report = apply_lora(model, lora_config(cfg))
    set_fused_projections(model, cfg.fused_projections)
    return model, report


def start_run(cfg: TrainConfig, info: DistInfo):
    """(run directory, trainable model), once the data and the plan have been checked: the model's
    fit (--targets, --adapter) against its config.json first, then the run directory, then the load,
    the first costly step. Shared by `run_sft` and `run_dpo`, so a bad setting never leaves a run.json.
    With --fsdp the model is then sharded, and run.json records what each process holds of the base."""
    check_model_fits(cfg)
    out = prepare_run_dir(cfg.to_dict(), cfg.output, cfg.resume, info, defaults=type(cfg)().to_dict())
    model, report = load_trainable_model(cfg, info)
    if info.is_main:
        print(report, flush=True)
    if cfg.fsdp:
        sharding = shard_model(model, info)
        if info.is_main:
            record_in_run_file(out, "sharding", sharding)
            mib = ", ".join(f"{b / 2**20:.2f}" for b in sharding["base_bytes_per_rank"])
            print(f"fsdp: the base ({sharding['base_bytes'] / 2**20:.2f} MiB) sharded over {info.world_size} "
                  f"processes: {mib} MiB each", flush=True)
        barrier(info)
    return out, model
