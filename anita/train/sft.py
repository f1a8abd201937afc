"""`run_sft`: supervised fine-tuning and continued pre-training (RECIPE.md stages 1 and 3) from a
`TrainConfig`: read the data, load the base (+NF4) and put LoRA on it, run the shared loop with
the next-token loss. Under torchrun each process runs this same function.
"""

from __future__ import annotations

from functools import partial

from anita.model import Tokenizer
from anita.train.checkpoint import prepare_run_dir
from anita.train.config import TrainConfig
from anita.train.data import MicroBatches, load_examples
from anita.train.distributed import DistInfo, init_distributed, shutdown
from anita.train.loop import train
from anita.train.loss import sft_loss
from anita.train.model import load_trainable_model


def load_data(path, tokenizer, cfg: TrainConfig, info: DistInfo, shuffle: bool) -> MicroBatches:
    examples, report = load_examples(path, tokenizer, cfg.max_length, cfg.skip_bad_rows)
    if info.is_main:
        print(report.summary(), flush=True)
    return MicroBatches(examples, cfg.batch_size, cfg.max_length, cfg.packing, tokenizer.pad_id,
                        seed=cfg.seed, shuffle=shuffle)


def run_sft(cfg: TrainConfig) -> list[dict]:
    """Train and return the metrics records; the run directory is `cfg.output`."""
    cfg.validate()
    info = init_distributed(cfg.device)
    try:
        tokenizer = Tokenizer.from_pretrained(cfg.model)
        train_data = load_data(cfg.data, tokenizer, cfg, info, shuffle=True)
        eval_data = load_data(cfg.eval_data, tokenizer, cfg, info, shuffle=False) if cfg.eval_data else None
        out = prepare_run_dir(cfg.to_dict(), cfg.output, cfg.resume, info)  # after the data proved readable
        model, report = load_trainable_model(cfg, info)
        if info.is_main:
            print(report, flush=True)
        loss_fn = partial(sft_loss, chunk_size=cfg.chunk_size)
        return train(model, loss_fn, train_data, cfg, info, out, eval_data, base_model=cfg.model)
    finally:
        shutdown(info)
