"""anita's side of each benchmark, written only with anita's public API.

Each `*_step` function builds the model and returns one `step()` closure; `benchmarks/run.py` times
it in a fresh process. The steps mirror `hf_side.py` setting for setting:

- forward: `from_pretrained(dir, dtype)`, `model(input_ids)` for the full logits (B, T, V).
- decode: `anita.model.generate` greedy, no stop ids (so exactly N new tokens).
- SFT (QLoRA): `from_pretrained(dir, quantize="nf4")` (NF4, double quantization),
  `apply_lora` with r / alpha on the seven projections, `model.checkpointing` from the workload,
  and `anita.train.loss.sft_loss` (chunked log-probs, no [B, T, V] logits); AdamW.
  `sft-recipe`: the same step on the SFT recipe's chat-shaped examples (`recipe_sft_batch`), collated
  as `anita sft` does (`Workload.sft_layout`: packed padding-free, or one padded row each).
- DPO: the same model and `anita.dpo.trainer.dpo_step`: one policy forward over the batch in the
  layout `Workload.dpo_layout` names (TRL's two rows [prompt; chosen], [prompt; rejected] per pair,
  one shared-prompt row [prompt; chosen; rejected] per pair, or all pairs packed in one row), the
  reference = the same model with LoRA off (`anita.dpo.reference.AdaptersOff`), sigmoid loss.
  `dpo-recipe`: the same step on the recipe-shaped batch (prompts ~400, answers 70-150 tokens).
- The workload's `checkpointing` (off/full/selective), `head_dtype` and `fused` set anita's options.

Shapes: B batch, T sequence length, P prompt length.
"""

from __future__ import annotations

import torch

from benchmarks.common import LORA_TARGETS, Workload, preference_rows, recipe_sft_batch, token_batch, torch_dtype


def load(path, w: Workload, dtype: torch.dtype):
    from anita.model import from_pretrained

    return from_pretrained(path, dtype=dtype, device=w.device)


def forward_step(path, w: Workload, dtype_name: str):
    model = load(path, w, torch_dtype(dtype_name)).eval()
    ids = token_batch(model.config.vocab_size, w.batch, w.seq_len, w.seed).to(w.device)  # (B, T)

    def step():
        with torch.inference_mode():
            model(ids)  # (B, T, V)

    return step, {}


def decode_step(path, w: Workload):
    from anita.model import generate

    model = load(path, w, torch_dtype(w.decode_dtype)).eval()
    ids = token_batch(model.config.vocab_size, w.decode_batch, w.decode_prompt, w.seed)  # (B, P)
    prompts = ids.tolist()
    out = {}

    def step():
        new = generate(model, prompts, max_new_tokens=w.decode_new, stop_ids=())
        out["tokens"] = new[0]

    return step, out


def qlora_model(path, w: Workload):
    """NF4 base (compute in the training dtype) + LoRA on the seven projections + the workload's
    checkpointing, head dtype and fusion, as `anita.train.model.load_trainable_model` builds it; AdamW
    on the adapters."""
    from anita.lora import LoraConfig, apply_lora, lora_parameters
    from anita.model import from_pretrained
    from anita.model.fused import set_fused_projections

    dtype = torch_dtype(w.train_dtype)
    model = from_pretrained(path, dtype=dtype, device=w.device, quantize="nf4",
                                  quantize_kwargs={"compute_dtype": dtype})
    model.checkpointing = w.checkpointing  # off, full or selective
    model.head_dtype = None if w.head_dtype == "fp32" else torch_dtype(w.head_dtype)
    apply_lora(model, LoraConfig(r=w.lora_r, alpha=w.lora_alpha, target_modules=LORA_TARGETS, dtype=w.adapter_dtype))
    set_fused_projections(model, w.fused)
    model.train()
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    return model, opt


def sft_step(path, w: Workload):
    """`anita.train.loss.sft_loss` (chunked log-probs, no (B, T, V) logits) on every next token."""
    from anita.model.logprobs import next_token_labels

    model, opt = qlora_model(path, w)
    ids = token_batch(model.config.vocab_size, w.batch, w.seq_len, w.seed).to(w.device)  # (B, T)
    batch = {"input_ids": ids, "attention_mask": None, "position_ids": None,
             "labels": next_token_labels(ids, torch.ones_like(ids))}  # (B, T), the last position unscored
    info = {}
    return sft_train_step(model, opt, batch, info, w.chunk_size), info


def sft_recipe_step(path, w: Workload):
    """The SFT recipe's B examples (`recipe_sft_batch`) as `anita sft` batches them, labels on the
    answer tokens only (IGNORE_INDEX elsewhere, so the head computes only those), and the same
    `sft_loss` step. `w.sft_layout`:

    - "packed": the micro-batch `anita sft --packing --max-tokens N` makes with N = these examples'
      total (`budget_batches`): one padding-free row, positions restarting per example and the
      row's `Spans`, so each example attends to itself alone (no mask: SDPA's causal kernel per
      example) and its log-probs are those it has alone.
    - "padded": `anita sft`'s default, one row per example right-padded to the longest (`pack_rows`
      without packing), a (B, T) padding mask: TRL's layout.
    """
    from anita.train.data import budget_batches, collate, make_example, pack_rows

    model, opt = qlora_model(path, w)
    examples = [make_example(ids, mask, w.recipe_max_length)[0]
                for ids, mask in recipe_sft_batch(model.config.vocab_size, w.batch, w)]
    lengths, order = [len(e.input_ids) for e in examples], list(range(len(examples)))
    if w.sft_layout == "packed":
        [rows] = budget_batches(lengths, order, max_tokens=sum(lengths), packing=True)  # one row
    elif w.sft_layout == "padded":
        rows = pack_rows(lengths, order, w.recipe_max_length, packing=False)  # one row each
    else:
        raise ValueError(f"unknown sft_layout {w.sft_layout!r}: expected packed or padded")
    batch = collate([[examples[i] for i in row] for row in rows], pad_id=0)  # (rows, T); packed: the row's Spans
    info = {"num_tokens": int(batch.pop("num_tokens")), "mean_len": sum(lengths) / len(lengths)}
    batch = {k: v.to(w.device) for k, v in batch.items()}
    return sft_train_step(model, opt, batch, info, w.chunk_size), info


def sft_train_step(model, opt, batch: dict, info: dict, chunk_size: int):
    """One optimizer step of `sft_loss` (the mean over the batch's labelled tokens, as the training
    loop divides by them); records the first and the last loss in `info`."""
    from anita.train.loss import sft_loss

    def step():
        loss_sum, count, _ = sft_loss(model, batch, chunk_size=chunk_size)
        loss = loss_sum / count
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        info["loss"] = loss.item()
        info.setdefault("first_loss", info["loss"])

    return step


def dpo_step(path, w: Workload, recipe: bool = False):
    """`anita.dpo.trainer.dpo_step` with the adapters-off reference (`AdaptersOff`); `recipe`: the
    recipe-shaped batch (`recipe_preference_batch`), right-padded, no attention mask needed."""
    from anita.dpo.config import DPOSettings
    from anita.dpo.reference import AdaptersOff
    from anita.dpo.trainer import dpo_step as anita_dpo_step

    model, opt = qlora_model(path, w)
    ids, completion, attention = preference_rows(model.config.vocab_size, w, recipe)  # (2B, T) each
    batch = {k: v.to(w.device) for k, v in dpo_batch(ids, completion, attention, w.dpo_layout).items()}
    settings, reference = DPOSettings(beta=w.beta, chunk_size=w.chunk_size), AdaptersOff()
    info = {"num_tokens": int(attention.sum()), "mean_len": float(attention.sum(1).float().mean())}

    def step():
        loss_sum, pairs, _ = anita_dpo_step(model, batch, settings, reference)
        loss = loss_sum / pairs
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        info["loss"] = loss.item()
        info.setdefault("first_loss", info["loss"])

    return step, info


def dpo_batch(ids: torch.Tensor, completion: torch.Tensor, attention: torch.Tensor, layout: str) -> dict:
    """B pairs given as TRL's rows (ids, completion and attention masks (2B, T), [chosen; rejected],
    right-padded) collated by anita in `layout`: "two-row" (2B rows), "shared" (B rows
    [prompt; chosen; rejected]) or "packed" (1 row)."""
    from anita.dpo.data import PreferencePair, collate_pairs, collate_shared

    B, pairs = ids.shape[0] // 2, []
    for b in range(B):
        c, r = ids[b][attention[b].bool()].tolist(), ids[B + b][attention[B + b].bool()].tolist()
        start = completion[b].tolist().index(1)  # the answer starts here, the prompt is the same in both rows
        pairs.append(PreferencePair(0, tuple(c[:start]), tuple(c[start:]), tuple(r[start:])))
    if layout == "two-row":
        return collate_pairs(pairs, pad_id=0)
    rows = [list(range(len(pairs)))] if layout == "packed" else [[i] for i in range(len(pairs))]
    if layout not in ("shared", "packed"):
        raise ValueError(f"unknown dpo_layout {layout!r}: expected two-row, shared or packed")
    return collate_shared(rows, pairs, pad_id=0)


def dpo_recipe_step(path, w: Workload):
    return dpo_step(path, w, recipe=True)
