"""`anita dpo`: preference optimization (RECIPE.md stage 2) of a LoRA adapter on the shared loop.

    anita dpo --model DIR [--adapter SFT_ADAPTER] --data FILE --output DIR --beta 0.1 --loss sigmoid
              [--label-smoothing E] [--reference adapters-off|adapter|precomputed|none]
              [--rpo-alpha A] [--max-prompt-length N] [--eval-data FILE] [--config FILE] ...

Every field of `DPOConfig` (the training loop's `TrainConfig` plus the DPO knobs) is a flag and a
key of the `--config` file (TOML or YAML); the defaults of the shared fields are the DPO column of
shared/RECIPE.md (the authors' TRL DPOTrainer script). The output directory is the loop's
(adapter/, checkpoints/, metrics.jsonl, training_curves.png) plus dpo_curves.png.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from anita.dpo.loss import LOSS_TYPES
from anita.errors import AnitaError
from anita.train.config import TrainConfig, _f, add_config_arguments, config_from_args

DPO_PLOT_FILE = "dpo_curves.png"


@dataclass
class DPOConfig(TrainConfig):
    # ---------------------------------------------- the loop's fields, with the recipe's DPO defaults
    data: str | None = _f(None, "preference JSONL: {'prompt', 'chosen', 'rejected'}, strings or message lists "
                                "(required)")
    eval_data: str | None = _f(None, "held-out preference JSONL; its loss and reward accuracy/margins are logged")
    lora_r: int = _f(64, "LoRA rank r (ignored with --adapter: the adapter's own settings are used)")
    lora_alpha: float = _f(16.0, "LoRA alpha (scale alpha/sqrt(r) with --rslora)")
    rslora: bool = _f(True, "rank-stabilised LoRA scale alpha/sqrt(r)")
    optimizer: str = _f("adamw_8bit", "adamw (torch), adamw_8bit or paged_adamw_8bit (bitsandbytes)",
                        choices=["adamw", "adamw_8bit", "paged_adamw_8bit"])
    lr: float = _f(5e-5, "peak learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_ratio: float | None = _f(0.1, "warm-up as a fraction of all steps (rounded up), as in HF")
    batch_size: int = _f(8, "preference pairs per micro-batch (per process)")
    grad_accum: int = _f(12, "micro-batches accumulated per optimizer step (per process)")
    max_length: int = _f(1024, "longest prompt + answer in tokens (TRL's max_length)")
    # ---------------------------------------------------------------------------- DPO's own
    adapter: str | None = _f(None, "SFT adapter (PEFT format) to continue from; then it is also the reference")
    beta: float = _f(0.1, "DPO beta: how tightly the policy is tied to the reference")
    loss: str = _f("sigmoid", "preference loss type (TRL's names)", choices=list(LOSS_TYPES))
    label_smoothing: float = _f(0.0, "label smoothing for sigmoid (cDPO), robust, exo_pair, aot, aot_unpaired")
    reference: str = _f("auto", "the reference model: adapters-off (the base), adapter (the frozen --adapter), "
                                "precomputed (either, computed once and cached), none (reference-free); "
                                "auto = adapter with --adapter, else adapters-off",
                        choices=["auto", "adapters-off", "adapter", "precomputed", "none"])
    reference_cache: str | None = _f(None, "directory of precomputed reference log-probs "
                                           "(default: $ANITA_CACHE/dpo-reference)")
    rpo_alpha: float | None = _f(None, "weight of the chosen answers' NLL added to the loss (RPO); none by default")
    max_prompt_length: int | None = _f(512, "prompt tokens kept (from its start) when prompt + answer is too long")

    def validate(self, source: str = "config") -> "DPOConfig":
        super().validate(source)
        if self.packing:
            raise AnitaError(f"{source}: 'packing' is not supported by DPO (each pair is one row)")
        if self.reference == "adapters-off" and self.adapter:
            raise AnitaError(f"{source}: --reference adapters-off with --adapter would score the policy against "
                             "the bare base, not the SFT model it starts from; use --reference adapter")
        if self.reference == "adapter" and not self.adapter:
            raise AnitaError(f"{source}: --reference adapter needs --adapter (the SFT adapter to freeze)")
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
            raise AnitaError(f"{source}: 'max_prompt_length' must be in [1, max_length = {self.max_length}), "
                             f"got {self.max_prompt_length}")
        return self

    def reference_kind(self) -> str:
        """The reference actually used: 'auto' resolved."""
        if self.reference != "auto":
            return self.reference
        return "adapter" if self.adapter else "adapters-off"

    def settings(self):
        from anita.dpo.trainer import DPOSettings

        return DPOSettings(beta=self.beta, loss_type=self.loss, label_smoothing=self.label_smoothing,
                           rpo_alpha=self.rpo_alpha, chunk_size=self.chunk_size)


# ------------------------------------------------------------------------------------ run
def cache_file(cfg: DPOConfig, key: dict[str, str]) -> Path:
    """Where the reference log-probs with this key live: a file named by the key's hash."""
    from anita.assets import cache_dir

    folder = Path(cfg.reference_cache) if cfg.reference_cache else cache_dir() / "dpo-reference"
    return folder / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24] + ".safetensors")


def precomputed_tables(model, cfg: DPOConfig, datasets: list, info) -> list:
    """Reference log-probs of each data set (`(data, batches)` pairs), from the cache or computed once."""
    from anita.dpo.reference import AdaptersOff, FrozenAdapter, cache_key, cached_reference, model_fingerprint
    from anita.dpo.reference import precompute_reference
    from anita.train.loop import autocast

    frozen = FrozenAdapter(model) if cfg.adapter else AdaptersOff()
    model_hash = model_fingerprint(model, include_adapter=bool(cfg.adapter))
    tables = []
    for data, batches in datasets:
        key = cache_key(data.fingerprint(), model_hash, frozen.kind, cfg.precision)
        compute = lambda: precompute_reference(model, batches, frozen, cfg.chunk_size,  # noqa: E731
                                               autocast=lambda: autocast(cfg, info.device))
        table, cached = cached_reference(cache_file(cfg, key), key, compute)
        if info.is_main:
            print(f"{data.path}: reference log-probs ({frozen.kind}) {'read from' if cached else 'written to'} "
                  f"{cache_file(cfg, key)}", flush=True)
        tables.append(table)
    return tables


def build_reference(model, cfg: DPOConfig):
    from anita.dpo.reference import AdaptersOff, FrozenAdapter, Precomputed, ReferenceFree

    kind = cfg.reference_kind()
    if kind == "precomputed":
        return Precomputed()
    if kind == "none":
        return ReferenceFree()
    return FrozenAdapter(model) if kind == "adapter" else AdaptersOff()


def run_dpo(cfg: DPOConfig) -> list[dict]:
    """Train and return the metrics records; the run directory is `cfg.output`."""
    from anita.dpo.data import PreferenceBatches, read_preferences
    from anita.dpo.trainer import DPOObjective, plot_preference_metrics
    from anita.model import Tokenizer
    from anita.train.checkpoint import prepare_run_dir
    from anita.train.distributed import init_distributed, shutdown
    from anita.train.loop import train
    from anita.train.model import load_trainable_model

    info = init_distributed(cfg.device)
    try:
        tokenizer = Tokenizer.from_pretrained(cfg.model)
        read = lambda path: read_preferences(path, tokenizer, max_length=cfg.max_length,  # noqa: E731
                                             max_prompt_length=cfg.max_prompt_length, skip_bad_rows=cfg.skip_bad_rows)
        datasets = [read(cfg.data)] + ([read(cfg.eval_data)] if cfg.eval_data else [])
        if info.is_main:
            print("\n".join(d.summary() for d in datasets), flush=True)
        out = prepare_run_dir(cfg.to_dict(), cfg.output, cfg.resume, info)  # after the data proved readable
        model, report = load_trainable_model(cfg, info, adapter=cfg.adapter)
        if info.is_main:
            print(report, flush=True)
        batches = [PreferenceBatches(d, cfg.batch_size, tokenizer.pad_id, seed=cfg.seed, shuffle=i == 0)
                   for i, d in enumerate(datasets)]
        if cfg.reference_kind() == "precomputed":
            tables = precomputed_tables(model, cfg, list(zip(datasets, batches)), info)
            batches = [PreferenceBatches(d, cfg.batch_size, tokenizer.pad_id, seed=cfg.seed, shuffle=i == 0,
                                         ref_logps=t) for i, (d, t) in enumerate(zip(datasets, tables))]
        objective = DPOObjective(cfg.settings(), build_reference(model, cfg))
        eval_batches = batches[1] if len(batches) > 1 else None
        records = train(model, objective, batches[0], cfg, info, out, eval_batches, base_model=cfg.model)
        if info.is_main and records:
            plot_preference_metrics(records, out / DPO_PLOT_FILE)
        return records
    finally:
        shutdown(info)


# ------------------------------------------------------------------------------------ CLI
def summary_lines(records: list[dict]) -> list[str]:
    """The end-of-run lines: last training step, and held-out reward accuracy/margins first -> last."""
    lines = []
    train = [r for r in records if "rewards/margins" in r]
    if train:
        last = train[-1]
        lines.append(f"done: {last['step']} steps, last loss {last['loss']:.4f}, reward accuracy "
                     f"{last['rewards/accuracies']:.3f}, margin {last['rewards/margins']:.4f}, "
                     f"peak memory {last['peak_mem_mb']:.0f} MiB")
    evals = [r for r in records if "eval_loss" in r]
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        text = f"held-out loss {first['eval_loss']:.4f} -> {last['eval_loss']:.4f}"
        for key in ("rewards/accuracies", "rewards/margins"):
            if f"eval_{key}" in first:
                text += f", {key} {first[f'eval_{key}']:.4f} -> {last[f'eval_{key}']:.4f}"
        lines.append(text)
    return lines


def run(args) -> int:
    cfg = config_from_args(args, DPOConfig)
    records = run_dpo(cfg)
    for line in summary_lines(records):
        print(line)
    print(f"adapter in {cfg.output}/adapter")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "dpo", help="DPO (and its variants) of a LoRA adapter on preference pairs",
        description="Train a LoRA adapter (on a 4-bit base with --qlora) with DPO on JSONL rows "
                    "{'prompt', 'chosen', 'rejected'}; continue an SFT adapter with --adapter.")
    add_config_arguments(p, DPOConfig)
    p.set_defaults(func=run)
