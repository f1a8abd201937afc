"""anita's side of each benchmark, written only with anita's public API.

Each `*_step` function builds the model and returns one `step()` closure; `benchmarks/run.py` times
it in a fresh process. The steps mirror `hf_side.py` setting for setting:

- forward: `from_pretrained(dir, dtype)`, `model(input_ids)` for the full logits (B, T, V).
- decode: `anita.model.generate` greedy, no stop ids (so exactly N new tokens).
- SFT (QLoRA): `from_pretrained(dir, quantize="nf4")` (NF4, double quantization),
  `apply_lora` with r / alpha on the seven projections, `model.gradient_checkpointing = True`,
  and `anita.train.loss.sft_loss` (chunked log-probs, no [B, T, V] logits); AdamW.
- DPO: the same model and `anita.dpo.trainer.dpo_step`: one policy forward over [chosen; rejected],
  the reference = the same model with LoRA off (`anita.dpo.reference.AdaptersOff`), sigmoid loss.

Shapes: B batch, T sequence length, P prompt length.
"""

from __future__ import annotations

import torch

from benchmarks.common import LORA_TARGETS, Workload, preference_batch, token_batch, torch_dtype


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
    """NF4 base (compute in the training dtype) + LoRA on the seven projections + gradient
    checkpointing, as `anita.train.model.load_trainable_model` builds it; AdamW on the adapters."""
    from anita.lora import LoraConfig, apply_lora, lora_parameters
    from anita.model import from_pretrained

    dtype = torch_dtype(w.train_dtype)
    model = from_pretrained(path, dtype=dtype, device=w.device, quantize="nf4",
                                  quantize_kwargs={"compute_dtype": dtype})
    model.gradient_checkpointing = w.checkpointing != "off"
    apply_lora(model, LoraConfig(r=w.lora_r, alpha=w.lora_alpha, target_modules=LORA_TARGETS))
    model.train()
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    return model, opt


def sft_step(path, w: Workload):
    """`anita.train.loss.sft_loss` (chunked log-probs, no (B, T, V) logits) on every next token."""
    from anita.model.logprobs import next_token_labels
    from anita.train.loss import sft_loss

    model, opt = qlora_model(path, w)
    ids = token_batch(model.config.vocab_size, w.batch, w.seq_len, w.seed).to(w.device)  # (B, T)
    batch = {"input_ids": ids, "attention_mask": None, "position_ids": None,
             "labels": next_token_labels(ids, torch.ones_like(ids))}  # (B, T), the last position unscored
    info = {}

    def step():
        loss_sum, count, _ = sft_loss(model, batch)
        loss = loss_sum / count
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        info["loss"] = loss.item()

    return step, info


def dpo_step(path, w: Workload):
    """`anita.dpo.trainer.dpo_step` with the adapters-off reference (`AdaptersOff`)."""
    from anita.dpo.reference import AdaptersOff
    from anita.dpo.trainer import DPOSettings
    from anita.dpo.trainer import dpo_step as anita_dpo_step

    model, opt = qlora_model(path, w)
    chosen, rejected, completion = preference_batch(model.config.vocab_size, w.batch, w.seq_len, w.seed)
    batch = {"input_ids": torch.cat([chosen, rejected]).to(w.device),  # (2B, T): [chosen; rejected]
             "completion_mask": torch.cat([completion, completion]).to(w.device)}
    settings, reference = DPOSettings(beta=w.beta), AdaptersOff()
    info = {}

    def step():
        loss_sum, pairs, _ = anita_dpo_step(model, batch, settings, reference)
        loss = loss_sum / pairs
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        info["loss"] = loss.item()

    return step, info
