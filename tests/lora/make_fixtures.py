"""Regenerate the PEFT-written adapters and PEFT-computed logits the LoRA tests compare against.

    python tests/lora/make_fixtures.py

Needs transformers and peft (test-only). Two tiny adapters, each written by
`PeftModel.save_pretrained` for a tiny checkpoint of `tests/conftest.py` (seed 0):
- `peft_rslora/`: llama3.1, r=4, alpha=8, rsLoRA, targets q_proj, v_proj, down_proj;
- `peft_dora/`: llama3.2 (tied embeddings), r=2, alpha=4, DoRA, all-linear.
B is random (PEFT's `init_lora_weights=False`) and DoRA's magnitudes are scaled away from their
init, so both adapters change the logits. `peft_logits.safetensors` holds PEFT's logits for
`INPUT`, keyed by adapter name. The fixtures keep a check alive where peft is absent.
"""

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from anita.model import save_pretrained  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402

HERE = Path(__file__).parent / "fixtures"
INPUT = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])
ADAPTERS = {
    "peft_rslora": ("llama3.1", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"])),
    "peft_dora": ("llama3.2", dict(r=2, lora_alpha=4, use_dora=True, target_modules="all-linear")),
}


def peft_model(checkpoint_dir, seed=0, **lora):
    """A PEFT LoRA model over transformers' Llama, with random B and perturbed DoRA magnitudes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    model = get_peft_model(hf, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **lora)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.1)  # Kaiming-uniform over fan-in r is large; keep the update modest
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    return model


@torch.no_grad()
def main():
    logits = {}
    for name, (variant, lora) in ADAPTERS.items():
        with tempfile.TemporaryDirectory() as d:
            save_pretrained(tiny_model(variant), d)
            model = peft_model(d, **lora)
            model.peft_config["default"].base_model_name_or_path = f"tests/conftest.py tiny_model({variant!r})"
            model.save_pretrained(HERE / name)
            (HERE / name / "README.md").unlink()  # PEFT's empty model card
            logits[name] = model(INPUT).logits.contiguous()
    save_file(logits, str(HERE / "peft_logits.safetensors"))


if __name__ == "__main__":
    main()
