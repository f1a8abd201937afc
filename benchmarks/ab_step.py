"""A/B of one shortcut of anita's training step against the plain path beside it, in one process.

    python benchmarks/ab_step.py --change lean|spans|keep-attention|defaults
                                 [--only sft,sft-recipe,dpo,dpo-recipe,sft-demo] [--checkpointing full]
                                 [--head-dtype bf16] [--threads 1] [--clock cpu|wall] [--steps 4]

Builds exactly the step `run.py` times (`anita_side.py`, same workload), or `sft-demo`, the SFT step
of `anita demo` (`sft_demo_step`), then alternates the two paths step by step (A, B, A, B, ...) after
one warm-up step of each, and prints the median of each by process CPU time (1 thread by default):
a neighbour's job on a shared machine slows both paths alike instead of one run. The changes:

- lean: `LoraLinear.lean` on (anita/lora/lean.py) or off (PEFT's five-node update, base first);
- spans: packed and shared-prompt rows attend per sequence (`Spans`, `attend_spans`) or through
  the (T, T) mask those spans stand for (`Spans.mask`, the plain path).
- keep-attention: full checkpointing keeps attention's outputs instead of recomputing them (a
  probe, not an anita option: `set_keep_attention`).
- defaults: the lean update, spans and head chunks of 256 together, against the plain update, the
  mask and chunks of 512 (`set_defaults`; `sft-demo` only).

Peak memory is not compared here (one process holds both); `run.py` measures it per process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from anita.model.logprobs import DEFAULT_CHUNK_SIZE  # noqa: E402
from benchmarks import anita_side  # noqa: E402
from benchmarks.common import default_workload, model_dir  # noqa: E402

TRAIN_BENCHES = ("sft", "sft-recipe", "dpo", "dpo-recipe")


def set_lean(on: bool, w=None) -> None:
    """Every LoRA layer built so far takes the lean update (on) or the plain one."""
    import gc

    from anita.lora import LoraLinear

    for layer in (o for o in gc.get_objects() if type(o) is LoraLinear):  # type(): no module-level getattr warnings
        layer.lean = on


def set_spans(on: bool, w=None) -> None:
    """`Llama.hidden_states` attends through the Spans it is given (on) or through their mask."""
    from anita.model.llama import Llama
    from anita.model.masks import Spans

    plain = getattr(Llama, "_ab_plain_hidden_states", Llama.hidden_states)
    Llama._ab_plain_hidden_states = plain

    def through_mask(self, input_ids, attention_mask=None, *args, **kwargs):
        if isinstance(attention_mask, Spans):
            attention_mask = attention_mask.mask(input_ids.shape[1]).to(input_ids.device)  # (B, T, T)
        return plain(self, input_ids, attention_mask, *args, **kwargs)

    Llama.hidden_states = plain if on else through_mask


def set_keep_attention(on: bool, w=None) -> None:
    """Full checkpointing keeps attention's outputs (torch's selective policy, attention ops only)
    instead of rerunning SDPA's forward in backward (a probe: benchmarks/RESULTS.md, third pass)."""
    import anita.model.llama as llama
    from anita.model.activation_checkpointing import _ATTENTION
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    plain = getattr(llama, "_ab_plain_checkpoint_block", llama.checkpoint_block)
    llama._ab_plain_checkpoint_block = plain

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in _ATTENTION else CheckpointPolicy.PREFER_RECOMPUTE

    def keep_attention(block, mode, x, cos, sin, mask):
        if mode != "full":
            return plain(block, mode, x, cos, sin, mask)
        return checkpoint(block, x, cos, sin, mask, use_reentrant=False,
                          context_fn=lambda: create_selective_checkpoint_contexts(policy))

    llama.checkpoint_block = keep_attention if on else plain


def set_defaults(on: bool, w) -> None:
    """The three defaults of issue 14's second pass together (lean update, spans, head chunks of 256)
    against the paths before them (plain update, the (T, T) mask, chunks of 512)."""
    set_lean(on)
    set_spans(on)
    w.chunk_size = DEFAULT_CHUNK_SIZE if on else 512


CHANGES = {"lean": set_lean, "spans": set_spans, "keep-attention": set_keep_attention, "defaults": set_defaults}


def sft_demo_step(path, w):
    """The SFT stage of `anita demo` (its settings: `anita.demo.sft_config`, the shipped Italian
    conversations packed into rows of at most 256 tokens, bf16 autocast, no checkpointing, the fp32
    head): forward and backward of its first micro-batch, the head's chunk size read from `w` at each
    step. No optimizer step, so every step sees the same weights."""
    import tempfile

    from anita.assets import smollm2_dir
    from anita.demo import Plan, sft_config
    from anita.model import Tokenizer
    from anita.train.distributed import DistInfo
    from anita.train.loop import autocast
    from anita.train.loss import sft_loss
    from anita.train.model import load_trainable_model
    from anita.train.sft import load_data

    with tempfile.TemporaryDirectory() as tmp:  # the demo writes its held-out subset beside the run
        cfg = sft_config(str(smollm2_dir()), Path(tmp) / "1-sft", Plan(), "cpu").validate()
        data, _ = load_data(cfg.data, Tokenizer.from_pretrained(cfg.model), cfg, shuffle=True)
    batch = data[0]
    model, _ = load_trainable_model(cfg, DistInfo())

    def step():
        with autocast(cfg, torch.device("cpu")):
            loss_sum, count, _ = sft_loss(model, batch, chunk_size=w.chunk_size)
        (loss_sum / count).backward()
        model.zero_grad(set_to_none=True)

    return step, {}


def ab(bench: str, w, change: str, steps: int, clock=time.process_time) -> dict[str, float]:
    make = sft_demo_step if bench == "sft-demo" else getattr(anita_side, f"{bench.replace('-', '_')}_step")
    step, _ = make(model_dir(w), w)
    toggle, times = CHANGES[change], {True: [], False: []}
    for on in (True, False):  # warm-up of each path
        toggle(on, w)
        step()
    for _ in range(steps):
        for on in (True, False):
            toggle(on, w)
            start = clock()
            step()
            times[on].append(clock() - start)
    toggle(True, w)
    return {"shortcut_s": statistics.median(times[True]), "plain_s": statistics.median(times[False])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--change", choices=tuple(CHANGES), required=True)
    p.add_argument("--only", default=",".join(TRAIN_BENCHES))
    p.add_argument("--checkpointing", choices=("full", "selective", "off"), default="full")
    p.add_argument("--head-dtype", dest="head_dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="timed steps of each path")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="process CPU time (default; all threads summed) or wall time")
    args = p.parse_args(argv)
    if args.change == "defaults" and args.only != "sft-demo":
        p.error("--change defaults: only with --only sft-demo (the other steps fix their head chunk when built)")
    w = default_workload("cpu", quick=False)
    w.checkpointing, w.head_dtype, w.threads = args.checkpointing, args.head_dtype, args.threads
    torch.set_num_threads(w.threads)
    print(f"| workload | plain s/step | {args.change} s/step | speed-up |\n|---|---:|---:|---:|")
    for bench in args.only.split(","):
        r = ab(bench, w, args.change, args.steps, time.process_time if args.clock == "cpu" else time.perf_counter)
        setting = "the demo's: bf16 autocast, ckpt=off, fp32 head" if bench == "sft-demo" else f"ckpt={w.checkpointing}"
        print(f"| {bench}, {setting} | {r['plain_s']:.2f} | {r['shortcut_s']:.2f} | "
              f"{r['plain_s'] / r['shortcut_s']:.2f}× |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
