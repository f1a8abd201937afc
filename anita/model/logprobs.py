"""Per-token log-probabilities of labels under the output head: log p(label_t | context).

SFT, DPO and evaluation all need log_softmax(h_t · Wᵀ)[label_t] at the positions that are scored
(answer tokens, a continuation, a text), and nothing else. Two versions, equal up to rounding:

- `plain_token_logps`: the definition, `log_softmax(hidden · Wᵀ)` then `gather`. Read this first;
  the tests hold the other one equal to it.
- `token_logps`: the same numbers without the [B, T, V] fp32 logits (for Llama 3's V = 128256,
  8 × 1024 tokens already take 4 GiB, and autograd would keep them until backward):

  forward   for each chunk of n scored tokens: logits = h_chunk · Wᵀ in fp32 ([n, V]), logsumexp,
            gather the label's logit; keep only the per-token logsumexp.
  backward  recompute each chunk's logits, softmax p = exp(logits − logsumexp), and use
            d log p_y / d logits = onehot(y) − p  to accumulate grad_hidden and grad_W.

  Only positions with a label reach the head, and only their hidden rows, W, labels and the
  per-token logsumexp are saved for backward: the memory trick of fused linear cross-entropy
  (Liger Kernel, Hsu et al. 2024, arXiv 2410.10989; TRL's chunked log-prob kernel), in plain
  PyTorch, one token chunk at a time, full vocabulary per chunk.

Labels are aligned with the positions that predict them (`next_token_labels`); IGNORE_INDEX marks
the positions that are not scored, whose log-prob is 0.

Shapes: B batch, T time, D model dim, V vocab, N tokens (B·T), n tokens in one chunk.
dtypes: hidden and W may be fp32, bf16 or fp16 (the math is fp32) or fp64 (the math is fp64, for
gradcheck); see `anita.dtypes.math_dtype`. W is cast to the compute dtype one vocabulary slice at a
time, so a bf16 head (tied to the embeddings or not) never gets a full fp32 copy.
"""

import torch
from torch import nn

from anita.dtypes import WEIGHT_DTYPES, math_dtype, parse_dtype
from anita.errors import AnitaError

IGNORE_INDEX = -100  # label of positions that are not scored (prompt, padding); their log-prob is 0
# Tokens per chunk: the largest temporary is [chunk, V] fp32 (128 MiB for V = 128256). Per-token results
# do not depend on it (bit-equal on this CPU for 100, 256 and 512); 256 instead of 512 takes 44-85 MiB
# off the peak of SmolLM2's steps for 1-4 % of speed (benchmarks/RESULTS.md, `--chunk-size`).
DEFAULT_CHUNK_SIZE = 256
_VOCAB_SLICE = 16384  # rows of W cast to the compute dtype at once when W is stored in another dtype


def plain_token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      head_dtype: torch.dtype | None = None) -> torch.Tensor:
    """log_softmax(hidden · Wᵀ)[labels], the definition. hidden [B, T, D], weight [V, D], labels [B, T]
    (IGNORE_INDEX where not scored) -> [B, T] in the math dtype (fp32), 0 where not scored.
    `head_dtype` bf16/fp16: the matmul in that dtype, its logits upcast for the fp32 log-softmax."""
    dtype, low = _math_dtype(hidden, weight), head_matmul_dtype(head_dtype, hidden, weight)
    logits = (hidden.to(low) @ weight.to(low).T).to(dtype)  # [B, T, V], all of it at once
    scored = labels != IGNORE_INDEX
    logps = logits.log_softmax(dim=-1).gather(-1, labels.masked_fill(~scored, 0)[..., None]).squeeze(-1)
    return logps.masked_fill(~scored, 0.0)  # [B, T]


def _math_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """fp32 (fp64 if either is fp64); an unsupported dtype is an error naming the tensor."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        math_dtype(t, what=f"token_logps: `{name}`")
    return math_dtype(hidden, weight)


def output_head_weight(model) -> torch.Tensor:
    """`lm_head.weight` (V, D); refuses a head that is not a plain linear (e.g. adapted by LoRA),
    whose output log-probs computed from its weight would silently be wrong."""
    head = model.lm_head
    if type(head) is not nn.Linear or head.bias is not None:
        raise AnitaError(f"log-probs: lm_head must be a plain bias-free nn.Linear, got {type(head).__name__}; "
                         "leave lm_head out of the LoRA targets")
    return head.weight


def _project(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """logits = h · Wᵀ in h's dtype. h [n, D], weight [V, D] -> [n, V]."""
    if weight.dtype == h.dtype:
        return h @ weight.T  # [n, V]
    logits = h.new_empty(h.shape[0], weight.shape[0])  # [n, V]
    for v in range(0, weight.shape[0], _VOCAB_SLICE):
        logits[:, v : v + _VOCAB_SLICE] = h @ weight[v : v + _VOCAB_SLICE].to(h.dtype).T
    return logits


def _project_back(grad_logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad_h = grad_logits · W in grad_logits' dtype. grad_logits [n, V], weight [V, D] -> [n, D]."""
    if weight.dtype == grad_logits.dtype:
        return grad_logits @ weight  # [n, D]
    grad_h = grad_logits.new_zeros(grad_logits.shape[0], weight.shape[1])  # [n, D]
    for v in range(0, weight.shape[0], _VOCAB_SLICE):
        grad_h += grad_logits[:, v : v + _VOCAB_SLICE] @ weight[v : v + _VOCAB_SLICE].to(grad_logits.dtype)
    return grad_h


def _logits(h: torch.Tensor, weight: torch.Tensor, head_dtype: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """h · Wᵀ as a matmul in `head_dtype`, returned in `dtype` for the log-softmax. h [n, D] -> [n, V].

    The fp32 head (head_dtype = dtype = fp32) is the definition. A bf16/fp16 head runs the matmul in
    the compute dtype (as HF/TRL's fused head does; 4-5x faster per FLOP on AVX512-BF16 CPUs and
    tensor cores) and rounds each logit to it once, then upcasts for the fp32 log-softmax."""
    logits = _project(h.to(head_dtype), weight)  # [n, V] in head_dtype
    return logits if logits.dtype == dtype else logits.to(dtype)


def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """log Σ_v exp(logits) per row, [n, V] -> [n], overwriting `logits` (torch.logsumexp would
    allocate a second [n, V] buffer for exp(logits − max); at V = 128256 that is 256 MiB a chunk)."""
    peak = logits.amax(dim=-1, keepdim=True)  # [n, 1]
    return logits.sub_(peak).exp_().sum(dim=-1).log_() + peak.squeeze(1)


class _ChunkedTokenLogps(torch.autograd.Function):
    """log_softmax(hidden · Wᵀ)[labels] chunk by chunk; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, head_dtype=None):
        # hidden [N, D], weight [V, D], labels [N] (IGNORE_INDEX where not scored)
        dtype = _math_dtype(hidden, weight)
        head_dtype = head_dtype or dtype  # the matmul's dtype; the log-softmax is always in `dtype`
        scored = labels != IGNORE_INDEX
        targets = labels.masked_fill(~scored, 0)  # [N] a valid index everywhere, masked out below
        logps = torch.zeros(hidden.shape[0], dtype=dtype, device=hidden.device)  # [N]
        lse = torch.zeros_like(logps)  # [N] log Σ_v exp(logit_v)
        mean_logits = torch.zeros_like(logps)  # [N] (1/V) Σ_v logit_v, a metric only
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = _logits(hidden[rows], weight, head_dtype, dtype)  # [n, V] in `dtype`
            label_logit = logits.gather(1, targets[rows, None]).squeeze(1)  # [n]
            mean_logits[rows] = logits.mean(dim=-1)
            lse[rows] = _logsumexp_(logits)  # overwrites logits: no second [n, V] buffer
            logps[rows] = label_logit - lse[rows]
        logps = logps.masked_fill(~scored, 0.0)
        mean_logits = mean_logits.masked_fill(~scored, 0.0)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_size, ctx.head_dtype = chunk_size, head_dtype
        ctx.mark_non_differentiable(mean_logits)
        return logps, mean_logits

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps, _grad_mean_logits):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        scored = labels != IGNORE_INDEX
        targets = labels.masked_fill(~scored, 0)  # [N]
        g = grad_logps.to(lse.dtype).masked_fill(~scored, 0.0)  # [N] upstream gradient, 0 where ignored
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # [N, D]
        grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            h = hidden[rows].to(ctx.head_dtype)  # [n, D]
            probs = _logits(h, weight, ctx.head_dtype, lse.dtype).sub_(lse[rows, None]).exp_()  # [n, V] softmax
            # d(g · log p_y)/d logits = g · (onehot(y) − p)
            grad_logits = probs.mul_(-g[rows, None])  # [n, V]
            grad_logits.scatter_add_(1, targets[rows, None], g[rows, None])
            grad_logits = grad_logits.to(ctx.head_dtype)  # no copy for the fp32 head
            if need_hidden:
                grad_hidden[rows] = _project_back(grad_logits, weight).to(hidden.dtype)
            if need_weight:
                if h.dtype == grad_weight.dtype:
                    grad_weight.addmm_(grad_logits.T, h)  # [V, D] accumulated in the math dtype
                else:
                    grad_weight += (grad_logits.T @ h).to(grad_weight.dtype)  # a low-precision head
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def _check_inputs(hidden, weight, labels, chunk_size) -> None:
    """Raise AnitaError naming the tensor whose shape, dtype or values do not fit."""
    if hidden.dim() != 3:
        raise AnitaError(f"token_logps: `hidden` must be [B, T, D], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise AnitaError(
            f"token_logps: `weight` must be [V, D] with D = {hidden.shape[2]}, got shape {tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:2] or labels.dtype not in (torch.int64, torch.int32):
        raise AnitaError(
            f"token_logps: `labels` must be an integer [B, T] = {tuple(hidden.shape[:2])} tensor, "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= weight.shape[0]))
    if bad.any():
        raise AnitaError(
            f"token_logps: `labels` holds {labels[bad][0].item()}, outside [0, V = {weight.shape[0]}) "
            f"and not the ignore index {IGNORE_INDEX}"
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise AnitaError(f"token_logps: `chunk_size` must be a positive int, got {chunk_size!r}")


def token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_mean_logits: bool = False,
    head_dtype: torch.dtype | None = None,
):
    """Per-token log p(labels | hidden) under the LM head `weight`, without the full [B, T, V] logits.

    hidden [B, T, D] (final-norm output), weight [V, D] (`lm_head.weight`, possibly tied or bf16),
    labels [B, T]: labels[b, t] is the token that position t predicts (shift before calling, see
    `next_token_labels`), IGNORE_INDEX where not scored. Returns [B, T] fp32 (fp64 for fp64 inputs),
    0 at ignored positions; differentiable w.r.t. hidden and weight.

    With return_mean_logits, also returns the mean over the vocabulary of each position's logits
    ([B, T], no gradient, 0 at ignored positions) — TRL's `logits/chosen` metric is its average over
    the completion tokens.

    head_dtype: None or fp32 (default) computes the logits in fp32; bf16 or fp16 runs the head's
    matmuls (forward, recomputation, gradients) in that dtype, keeping the log-softmax and the
    returned log-probs in fp32 (`head_matmul_dtype`).
    """
    _check_inputs(hidden, weight, labels, chunk_size)
    head_dtype = head_matmul_dtype(head_dtype, hidden, weight)
    B, T, D = hidden.shape
    labels = labels.reshape(B * T)  # [N]
    # Only scored positions go through the head (DPO's prompts, padding and SFT's masked prompts
    # skip it); the rest get 0 and no gradient.
    scored = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # [M]
    logps, mean_logits = _ChunkedTokenLogps.apply(
        hidden.reshape(B * T, D)[scored], weight, labels[scored], chunk_size, head_dtype
    )  # [M], [M]
    logps = logps.new_zeros(B * T).index_copy(0, scored, logps).view(B, T)  # [B, T]
    mean_logits = mean_logits.new_zeros(B * T).index_copy(0, scored, mean_logits).view(B, T)
    return (logps, mean_logits) if return_mean_logits else logps


def head_matmul_dtype(head_dtype, hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of the head's matmuls: the math dtype (fp32; fp64 for gradcheck) unless `head_dtype`
    asks for a lower one (bf16 or fp16, or their names)."""
    dtype = _math_dtype(hidden, weight)
    if head_dtype is None:
        return dtype
    head_dtype = parse_dtype(head_dtype, WEIGHT_DTYPES, "token_logps: `head_dtype`")
    return dtype if dtype == torch.float64 else head_dtype


def next_token_labels(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the positions that predict them: labels[:, t] = input_ids[:, t + 1].

    input_ids [B, T], loss_mask [B, T] (1 where the token is scored, e.g. completion tokens).
    Positions whose next token is not scored, and the last position, get IGNORE_INDEX. -> [B, T]
    """
    if input_ids.shape != loss_mask.shape or input_ids.dim() != 2:
        raise AnitaError(
            f"next_token_labels: `input_ids` {tuple(input_ids.shape)} and `loss_mask` "
            f"{tuple(loss_mask.shape)} must both be [B, T]"
        )
    labels = torch.full_like(input_ids, IGNORE_INDEX)  # [B, T]
    scored = loss_mask[:, 1:].bool()  # [B, T-1]
    labels[:, :-1] = input_ids[:, 1:].masked_fill(~scored, IGNORE_INDEX)
    return labels


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and mean of the per-token log-probs where mask is 1. token_logps [B, T], mask [B, T] -> [B], [B].

    The mean divides by the number of scored tokens (at least 1, so an empty row gives 0, not NaN).
    """
    if token_logps.shape != mask.shape or token_logps.dim() != 2:
        raise AnitaError(
            f"sequence_logps: `token_logps` {tuple(token_logps.shape)} and `mask` {tuple(mask.shape)} "
            "must both be [B, T]"
        )
    keep = mask.bool()
    total = torch.where(keep, token_logps, torch.zeros_like(token_logps)).sum(dim=-1)  # [B]
    count = keep.sum(dim=-1).clamp(min=1).to(total.dtype)  # [B]
    return total, total / count
