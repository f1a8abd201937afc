"""Regenerate the transformers-computed expected values the model tests compare against.

    python tests/model/make_fixtures.py

Needs transformers (test-only). The fixtures keep the oracle check alive where it is absent.

- hf_tiny_logits.safetensors: random tiny Llamas saved by anita, run by transformers' LlamaForCausalLM.
- hf_smollm2.json, hf_gguf_smollm2.{json,safetensors}: the real SmolLM2 GGUF as transformers'
  OWN GGUF loader reads it (`from_pretrained(..., gguf_file=...)`), never anita's conversion, so
  that they check anita's converter (tensor names, dequantization, q/k row order, config,
  tokenizer) as well as the model.
"""

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY_VARIANTS, tiny_model  # noqa: E402

from anita.model import save_pretrained  # noqa: E402

HERE = Path(__file__).parent / "fixtures"
GGUF_JSON, GGUF_TENSORS = HERE / "hf_gguf_smollm2.json", HERE / "hf_gguf_smollm2.safetensors"
INPUT = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])
PAD_MASK = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
SMOL_PROMPT = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]

# Converter checks. Full rows of one layer's q_proj / k_proj (head_dim 64): rows i and i+32 of a
# head come from stored rows 2i and 2i+1, so these cross both half boundaries and head boundaries.
QK_LAYER = 0
Q_ROWS = [0, 1, 2, 31, 32, 33, 63, 64, 96, 575]
K_ROWS = [0, 1, 31, 32, 63, 64, 128, 191]
N_SAMPLES = 16  # values read at fixed (seeded) flat indices of every tensor, plus the first and last
TOKENIZER_TEXTS = [
    "Perché la città è così bella? Più caffè, però: né sì né no — àèéìòù ÀÈÉÌÒÙ.",
    "Nel 2024 costava 1.234,56 € (IVA 22%), cioè 3x il prezzo del 1999; tel. +39 06 1234567.",
    "Ciao!!  Come va?\n\n\t- «Bene», grazie... (davvero); l'altro: 'sì' [ok] {x} <y> @#&*",
    "def f(x):\n    return x ** 2  # 😀 ok\r\n",
]
CHAT = [{"role": "system", "content": "Sei un assistente italiano."},
        {"role": "user", "content": "Qual è la città più bella d'Italia? Rispondi in 3 parole."},
        {"role": "assistant", "content": "Roma, senza dubbio."},
        {"role": "user", "content": "E la seconda?"}]
CONFIG_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
                 "bos_token_id", "eos_token_id", "pad_token_id"]


def checksums(w: torch.Tensor) -> tuple[float, float]:
    """(Σ w, Σ w_j·(1 + (j mod 1009)/1009)) over the flattened tensor in float64. The weighted sum
    changes when rows or columns are reordered, which a plain sum cannot see."""
    flat = w.detach().double().flatten()
    weights = 1 + (torch.arange(flat.numel(), dtype=torch.float64) % 1009) / 1009
    return flat.sum().item(), (flat * weights).sum().item()


def sample_index(numel: int, seed: int) -> torch.Tensor:
    picked = torch.randint(0, numel, (N_SAMPLES,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.tensor([0, numel - 1]), picked])


def vocab_digest(vocab: dict[str, int]) -> str:
    """sha256 of the whole token -> id map (sorted by id), so the fixture stays small."""
    return hashlib.sha256(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1])).encode()).hexdigest()


def merges_digest(merges: list) -> str:
    """sha256 of the BPE merge list, each merge as a [left, right] pair (either spelling in tokenizer.json)."""
    return hashlib.sha256(json.dumps([m.split(" ") if isinstance(m, str) else m for m in merges]).encode()).hexdigest()


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_gguf_smollm2():
    """(model, tokenizer) from transformers' own GGUF loader: independent of anita.model.gguf."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from anita.assets import smollm2_gguf

    gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@torch.no_grad()
def make_tiny():
    out = {}
    for variant in TINY_VARIANTS:
        with tempfile.TemporaryDirectory() as d:
            save_pretrained(tiny_model(variant), d)
            hf = hf_model(d)
            out[f"{variant}.logits"] = hf(INPUT).logits.contiguous()
            pos = (PAD_MASK.cumsum(-1) - 1).clamp(min=0)
            out[f"{variant}.padded"] = hf(INPUT, attention_mask=PAD_MASK, position_ids=pos).logits.contiguous()
    save_file(out, str(HERE / "hf_tiny_logits.safetensors"))


@torch.no_grad()
def make_smollm2_generation(hf, tok):
    ids = tok.apply_chat_template(SMOL_PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False)
    gen = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    logits = hf(torch.tensor([ids])).logits[0, -1]
    json.dump({"prompt_ids": ids, "greedy_ids": gen, "last_logits_top": logits.topk(20).indices.tolist(),
               "last_logits_top_values": logits.topk(20).values.tolist()},
              open(HERE / "hf_smollm2.json", "w"), indent=1)


def make_converter_fixture(hf, tok):
    params = dict(hf.named_parameters())  # tied lm_head appears once, as model.embed_tokens.weight
    names = sorted(params)
    tensors = {"index": torch.stack([sample_index(params[n].numel(), seed=i) for i, n in enumerate(names)])}
    tensors["values"] = torch.stack([params[n].detach().flatten()[tensors["index"][i]] for i, n in enumerate(names)])
    sums = [checksums(params[n]) for n in names]
    tensors["sum"] = torch.tensor([s for s, _ in sums], dtype=torch.float64)
    tensors["weighted_sum"] = torch.tensor([w for _, w in sums], dtype=torch.float64)
    layer = hf.model.layers[QK_LAYER].self_attn
    tensors["q_rows"] = layer.q_proj.weight.detach()[Q_ROWS].contiguous()
    tensors["k_rows"] = layer.k_proj.weight.detach()[K_ROWS].contiguous()
    tensors["q_row_sums"] = layer.q_proj.weight.detach().double().sum(-1)
    tensors["k_row_sums"] = layer.k_proj.weight.detach().double().sum(-1)
    save_file(tensors, str(GGUF_TENSORS))

    c = hf.config
    config = {k: getattr(c, k) for k in CONFIG_FIELDS}
    config["rope_theta"] = c.rope_parameters["rope_theta"]
    config["rope_type"] = c.rope_parameters["rope_type"]
    config["lm_head_is_embed_tokens"] = hf.lm_head.weight is hf.model.embed_tokens.weight
    chat_text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    texts = TOKENIZER_TEXTS + [chat_text]
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    tokenizer = {
        "texts": texts, "ids": [tok.encode(t) for t in texts], "decoded": [tok.decode(tok.encode(t)) for t in texts],
        "chat": CHAT, "chat_text": chat_text,
        "special": {"bos": [tok.bos_token, tok.bos_token_id], "eos": [tok.eos_token, tok.eos_token_id],
                    "pad": [tok.pad_token, tok.pad_token_id]},
        "vocab_size": len(tok), "vocab_sha256": vocab_digest(tok.get_vocab()),
        "merges_sha256": merges_digest(merges),
    }
    fixture = {"source": "transformers AutoModelForCausalLM/AutoTokenizer.from_pretrained(gguf_file=SmolLM2-135M-"
                         "Instruct.Q4_1.gguf), fp32", "config": config,
               "tensors": {n: list(params[n].shape) for n in names},
               "qk_layer": QK_LAYER, "q_rows": Q_ROWS, "k_rows": K_ROWS, "tokenizer": tokenizer}
    GGUF_JSON.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n")


def main():
    make_tiny()
    hf, tok = hf_gguf_smollm2()
    make_smollm2_generation(hf, tok)
    make_converter_fixture(hf, tok)


if __name__ == "__main__":
    main()
