"""The oracle of tests/quant/test_quantize_model.py: the same checkpoints quantized to NF4 by
transformers + bitsandbytes, and what that quantization costs in logits; and the script that
saves those measurements:

    python tests/quant/make_fixtures.py

Each case loads a checkpoint twice with transformers, in fp32 and in NF4 (bitsandbytes'
`Linear4bit` replacing every nn.Linear but `lm_head`, as `BitsAndBytesConfig(load_in_4bit=True)`
does), runs both on fixed inputs and measures the NF4 error of the logits (`error_stats`). The
tests compare anita's error with these numbers: live where transformers and bitsandbytes import,
else from `fixtures/bnb_oracle.json`, which keeps the check alive without them.

- "tiny": tests/conftest.py's tiny_model("llama3.1") (seed 0), `BitsAndBytesConfig` NF4 with
  double quantization, fp32 compute, inputs `TINY_IDS`;
- "tiny_blocksize32": the same model, blocksize 32 and no double quantization, fp32 compute.
  transformers has no blocksize option, so bitsandbytes' `nn.Linear4bit` replaces the same
  linears by hand. (Not 128: the tiny model has 64 inputs, and bitsandbytes 0.50's CPU
  dequantization is wrong for blocks that span two rows of a weight.)
- "smollm2": SmolLM2-135M-Instruct (`anita.assets.smollm2_dir()`), `BitsAndBytesConfig` NF4 with
  double quantization, bf16 compute, on the tokens of `SMOLLM2_TEXT`.

bitsandbytes' CPU fast path is switched off (`support_avx512bf16_for_cpu = False`). On a CPU with
AVX512-BF16, `bnb.nn.Linear4bit` repacks its weight at the first inference call and runs a fused
kernel that rounds the block scales to bf16 and computes in bf16 whatever `compute_dtype` says;
its numbers depend on the machine (with it, tiny: relative error 0.1143 instead of 0.1142;
SmolLM2: KL 0.488, top-1 0.84, relative error 0.359 instead of 0.484, 0.84, 0.364). Without it,
bitsandbytes dequantizes NF4 to the compute dtype and calls F.linear, on every machine.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

HERE = Path(__file__).parent / "fixtures"
FIXTURE = HERE / "bnb_oracle.json"
TINY_IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))  # (B=2, T=12)
SMOLLM2_TEXT = ("The quick brown fox jumps over the lazy dog. Rome is the capital of Italy, and Paris is the "
                "capital of France.")
CASES = {  # NF4 settings of each case
    "tiny": dict(blocksize=64, double_quant=True, compute_dtype=torch.float32),
    "tiny_blocksize32": dict(blocksize=32, double_quant=False, compute_dtype=torch.float32),
    "smollm2": dict(blocksize=64, double_quant=True, compute_dtype=torch.bfloat16),
}


def available() -> bool:
    """Whether transformers and a working bitsandbytes import."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    from anita.quant.linear import import_bitsandbytes

    return import_bitsandbytes() is not None


def error_stats(full: torch.Tensor, quantized: torch.Tensor) -> dict:
    """What NF4 costs, from logits (..., V) of the full-precision and the quantized model:
    relative error ||Δ||/||full||, max |Δ|, mean KL(full || quantized) in nats per position, and
    the fraction of positions whose top-1 token is unchanged."""
    full, quantized = full.float(), quantized.float()
    lf, lq = full.log_softmax(-1), quantized.log_softmax(-1)
    return {
        "rel_error": ((full - quantized).norm() / full.norm()).item(),
        "max_abs_error": (full - quantized).abs().max().item(),
        "kl": (lf.exp() * (lf - lq)).sum(-1).mean().item(),
        "top1": (full.argmax(-1) == quantized.argmax(-1)).float().mean().item(),
    }


def hf_model(checkpoint_dir):
    """transformers' own fp32 model of the checkpoint."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32).eval()


def bnb_nf4_model(checkpoint_dir, blocksize=64, double_quant=True, compute_dtype=torch.float32):
    """transformers' model of the checkpoint with bitsandbytes NF4 in every nn.Linear but lm_head:
    through `BitsAndBytesConfig` at bitsandbytes' default blocksize 64, by hand otherwise."""
    import bitsandbytes as bnb
    import transformers

    if blocksize == 64:
        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=double_quant,
                                                 bnb_4bit_compute_dtype=compute_dtype)
        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir, quantization_config=config,
                                                                  device_map="cpu", dtype=torch.float32).eval()
    else:
        model = hf_model(checkpoint_dir)
        for name, linear in list(model.named_modules()):
            if type(linear) is not torch.nn.Linear or name == "lm_head":
                continue
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=compute_dtype,
                                      compress_statistics=double_quant, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, blocksize=blocksize,
                                             compress_statistics=double_quant, quant_type="nf4", module=layer)
            layer.weight = layer.weight.to("cpu")  # quantizes
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.eval())
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.weight.quant_state.blocksize == blocksize for m in quantized)
    for m in quantized:
        m.support_avx512bf16_for_cpu = False  # see the module docstring
    return model


@torch.no_grad()
def measure(full, quantized, ids) -> tuple[dict, torch.Tensor]:
    """error_stats of two transformers models on `ids` (B, T), and the quantized model's logits."""
    q = quantized(ids).logits
    return error_stats(full(ids).logits, q), q


def main():
    import bitsandbytes
    import transformers

    from anita.assets import smollm2_dir
    from anita.model import Tokenizer, save_pretrained
    from tests.conftest import tiny_model

    torch.set_num_threads(1)  # as in the tests
    out = {"transformers_version": transformers.__version__, "bitsandbytes_version": bitsandbytes.__version__,
           "torch_version": torch.__version__}
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(tiny_model("llama3.1"), d)
        full = hf_model(d)
        for name in ("tiny", "tiny_blocksize32"):
            stats, _ = measure(full, bnb_nf4_model(d, **CASES[name]), TINY_IDS)
            out[name] = dict(stats, ids=TINY_IDS.tolist())
    path = smollm2_dir()
    ids = torch.tensor([Tokenizer.from_pretrained(path).encode(SMOLLM2_TEXT)])
    stats, _ = measure(hf_model(path), bnb_nf4_model(path, **CASES["smollm2"]), ids)
    out["smollm2"] = dict(stats, ids=ids.tolist())
    HERE.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: {s: v for s, v in c.items() if s != "ids"} if isinstance(c, dict) else c
                      for k, c in out.items()}, indent=1))


if __name__ == "__main__":
    main()
