"""The SFT / continued-pre-training loss: next-token negative log-likelihood of the trained tokens.

    loss = − Σ_t log p(labels_t | tokens_<=t)  over positions with a label,  divided by their count

The per-token log-probs come from `anita.model.logprobs.token_logps`, which applies the output
head chunk by chunk with fp32 log-softmax, so the (B, T, V) fp32 logits never exist at once
(the memory trick of fused linear cross-entropy; Liger Kernel, arXiv 2410.10989).

A loss function for `anita.train.loop.train` returns `(loss_sum, count, metrics)`: the loss
summed over `count` units (here: trained tokens). The loop divides by the total count of the
whole optimizer step, so gradient accumulation and data parallelism give exactly the mean over
the big batch (every token weighs the same, however the tokens are split into micro-batches).

Shapes: B batch, T time, D model dim, V vocab.
"""

from __future__ import annotations

import torch

from anita.model.logprobs import DEFAULT_CHUNK_SIZE, IGNORE_INDEX, output_head_weight, token_logps


def sft_loss(model, batch: dict, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """Summed NLL of the batch's labelled tokens, their count, and no extra metrics."""
    hidden = model.hidden_states(batch["input_ids"], attention_mask=batch["attention_mask"],
                                 position_ids=batch["position_ids"])  # (B, T, D)
    # Outside autocast: the head's matmul runs in fp32 unless model.head_dtype asks for bf16; the loss is fp32.
    with torch.autocast(hidden.device.type, enabled=False):
        logps = token_logps(hidden, output_head_weight(model), batch["labels"], chunk_size=chunk_size,
                            head_dtype=getattr(model, "head_dtype", None))  # (B, T)
    count = (batch["labels"] != IGNORE_INDEX).sum()
    return -logps.sum(), count, {}
