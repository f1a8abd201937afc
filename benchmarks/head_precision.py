"""How much the bf16 output head changes the loss: SmolLM2-135M-Instruct, fp32 head vs bf16 head.

    python benchmarks/head_precision.py [--dtype bfloat16] [--batch 4] [--seq-len 256]

Loads the real SmolLM2 (`anita.assets.smollm2_dir()`) in the training dtype, tokenizes a fixed
English and Italian text (the chat template is not needed: this is the next-token loss of plain
text), and computes the SFT loss (mean NLL over every next token) and its gradient w.r.t. the final
hidden states with `token_logps(..., head_dtype=None)` (fp32 matmuls) and `head_dtype=bf16` (bf16
matmuls, fp32 log-softmax). Prints the loss difference, the largest per-token log-prob difference,
and the relative difference of the hidden-state gradient. Numbers are in docs/speed.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from anita.assets import smollm2_dir  # noqa: E402
from anita.dtypes import parse_dtype  # noqa: E402
from anita.model import Tokenizer, from_pretrained  # noqa: E402
from anita.model.logprobs import next_token_labels, output_head_weight, token_logps  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. Large language models are trained to predict the next "
        "token of a text. Il modello linguistico impara a prevedere la parola successiva di un testo italiano, "
        "e la qualità delle risposte dipende dai dati di addestramento e dalla preferenza umana. ")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="bfloat16", help="model / hidden-state dtype (the training dtype)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    path = smollm2_dir()
    tok = Tokenizer.from_pretrained(path)
    ids = tok.encode(TEXT * 64)[: args.batch * args.seq_len]
    ids = torch.tensor(ids).view(args.batch, args.seq_len)  # (B, T)
    model = from_pretrained(path, dtype=parse_dtype(args.dtype)).eval()
    with torch.no_grad():
        hidden = model.hidden_states(ids)  # (B, T, D)
    labels = next_token_labels(ids, torch.ones_like(ids))
    out = {}
    for name, head in (("fp32", None), ("bf16", torch.bfloat16)):
        h = hidden.detach().clone().requires_grad_()
        logps = token_logps(h, output_head_weight(model), labels, head_dtype=head)  # (B, T)
        loss = -logps.sum() / (labels != -100).sum()
        loss.backward()
        out[name] = (loss.item(), logps.detach(), h.grad.float())
    (l32, p32, g32), (l16, p16, g16) = out["fp32"], out["bf16"]
    print(f"SmolLM2-135M-Instruct, hidden {args.dtype}, B={args.batch} T={args.seq_len}")
    print(f"loss fp32 head {l32:.6f}, bf16 head {l16:.6f}, difference {l16 - l32:+.2e} "
          f"(relative {(l16 - l32) / l32:+.2e})")
    print(f"largest per-token log-prob difference {(p16 - p32).abs().max().item():.3e}, "
          f"mean {(p16 - p32).abs().mean().item():.3e}")
    print(f"hidden-state gradient: relative L2 difference {((g16 - g32).norm() / g32.norm()).item():.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
