"""`run_dpo`: preference optimization (docs/recipe.md, stage 2) of a LoRA adapter on the shared
loop, from a `DPOConfig`: read the preference data (unpaired examples for KTO) and check the step
arithmetic (before any model loads), print what the run will do, load the base (+NF4) with a fresh
or the SFT adapter, build the reference (none for ORPO and SimPO), and run
`anita.train.loop.train` with the objective. Under torchrun each process runs this same function.

The output directory is the loop's (adapter/, checkpoints/, metrics.jsonl, training_curves.png)
plus dpo_curves.png.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from anita.assets import cache_dir
from anita.dpo.config import DPOConfig
from anita.dpo.data import PreferenceBatches, read_preferences
from anita.dpo.reference import (
    AdaptersOff,
    FrozenAdapter,
    Precomputed,
    ReferenceFree,
    cache_key,
    cached_reference,
    model_fingerprint,
    precompute_reference,
)
from anita.dpo.trainer import DPOObjective, plot_preference_metrics
from anita.dpo.unpaired import UnpairedBatches, read_unpaired
from anita.model import Tokenizer
from anita.sources import default_cache_dir
from anita.train.distributed import init_distributed, shutdown
from anita.train.loop import autocast, describe, plan_run, train
from anita.train.model import start_run

DPO_PLOT_FILE = "dpo_curves.png"


def build_reference(model, cfg: DPOConfig):
    """The reference object of `anita.dpo.reference` that `cfg.reference` names."""
    kind = cfg.reference_kind()
    if kind == "precomputed":
        return Precomputed()
    if kind == "none":
        return ReferenceFree()
    return FrozenAdapter(model) if kind == "adapter" else AdaptersOff()


def cache_file(cfg: DPOConfig, key: dict[str, str]) -> Path:
    """Where the reference log-probs with this key live: a file named by the key's hash."""
    folder = Path(cfg.reference_cache) if cfg.reference_cache else cache_dir() / "dpo-reference"
    return folder / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24] + ".safetensors")


def precomputed_tables(model, cfg: DPOConfig, datasets: list, info) -> list:
    """Reference log-probs of each data set (`(data, batches)` pairs), from the cache or computed once."""
    frozen = FrozenAdapter(model) if cfg.adapter else AdaptersOff()
    model_hash = model_fingerprint(model, include_adapter=bool(cfg.adapter))
    tables = []
    for data, batches in datasets:
        key = cache_key(data.fingerprint(), model_hash, frozen.kind, cfg.precision, cfg.head_dtype)
        compute = lambda: precompute_reference(model, batches, frozen, cfg.chunk_size,  # noqa: E731
                                               autocast=lambda: autocast(cfg, info.device))
        table, cached = cached_reference(cache_file(cfg, key), key, compute)
        if info.is_main:
            print(f"{data.path}: reference log-probs ({frozen.kind}) {'read from' if cached else 'written to'} "
                  f"{cache_file(cfg, key)}", flush=True)
        tables.append(table)
    return tables


def read_datasets(cfg: DPOConfig, tokenizer) -> list:
    """The training (and held-out) data: preference pairs, or for KTO unpaired examples."""
    read = read_unpaired if cfg.loss == "kto" else read_preferences
    kw = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, skip_bad_rows=cfg.skip_bad_rows,
              columns=cfg.columns, cache_dir=cfg.data_cache or default_cache_dir())
    data = [read(cfg.data, tokenizer, split=cfg.data_split, config=cfg.data_config, max_rows=cfg.max_rows, **kw)]
    if cfg.eval_data:
        data.append(read(cfg.eval_data, tokenizer, split=cfg.eval_split, config=cfg.eval_config, **kw))
    return data


def make_batches(cfg: DPOConfig, data, pad_id: int, train: bool, ref_logps=None):
    """Micro-batches of one data set (with `ref_logps`, carrying the precomputed reference); the
    held-out set in file order, except KTO's: unpaired from pairs it lists every desirable example
    first, so it is shuffled (with the run's fixed seed) to give each batch both kinds and mismatched
    pairs from both."""
    if cfg.loss == "kto":
        return UnpairedBatches(data, cfg.batch_size, pad_id, cfg.max_length, seed=cfg.seed, shuffle=True)
    return PreferenceBatches(data, cfg.batch_size, pad_id, seed=cfg.seed, shuffle=train, ref_logps=ref_logps,
                             shared_prompt=cfg.shared_prompt, packing=cfg.packing, max_tokens=cfg.max_tokens)


def run_dpo(cfg: DPOConfig) -> list[dict]:
    """Train and return the metrics records; the run directory is `cfg.output`."""
    cfg.validate()
    settings = cfg.settings()  # the objective's knobs (checked as they are built): one object for every step
    info = init_distributed(cfg.device)
    try:
        tokenizer = Tokenizer.from_pretrained(cfg.model)
        datasets = read_datasets(cfg, tokenizer)
        batches = [make_batches(cfg, d, tokenizer.pad_id, train=i == 0) for i, d in enumerate(datasets)]
        plan = plan_run(cfg, batches[0].per_epoch, info,  # too little data for a step fails here
                        batches[1].per_epoch if len(batches) > 1 else None)
        if info.is_main:
            layout = "" if cfg.loss == "kto" else \
                f", {'shared-prompt' if cfg.shared_prompt else 'two-row'}{' packed' if cfg.packing else ''} batches"
            print(f"anita dpo: {describe(plan, cfg, info, 'examples' if cfg.loss == 'kto' else 'pairs')}; "
                  f"{cfg.loss} loss, beta {cfg.beta:g}, reference {cfg.reference_kind()}{layout}", flush=True)
            for label, data in zip(("training data", "held-out data"), datasets):
                print(f"{label}: {data.summary()}", flush=True)
        out, model = start_run(cfg, info)
        if cfg.reference_kind() == "precomputed":
            tables = precomputed_tables(model, cfg, list(zip(datasets, batches)), info)
            batches = [make_batches(cfg, d, tokenizer.pad_id, train=i == 0, ref_logps=t)
                       for i, (d, t) in enumerate(zip(datasets, tables))]
        objective = DPOObjective(settings, build_reference(model, cfg))
        eval_batches = batches[1] if len(batches) > 1 else None
        records = train(model, objective, batches[0], cfg, info, out, eval_batches, base_model=cfg.model,
                        unit="example" if cfg.loss == "kto" else "preference pair")
        if info.is_main and records:
            plot_preference_metrics(records, out / DPO_PLOT_FILE)
        return records
    finally:
        shutdown(info)
