"""Training: data, the chunked next-token loss, optimizers and schedules, the shared loop with
gradient accumulation, checkpoints and resume, data parallelism, metrics; `anita sft` on top.

File map: `data.py` (rows of any source (`anita.sources`) -> flat token arrays -> micro-batches by rows or token budget, packing), `loss.py` (SFT loss over the chunked
log-probs of `anita.model.logprobs`), `optim.py` (AdamW / 8-bit, schedules), `loop.py` (the loop),
`checkpoint.py` (run dir, atomic verified checkpoints, resume), `trainer_state.py` (optimizer and
RNG state without pickle), `signals.py` (SIGTERM/SIGINT), `distributed.py` (torchrun + DDP), `fsdp.py` (FSDP2 sharding and its checkpoints),
`metrics.py` (metrics.jsonl, memory, plot), `config.py` (TrainConfig, flags, TOML/YAML),
`model.py` (base + NF4 + LoRA), `sft.py` (run_sft), `cli.py` (`anita sft`). See docs/training.md.
"""

from anita.train.config import TrainConfig
from anita.train.loop import train
from anita.train.model import load_trainable_model
from anita.train.sft import run_sft

__all__ = ["TrainConfig", "run_sft", "train", "load_trainable_model"]
