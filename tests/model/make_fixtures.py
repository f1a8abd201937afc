"""Regenerate the transformers-computed expected values the model tests compare against.

    python tests/model/make_fixtures.py

Needs transformers (test-only). The fixtures keep the oracle check alive where it is absent.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY_VARIANTS, tiny_model  # noqa: E402

from anita.assets import smollm2_dir  # noqa: E402
from anita.model import save_pretrained

HERE = Path(__file__).parent / "fixtures"
INPUT = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])
PAD_MASK = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
SMOL_PROMPT = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def main():
    out = {}
    for variant in TINY_VARIANTS:
        with tempfile.TemporaryDirectory() as d:
            save_pretrained(tiny_model(variant), d)
            hf = hf_model(d)
            out[f"{variant}.logits"] = hf(INPUT).logits.contiguous()
            pos = (PAD_MASK.cumsum(-1) - 1).clamp(min=0)
            out[f"{variant}.padded"] = hf(INPUT, attention_mask=PAD_MASK, position_ids=pos).logits.contiguous()
    save_file(out, str(HERE / "hf_tiny_logits.safetensors"))

    from transformers import AutoTokenizer

    path = smollm2_dir()
    hf, tok = hf_model(path), AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template(SMOL_PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False)
    gen = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    logits = hf(torch.tensor([ids])).logits[0, -1]
    json.dump({"prompt_ids": ids, "greedy_ids": gen, "last_logits_top": logits.topk(20).indices.tolist(),
               "last_logits_top_values": logits.topk(20).values.tolist()},
              open(HERE / "hf_smollm2.json", "w"), indent=1)


if __name__ == "__main__":
    main()
