"""`run_sft`: supervised fine-tuning and continued pre-training (docs/recipe.md, stages 1 and 3)
from a `TrainConfig`: read the data and check the step arithmetic (before any model loads, so a bad
setting fails in seconds), print what the run will do, load the base (+NF4) and put LoRA on it,
run the shared loop with the next-token loss. Under torchrun each process runs this function.
"""

from __future__ import annotations

from functools import partial

from anita.model import Tokenizer
from anita.sources import default_cache_dir
from anita.train.config import TrainConfig
from anita.train.data import MicroBatches, load_examples
from anita.train.distributed import init_distributed, shutdown
from anita.train.loop import describe, plan_run, train
from anita.train.loss import sft_loss
from anita.train.model import start_run


def load_data(path, tokenizer, cfg: TrainConfig, shuffle: bool) -> tuple[MicroBatches, str]:
    """The micro-batches of one source (--data when `shuffle`, else --eval-data) and the line that
    summarises its rows; the tokens are cached (anita.sources.store)."""
    split, config, max_rows = (cfg.data_split, cfg.data_config, cfg.max_rows) if shuffle else \
        (cfg.eval_split, cfg.eval_config, None)
    examples, report = load_examples(path, tokenizer, cfg.max_length, cfg.skip_bad_rows, split=split, config=config,
                                     max_rows=max_rows, columns=cfg.columns, text_field=cfg.text_field,
                                     cache_dir=cfg.data_cache or default_cache_dir())
    batches = MicroBatches(examples, cfg.batch_size, cfg.max_length, cfg.packing, tokenizer.pad_id,
                           seed=cfg.seed, shuffle=shuffle, max_tokens=cfg.max_tokens)
    return batches, report.summary()


def run_sft(cfg: TrainConfig) -> list[dict]:
    """Train and return the metrics records; the run directory is `cfg.output`."""
    cfg.validate()
    info = init_distributed(cfg.device)
    try:
        tokenizer = Tokenizer.from_pretrained(cfg.model)
        train_data, train_summary = load_data(cfg.data, tokenizer, cfg, shuffle=True)
        eval_data, eval_summary = load_data(cfg.eval_data, tokenizer, cfg, shuffle=False) if cfg.eval_data else (None, "")
        plan = plan_run(cfg, train_data.per_epoch, info,  # too little data for a step fails here
                        eval_data.per_epoch if eval_data is not None else None)
        if info.is_main:
            print(f"anita sft: {describe(plan, cfg, info, 'rows')}", flush=True)
            print(f"training data: {train_summary}" + (f"\nheld-out data: {eval_summary}" if eval_data else ""), flush=True)
        out, model = start_run(cfg, info)
        loss_fn = partial(sft_loss, chunk_size=cfg.chunk_size)
        return train(model, loss_fn, train_data, cfg, info, out, eval_data, base_model=cfg.model)
    finally:
        shutdown(info)
