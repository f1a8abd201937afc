"""Attention masks of packed and prefix-shared rows, built from per-token (segment, branch) ids.

Several sequences share one row when SFT packs examples, and when DPO lays a pair out as
[prompt; chosen; rejected] (Wang et al. 2024, "Accelerating Direct Preference Optimization with
Prefix Sharing", arXiv 2410.20305). Each token carries two small integers:

    segment   which sequence of the row it belongs to (an example, a pair); -1 = padding
    branch    0 = the segment's shared part (the whole of an SFT example, a pair's prompt),
              1, 2, ... = one of the continuations of that shared part (chosen, rejected)

and a position id that restarts per segment (a continuation's positions go on from the end of its
shared part, so the rejected answer starts again at len(prompt)). A query may attend to a key when

    same segment  and  the key is real  and  (the key is shared  or  both are in the same branch)

and, as always, the key is not after the query (the model adds causality: `attention_mask_4d`).
So every answer sees its prompt and itself, never the other answer, and no segment sees another:
each token's attention, and therefore its hidden state, is the one it would have in its own
right-padded row [prompt; answer] at the same positions. The plain layout, one right-padded row per
sequence, needs no mask at all (causality alone keeps real tokens away from the pads after them).

Example, one row holding a pair (prompt p0 p1, chosen c0 c1, rejected r0) and padding:

    token     p0 p1 c0 c1 r0 pad          may attend (query row, key column; 1 = yes, after causality)
    segment    0  0  0  0  0  -1          p0: 1 . . . . .
    branch     0  0  1  1  2  -1          p1: 1 1 . . . .
    position   0  1  2  3  2   0          c0: 1 1 1 . . .
                                          c1: 1 1 1 1 . .
                                          r0: 1 1 . . 1 .

The model never builds this mask in training: `Spans` lists where each sequence and each of its
branches starts and ends, and `anita.model.llama.attend_spans` computes the same attention without
it (varlen attention, as FlashAttention's varlen interface does on CUDA): a sequence's shared part
with its first branch through SDPA's unmasked causal kernel, each further branch against
[shared part; itself] with a small (L, P + L) mask. A (T, T) mask would make the kernel compute
the scores of the whole row, (Σ L)² per row, and on CUDA would rule out FlashAttention.
`segment_mask` (and `Spans.mask`) is the definition the tests hold `attend_spans` to.

Kernels: on CPU the unmasked calls run SDPA's flash kernel and a branch's masked call the same kernel
with its mask. On CUDA in bf16/fp16 the whole `Spans` batch is one FlashAttention varlen call
(`anita.model.varlen`: no mask at all); in fp32, which FlashAttention lacks, the per-sequence calls
run as on CPU, a branch's through the memory-efficient kernel (`attend` in `anita.model.llama`), never
the math kernel that would hold the attention weights.

Shapes: B rows, T tokens per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def segment_mask(segment: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """The boolean (B, T, T) "may attend" mask (query, key) of rows described by segment and
    branch ids (B, T) each; causality is left to the model. See the module docstring."""
    same_segment = segment[:, :, None] == segment[:, None, :]  # (B, T, T)
    real_key = (segment >= 0)[:, None, :]  # (B, 1, T)
    shared_or_own = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])  # (B, T, T)
    return same_segment & real_key & shared_or_own


@dataclass(frozen=True)
class Spans:
    """Where each sequence of each row lies, for attention without a mask (`attend_spans`).

    rows[b] holds one tuple per sequence of row b, in order: (start, shared_end, end_1, end_2, ...).
    [start, shared_end) is the shared part (a whole SFT example, a DPO pair's prompt); each branch
    [previous end, end_j) continues it (chosen, rejected). Sequences lie back to back from position
    0; what follows the last is padding. The collates build them (`anita.train.data.collate`,
    `anita.dpo.data.collate_shared`); passed as `attention_mask`, they stand for the mask
    `segment_mask` builds from the same rows (`mask` builds it: the plain path beside them)."""

    rows: tuple[tuple[tuple[int, ...], ...], ...]

    def to(self, *args, **kwargs) -> "Spans":
        """Itself: spans are plain integers, so moving a batch to a device (`v.to(device)` on each
        value) leaves them as they are."""
        return self

    def mask(self, T: int) -> torch.Tensor:
        """The same rows as `segment_mask`'s (B, T, T) boolean mask (causality is left to the model)."""
        segment = torch.full((len(self.rows), T), -1, dtype=torch.long)
        branch = torch.full_like(segment, -1)
        for b, row in enumerate(self.rows):
            for s, (start, *ends) in enumerate(row):
                segment[b, start:ends[-1]] = s
                for j, (lo, hi) in enumerate(zip([start, *ends[:-1]], ends)):
                    branch[b, lo:hi] = j  # 0 = shared, 1, 2, ... = the branches
        return segment_mask(segment, branch)
