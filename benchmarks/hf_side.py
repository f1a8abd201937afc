"""The Hugging Face stack's side of each benchmark: transformers + peft + bitsandbytes + trl.

Each `*_step` function builds the model the way people run it today and returns one `step()`
closure; `benchmarks/run.py` times it in a fresh process.

- forward / decode: `AutoModelForCausalLM` from the same HF-layout directory (SDPA attention),
  `model(input_ids)` for the full logits, `model.generate(greedy, min_new_tokens = max_new_tokens)`.
- SFT / DPO (QLoRA): bitsandbytes NF4 with double quantization through `BitsAndBytesConfig`
  (works on CPU with bitsandbytes >= 0.45), peft `LoraConfig` on the seven projections, gradient
  checkpointing the way TRL 1.16's trainers switch it on (non-reentrant, `enable_input_require_grads`),
  and TRL's own fused LM head (`trl.trainer.utils.add_fused_lm_head`, what `SFTTrainer` and
  `DPOTrainer` install) for the per-token log-probs. The DPO loss is `DPOTrainer._compute_loss`'s
  math: one concatenated [chosen; rejected] forward, the reference as the same model under
  `use_adapter(model, None)` (= `model.disable_adapter()`) with `torch.no_grad()` and checkpointing
  off, and the sigmoid loss −log σ(β·h). Optimizer: torch AdamW on the adapters, both sides.
- `sft-recipe`: the SFT recipe's chat-shaped examples collated by TRL's own
  `DataCollatorForLanguageModeling`, as `SFTTrainer` does by default (see `sft_recipe_step`).

Shapes: B batch, T sequence length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import LORA_TARGETS, Workload, preference_rows, recipe_sft_batch, token_batch, torch_dtype


def load(path, w: Workload, dtype: torch.dtype, quantized: bool):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = dict(dtype=dtype, attn_implementation="sdpa")
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, device_map=w.device, **kwargs)
    return model


def forward_step(path, w: Workload, dtype_name: str):
    model = load(path, w, torch_dtype(dtype_name), quantized=False).eval()
    ids = token_batch(model.config.vocab_size, w.batch, w.seq_len, w.seed).to(w.device)  # (B, T)

    def step():
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False).logits  # (B, T, V), as the model returns them

    return step, {}


def decode_step(path, w: Workload):
    model = load(path, w, torch_dtype(w.decode_dtype), quantized=False).eval()
    ids = token_batch(model.config.vocab_size, w.decode_batch, w.decode_prompt, w.seed).to(w.device)  # (B, P)
    out = {}

    def step():
        with torch.inference_mode():
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=w.decode_new, min_new_tokens=w.decode_new,
                                 pad_token_id=0, temperature=None, top_p=None, top_k=None)
        out["tokens"] = seq[0, ids.shape[1]:].tolist()

    return step, out


def qlora_model(path, w: Workload):
    """NF4 base + LoRA r on the seven projections + TRL's fused LM head + gradient checkpointing unless
    the workload's checkpointing is "off" (HF has no selective mode: "selective" runs HF's full one)."""
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    dtype = torch_dtype(w.train_dtype)
    model = load(path, w, dtype, quantized=True)
    add_fused_lm_head(model)  # before PEFT wraps the model, as the trainers do
    model = get_peft_model(model, LoraConfig(r=w.lora_r, lora_alpha=w.lora_alpha, lora_dropout=0.0,
                                             target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"))
    # PEFT keeps the adapters in fp32 (autocast_adapter_dtype=True), as anita does by default. TRL's
    # SFTTrainer and DPOTrainer then cast a quantized model's trainable parameters to bf16 (the QLoRA
    # paper's choice); `w.adapter_dtype` picks either, the same on both sides.
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch_dtype(w.adapter_dtype))
    if w.checkpointing != "off":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def sft_step(path, w: Workload):
    model, opt = qlora_model(path, w)
    ids = token_batch(model.config.vocab_size, w.batch, w.seq_len, w.seed).to(w.device)  # (B, T)
    info = {}
    return sft_train_step(model, opt, {"input_ids": ids, "labels": ids}, info), info


def sft_recipe_step(path, w: Workload):
    """The SFT recipe's B examples (`recipe_sft_batch`) as TRL 1.16's `SFTTrainer` trains them by
    default (packing=False, padding_free=False): dataset preparation builds `labels` = the ids with
    -100 wherever the assistant / completion mask is 0 (`build_labels`, assistant_only_loss or
    completion_only_loss), and `DataCollatorForLanguageModeling` right-pads every example to the
    longest of the batch (labels with -100) and adds the (B, T) `attention_mask`. The loss is
    `compute_loss`'s: the fused head's −Σ log p over the labelled tokens / their number. On CPU TRL's
    fused head projects every position (its compact path needs Triton), masking the others after.
    """
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model, opt = qlora_model(path, w)
    rows = [{"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]}
            for ids, mask in recipe_sft_batch(model.config.vocab_size, w.batch, w)]
    batch = DataCollatorForLanguageModeling(pad_token_id=0)(rows)  # input_ids, labels, attention_mask (B, T)
    info = {"num_tokens": int(batch["attention_mask"].sum()),
            "mean_len": float(batch["attention_mask"].sum(1).float().mean())}
    batch = {k: v.to(w.device) for k, v in batch.items()}
    return sft_train_step(model, opt, batch, info), info


def sft_train_step(model, opt, batch: dict, info: dict):
    """One optimizer step of the fused head's loss (`SFTTrainer.compute_loss` with one micro-batch:
    the mean over its labelled tokens); records the first and the last loss in `info`."""

    def step():
        out = model(**batch, fused_lm_head=True, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        info["loss"] = out.loss.item()
        info.setdefault("first_loss", info["loss"])

    return step


def dpo_step(path, w: Workload, recipe: bool = False):
    """`recipe`: the recipe-shaped, right-padded batch with its attention mask, as TRL collates it."""
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter

    model, opt = qlora_model(path, w)
    ids, completion, attention = preference_rows(model.config.vocab_size, w, recipe)  # (2B, T) each
    ids, completion, attention = ids.to(w.device), completion.to(w.device), attention.to(w.device)
    labels = ids.masked_fill(completion == 0, -100)
    gc_kwargs = {"use_reentrant": False}
    info = {"num_tokens": int(attention.sum()), "mean_len": float(attention.sum(1).float().mean())}

    def step():
        out = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True, use_cache=False)
        chosen_logps, rejected_logps = out.log_probs.sum(dim=1).chunk(2)  # (B,) each
        with torch.no_grad(), disable_gradient_checkpointing(model, gc_kwargs), use_adapter(model, None):
            ref = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True, use_cache=False)
        ref_chosen, ref_rejected = ref.log_probs.sum(dim=1).chunk(2)
        delta = (chosen_logps - ref_chosen) - (rejected_logps - ref_rejected)
        loss = -F.logsigmoid(w.beta * delta).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        info["loss"] = loss.item()
        info.setdefault("first_loss", info["loss"])

    return step, info


def dpo_recipe_step(path, w: Workload):
    return dpo_step(path, w, recipe=True)
